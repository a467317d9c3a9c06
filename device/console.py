"""The installed commands (pyproject.toml's [project.scripts]): `faceberry`, `faceberry-train`, `faceberry-convert`.

Each does what `python -m device|train|convert` does (device/__main__.py …): the one-line error for a
missing dependency, TensorFlow's and LiteRT's start-up noise filtered unless --log-level DEBUG, then the
CLI's main(), whose return value is the exit code. Only the standard library is imported before the guard.
"""

from __future__ import annotations

from device.startup import guard, run_main

DEVICE_NEEDS = ("numpy", "cv2")
WORKSTATION_NEEDS = ("numpy", "cv2", "tensorflow")


def _run(prog: str, main_module: str, needs: tuple[str, ...]) -> int:
    if not guard(prog, needs):
        return 2
    return run_main(prog, main_module)


def faceberry() -> int:
    """`faceberry run|check|eval|enroll …` (device.cli), on the Pi and the workstation."""
    return _run("faceberry", "device.cli", DEVICE_NEEDS)


def faceberry_train() -> int:
    """`faceberry-train …` (train.cli): the workstation only."""
    return _run("faceberry-train", "train.cli", WORKSTATION_NEEDS)


def faceberry_convert() -> int:
    """`faceberry-convert …` (convert.cli): the workstation only."""
    return _run("faceberry-convert", "convert.cli", WORKSTATION_NEEDS)
