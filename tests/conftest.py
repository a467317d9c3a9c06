"""Shared fixtures: ../shared data, the detector model. Everything else more than one test module uses lives
once in a plugin under tests/plugins/ (registered below): the broker (`mosquitto`, `mosquitto_factory`,
`Subscriber`), the bundles (`gallery_bundle`, the central one; `tiny_bundle`, the legacy softmax one), the
daemon (`Daemon`, `write_config`), the one subprocess runner and free port (`processes`), files made for tests.
Test modules import helpers from tests.plugins, never from each other.

Where ../shared is absent (a clone of your own), SHARED_DATA is the public stand-in that tests/user_data.py
assembles: LFW faces and ImageNet MobileNetV2 weights, downloaded once the way the demo does. Tests that
need something only ../shared has skip, each saying what a user can do (`absent`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FACEBERRY_SHARED", ROOT.parent / "shared")).resolve()
SHARED_DATA = SHARED / "data"
if not SHARED_DATA.is_dir():
    from tests import user_data

    SHARED_DATA = user_data.prepare() or SHARED_DATA

pytest_plugins = ["tests.plugins.processes", "tests.plugins.broker", "tests.plugins.bundles", "tests.plugins.daemon",
                  "tests.plugins.files", "tests.public_faces"]


def absent(*paths: Path, what: str = "this test") -> str:
    """The skip reason for test data that is missing: what is absent and what a user can do about it."""
    names = " or ".join(str(p) for p in paths)
    if SHARED.joinpath("data").is_dir():  # the project's own ../shared, incomplete
        return f"{names} is absent: {what} needs ../shared (see ../shared/README.md)"
    from tests import user_data

    public = all(p.is_relative_to(SHARED_DATA) and p.relative_to(SHARED_DATA).parts[:1] in (("faces",), ("weights",))
                 and "five-celebrities" not in p.parts for p in paths)
    if public:
        return f"{names} is absent: {what} needs faces and weights; {user_data.WHAT_TO_DO}"
    return (f"{names} is absent: {what} needs the project's ../shared folder (face_recognition's example photos "
            "and video, five-celebrities), which a clone of your own does not have; nothing to do")


def need_shared(*parts: str) -> Path:
    """Path under the shared data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(absent(path))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return need_shared()


@pytest.fixture(scope="session")
def detector_path() -> Path:
    from faceberry.models import default_detector_path

    path = default_detector_path()
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `python -m models fetch` first")
    return path
