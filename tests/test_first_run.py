"""A first run that explains itself (issue 13): quickstart.sh shows pip's progress and states its disk
and time needs up front, and git ignores everything the README's steps create."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT

QUICKSTART = (ROOT / "quickstart.sh").read_text()


def test_quickstart_states_disk_and_time_before_installing():
    help_text = subprocess.run([str(ROOT / "quickstart.sh"), "--help"], capture_output=True, text=True,
                               timeout=30, check=True).stdout
    assert "2.2 GB" in help_text and "274 MB" in help_text
    assert "minutes" in help_text and "free disk" in help_text


def test_quickstart_lets_pip_show_its_progress():
    pip_lines = [ln for ln in QUICKSTART.splitlines() if "-m pip install" in ln]
    assert pip_lines
    assert not any(" -q" in ln for ln in pip_lines), pip_lines
    # Bars only on a terminal; elsewhere pip still prints every package it downloads, with its size.
    assert any("--progress-bar" not in ln for ln in pip_lines)


@pytest.mark.parametrize("path", [
    "backbones/faces/embedder.keras", "backbones/student/config.json", "runs/home/model.keras",
    "bundles/home/manifest.json", "photos/alice/IMG_0001.jpg", "demo/work/run/report.json", "face-photos/a.jpg",
    ".venv/bin/python", ".venv-device/bin/python", ".venv-tflite/bin/python", ".venv-bench/bin/python",
    "models/face_detection_short_range.tflite", "models/cache/x", "bench/results/accuracy.json",
    "train/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/x", ".ruff_cache/x",
])
def test_git_ignores_what_the_readme_steps_create(path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, timeout=30)
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


def test_git_does_not_ignore_the_code():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("train/cli.py", "models/__init__.py", "bench/speed.py", "quickstart.sh"):
        proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, timeout=30)
        assert proc.returncode == 1, f"{path} is ignored"
