"""`python -m train cohort` as a user meets it (issue 24): every photo given is kept unless --per-person says
otherwise, and `--lfw` without a network ends with the fix, not a bare urlopen error. No TensorFlow, no ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from faceberry.train.cohort import MIN_PEOPLE, select_photos
from tests.conftest import ROOT


def _people(n: int, photos: int) -> dict[str, list[Path]]:
    return {f"Person_{i:02d}": [Path(f"Person_{i:02d}/{k}.jpg") for k in range(photos + i % 3)] for i in range(n)}


def test_every_photo_is_read_in_name_order():
    """--per-person caps usable faces while reading (tests/test_cohort.py), so every photo is offered."""
    people = _people(25, 8)
    total = sum(len(v) for v in people.values())
    chosen, dropped = select_photos(people, None)
    assert sum(len(v) for v in chosen.values()) == total and dropped["per_person"] == 0
    assert set(chosen) == set(people) and all(files == people[name] for name, files in chosen.items())


def test_excluded_people_are_left_out_and_counted():
    people = _people(25, 4)
    chosen, dropped = select_photos(people, {"person 03", "Person_07"})
    assert "Person_03" not in chosen and "Person_07" not in chosen and len(chosen) == 23
    assert dropped["excluded_people"] == 2
    assert dropped["excluded"] == len(people["Person_03"]) + len(people["Person_07"])


def test_lfw_without_a_network_ends_with_the_fix(tmp_path: Path):
    # A proxy on a closed port: every download fails at once, as offline.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCIKIT_LEARN_DATA": str(tmp_path / "sklearn"),
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    res = subprocess.run([sys.executable, "-m", "train", "cohort", "--backbone", str(tmp_path / "backbone"), "--lfw"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: cannot download LFW (") and "no network?" in err
    assert "use --photos DIR with photos of people not in your household" in err
    assert f"at least {MIN_PEOPLE} people" in err
    assert "Traceback" not in res.stderr
