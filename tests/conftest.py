"""Shared fixtures: ../shared data, the detector model. Broker and bundle fixtures live in their
own plugin modules so each stays small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FACEBERRY_SHARED", ROOT.parent / "shared")).resolve()
SHARED_DATA = SHARED / "data"

pytest_plugins = ["tests.fixtures_broker", "tests.fixtures_bundle"]


def need_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs ../shared (see ../shared/README.md)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return need_shared()


@pytest.fixture(scope="session")
def detector_path() -> Path:
    from models import default_detector_path

    path = default_detector_path()
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `python -m models fetch` first")
    return path
