"""Skips in a clone of your own say what a user can do (tests/user_data.py, tests/conftest.py `absent`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest, user_data


@pytest.fixture
def users_clone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The conftest globals as a clone without ../shared has them, with nothing downloaded."""
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "no-shared")
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "no-shared" / "data")
    return tmp_path / "no-shared" / "data"


def test_faces_and_weights_point_to_the_download(users_clone: Path) -> None:
    reason = conftest.absent(users_clone / "faces" / "lfw-dev", users_clone / "weights" / user_data.WEIGHTS_NAME)
    assert "run the tests once online" in reason and str(user_data.DATA_HOME) in reason


def test_what_only_shared_has_says_there_is_nothing_to_do(users_clone: Path) -> None:
    for parts in (("photos", "scenes"), ("video", "short_hamilton_clip.mp4"), ("faces", "five-celebrities")):
        reason = conftest.absent(users_clone.joinpath(*parts))
        assert "nothing to do" in reason and "online" not in reason, parts


def test_with_the_projects_shared_the_reason_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "shared")
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "shared" / "data")
    assert "../shared/README.md" in conftest.absent(tmp_path / "shared" / "data" / "faces" / "lfw-dev")


def test_offline_asks_for_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FACEBERRY_OFFLINE", "1")
    monkeypatch.setattr(user_data, "DATA_HOME", tmp_path / "data")
    assert user_data.prepare() is None
    assert not (tmp_path / "data").exists()


def test_no_test_writes_its_own_shared_skip_reason() -> None:
    """A skip that names ../shared by hand tells a clone of your own nothing it can do: `absent` says it."""
    own = {Path(conftest.__file__).name, Path(__file__).name}
    by_hand = [p.name for p in Path(conftest.__file__).parent.rglob("*.py")
               if p.name not in own and "shared/README.md" in p.read_text(encoding="utf-8")]
    assert by_hand == [], f"use tests.conftest.absent(...) for the skip reason in {by_hand}"
