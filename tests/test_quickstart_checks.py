"""`./quickstart.sh demo` checks that its sample photos are at hand before it spends minutes building
environments (issue 24): offline and without FACEBERRY_SAMPLE_PHOTOS it stops at once with the fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT
from tests.plugins.processes import run

CLOSED = "http://127.0.0.1:9"  # a proxy on a closed port: every download fails at once, as offline


def _demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "FACEBERRY_SAMPLE_PHOTOS"}
    base.update({"SCIKIT_LEARN_DATA": str(tmp_path / "sklearn"), "http_proxy": CLOSED, "https_proxy": CLOSED,
                 "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED, "no_proxy": "", "NO_PROXY": ""})
    base.update(env)
    return run(["bash", str(ROOT / "quickstart.sh"), "demo"], cwd=tmp_path, raw_env=base, timeout=120)


def test_offline_without_sample_photos_the_demo_stops_before_any_setup(tmp_path: Path) -> None:
    res = _demo(tmp_path)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: the demo's sample photos (LFW) cannot be downloaded: no network?")
    assert "FACEBERRY_SAMPLE_PHOTOS" in err
    assert "==>" not in res.stdout  # no environment step was started


def test_a_sample_photos_variable_that_is_no_folder_is_refused_at_once(tmp_path: Path) -> None:
    res = _demo(tmp_path, FACEBERRY_SAMPLE_PHOTOS=str(tmp_path / "nowhere"))
    assert res.returncode == 1 and "is not a folder" in res.stderr and "==>" not in res.stdout
