"""Broken and awkward training inputs: each gets its documented behaviour, none crashes.

Documented (python -m train --help): photos with no face, several faces of similar size, a face
too small or an unreadable file are skipped and listed in skipped.json; an empty person folder is
ignored with a warning; a person with fewer than --min-photos usable photos is an error that says
how many are needed. PNG with alpha and greyscale photos are used like any other photo.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceberry.train.crops import (
    NO_FACE,
    SEVERAL_FACES,
    TOO_SMALL,
    UNREADABLE,
    CropMaker,
    build_crop_set,
    split_per_person,
)
from faceberry.train.errors import TrainError
from faceberry.train.trainer import collect_inputs
from tests.conftest import need_shared
from tests.plugins.processes import module

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def face_photos() -> list[Path]:
    return sorted(need_shared("faces", "lfw-dev", "Hugo_Chavez").glob("*.jpg"))[40:46]


@pytest.fixture(scope="module")
def maker(detector_path, tmp_path_factory) -> CropMaker:
    return CropMaker(112, detector_path, cache_dir=tmp_path_factory.mktemp("crop-cache"))


def _write(path: Path, image_bgr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image_bgr)
    return path


def test_each_awkward_photo_gets_its_reason(tmp_path, face_photos, maker):
    src = cv2.imread(str(face_photos[0]))
    person = tmp_path / "photos" / "Someone"
    files = {
        "ok.jpg": _write(person / "ok.jpg", src),
        "grey.jpg": _write(person / "grey.jpg", cv2.cvtColor(src, cv2.COLOR_BGR2GRAY)),
        "alpha.png": _write(person / "alpha.png", np.dstack([src, np.full(src.shape[:2], 200, np.uint8)])),
    }
    # A drawn scene with no face in it.
    blank = np.full((240, 320, 3), 180, np.uint8)
    cv2.rectangle(blank, (40, 40), (200, 160), (30, 90, 200), -1)
    cv2.circle(blank, (260, 180), 40, (20, 160, 20), -1)
    files["noface.jpg"] = _write(person / "noface.jpg", blank)
    # A JPEG cut short: the header is there, the picture is not.
    data = face_photos[1].read_bytes()
    (person / "corrupt.jpg").write_bytes(data[:200])
    (person / "empty.jpg").write_bytes(b"")
    (person / "notes.jpg").write_text("not an image")
    # The same face, found but narrower than --min-face-size (40 px): the photo shrunk to 80 px.
    small = cv2.resize(src, (80, 80), interpolation=cv2.INTER_AREA)
    canvas = np.full((160, 160, 3), 120, np.uint8)
    canvas[40:120, 40:120] = small
    _write(person / "tiny.jpg", canvas)
    # Two people side by side, at the same size.
    other = cv2.imread(str(face_photos[2]))
    _write(person / "two.jpg", np.hstack([src, other]))

    crops = build_crop_set(tmp_path / "photos", 112, maker=maker, progress=False)
    used = {Path(p).name for p in crops.paths}
    # An unreadable file's reason carries the detail in brackets: "unreadable (…)".
    reasons = {Path(s["path"]).name: s["reason"].split(" (")[0] for s in crops.skipped}
    assert used == {"ok.jpg", "grey.jpg", "alpha.png"}
    assert reasons == {
        "noface.jpg": NO_FACE, "corrupt.jpg": UNREADABLE, "empty.jpg": UNREADABLE, "notes.jpg": UNREADABLE,
        "tiny.jpg": TOO_SMALL, "two.jpg": SEVERAL_FACES,
    }
    assert crops.crops.shape == (3, 112, 112, 3) and crops.crops.dtype == np.uint8
    by_name = dict(zip([Path(p).name for p in crops.paths], crops.crops, strict=True))
    # Greyscale in, three equal channels out; alpha dropped, same face as the JPEG.
    grey = by_name["grey.jpg"].astype(int)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert np.abs(by_name["alpha.png"].astype(int) - by_name["ok.jpg"].astype(int)).mean() < 3.0


def test_crop_cache_is_reused_and_keyed_by_content(tmp_path, face_photos, detector_path):
    cache = tmp_path / "cache"
    photos = tmp_path / "photos" / "A"
    photos.mkdir(parents=True)
    for p in face_photos[:3]:
        (photos / p.name).write_bytes(p.read_bytes())
    first = build_crop_set(tmp_path / "photos", 96, detector_path, cache, progress=False)
    entries = sorted(cache.rglob("*.npz"))
    assert len(entries) == 3
    stamps = [e.stat().st_mtime_ns for e in entries]
    second = build_crop_set(tmp_path / "photos", 96, detector_path, cache, progress=False)
    assert np.array_equal(first.crops, second.crops)
    assert [e.stat().st_mtime_ns for e in sorted(cache.rglob("*.npz"))] == stamps  # read, not rewritten
    # Another input size is another entry; a changed photo is another entry.
    build_crop_set(tmp_path / "photos", 112, detector_path, cache, progress=False)
    assert len(list(cache.rglob("*.npz"))) == 6
    (photos / face_photos[0].name).write_bytes(face_photos[4].read_bytes())
    third = build_crop_set(tmp_path / "photos", 96, detector_path, cache, progress=False)
    assert len(list(cache.rglob("*.npz"))) == 7
    assert not np.array_equal(third.crops[0], first.crops[0])


def test_split_is_per_person_and_seeded():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["d"]
    tr, va = split_per_person(labels, 0.2, seed=3)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(labels)))
    got = [labels[i] for i in va]
    assert got.count("a") == 2 and got.count("b") == 1 and got.count("c") == 1 and got.count("d") == 0
    assert np.array_equal(split_per_person(labels, 0.2, seed=3)[1], va)
    assert not all(np.array_equal(split_per_person(labels, 0.2, seed=s)[1], va) for s in range(4, 10))


def test_empty_person_folder_is_ignored_with_a_warning(tmp_path, face_photos):
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        for p in face_photos[:2]:
            (tmp_path / name / p.name).write_bytes(p.read_bytes())
    (tmp_path / "Nobody").mkdir()
    people, negatives, warnings = collect_inputs(tmp_path, None)
    assert sorted(people) == ["A", "B"] and negatives == {}
    assert len(warnings) == 1 and "Nobody" in warnings[0] and "ignored" in warnings[0]
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "x.jpg").write_bytes(face_photos[3].read_bytes())
    people, negatives, _ = collect_inputs(tmp_path, None)
    assert "unknown" not in people and sum(len(v) for v in negatives.values()) == 1


def test_no_people_or_a_single_person_is_an_error(tmp_path, face_photos):
    with pytest.raises(TrainError, match="no person folders"):
        collect_inputs(tmp_path, None)
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "1.jpg").write_bytes(face_photos[0].read_bytes())
    with pytest.raises(TrainError, match="two or more people"):
        collect_inputs(tmp_path, None)


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return module("train", *args, timeout=300)


def test_person_with_one_photo_is_an_error_naming_the_need(tmp_path, face_photos, detector_path):
    photos = tmp_path / "photos"
    lfw = need_shared("faces", "lfw-dev")
    for p in sorted((lfw / "Jacques_Chirac").glob("*.jpg"))[:6]:
        (photos / "Chirac").mkdir(parents=True, exist_ok=True)
        (photos / "Chirac" / p.name).symlink_to(p)
    (photos / "Chavez").mkdir()
    (photos / "Chavez" / "only.jpg").symlink_to(face_photos[0])
    out = tmp_path / "run"
    proc = _train_cli("--photos", str(photos), "--out", str(out), "--weights", "none", "--quiet",
                      "--cache-dir", str(tmp_path / "cache"), "--detector", str(detector_path))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: too few usable photos (need at least 5 per person")
    assert "Chavez: 1 of 1" in err and "Chirac" not in err
    # The skip report is written even though training stopped, so nothing is hidden.
    assert json.loads((out / "skipped.json").read_text()) == []


def test_out_dir_is_not_overwritten_without_force(tmp_path):
    (tmp_path / "photos" / "A").mkdir(parents=True)
    (tmp_path / "photos" / "B").mkdir(parents=True)
    for name in "AB":
        cv2.imwrite(str(tmp_path / "photos" / name / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _train_cli("--photos", str(tmp_path / "photos"), "--out", str(out), "--quiet")
    assert proc.returncode == 2
    assert "not empty" in proc.stderr and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_photos_dir_and_bad_weights_are_one_line_errors(tmp_path):
    proc = _train_cli("--photos", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "photos folder not found" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: photos folder not found")
    assert "Traceback" not in proc.stderr
    proc = _train_cli("--photos", str(tmp_path), "--out", str(tmp_path / "run"), "--weights", str(tmp_path / "w.h5"))
    assert proc.returncode == 2 and "--weights" in proc.stderr and "no such file" in proc.stderr


def test_help_documents_every_flag():
    proc = _train_cli("--help")
    assert proc.returncode == 0
    from faceberry.train.cli import build_parser

    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest


def test_backbone_subcommand_and_missing_stage_are_dispatched(capsys, monkeypatch):
    proc = _train_cli("backbone", "--help")
    assert proc.returncode == 0 and "python -m train backbone" in proc.stdout
    from faceberry.device import cli

    monkeypatch.setitem(cli.TREE, ("train", "no_such_stage"), cli.Command("train.no_such_stage", "a test stage",
                                                                           workstation=True))
    assert cli.main(["no_such_stage"], prog="python -m train", at=("train",)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m train no_such_stage is not available") and "train.no_such_stage" in err
