"""The installed commands (pyproject.toml's [project.scripts]): `faceberry`, and two aliases into its tree.

`faceberry-train …` is `faceberry train …` and `faceberry-convert …` is `faceberry convert …`, kept for the
scripts and habits that use them. Each runs faceberry.device.cli.entry: the one-line error for a missing dependency,
TensorFlow's and LiteRT's start-up noise filtered unless --log-level DEBUG, then the tree, whose return value
is the exit code. Only the standard library is imported before the guard.
"""

from __future__ import annotations

from faceberry.device.cli import entry
from faceberry.startup import WORKSTATION_NEEDS


def faceberry() -> int:
    """`faceberry run|check|eval|enroll|train|convert …` (faceberry.device.cli), on the Pi and the workstation."""
    return entry("faceberry")


def faceberry_train() -> int:
    """`faceberry-train …`, the same as `faceberry train …`: the workstation only."""
    return entry("faceberry-train", ("train",), WORKSTATION_NEEDS)


def faceberry_convert() -> int:
    """`faceberry-convert …`, the same as `faceberry convert …`: the workstation only."""
    return entry("faceberry-convert", ("convert",), WORKSTATION_NEEDS)
