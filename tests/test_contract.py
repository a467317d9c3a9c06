"""One contract: train's, convert's and device's decisions are the same on the same photos.

The rules live once in faceberry/contract.py; these tests run each stage's own code on real photos and
hold the answers equal: which face of a photo is its subject (train's crops, `device enroll`,
`device eval`). Accept-or-unknown (convert's verification = the device's classifier = the contract) is
held equal in tests/test_cohort.py, on the int8 bundle built there.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SHARED_DATA, absent

SCENES = SHARED_DATA / "photos" / "scenes"
LFW = SHARED_DATA / "faces" / "lfw-dev"


def _photos() -> list[Path]:
    if not SCENES.is_dir() or not LFW.is_dir():
        pytest.skip(absent(SCENES, LFW))
    lfw = [p for d in sorted(LFW.iterdir())[:12] for p in sorted(d.glob("*.jpg"))[:3]]
    return sorted(SCENES.glob("*.jpg")) + sorted(SCENES.glob("*.png")) + lfw


def test_each_rule_is_defined_once():
    """git grep finds no second definition of a contract rule outside faceberry/contract.py."""
    patterns = [r"^UNKNOWN = ", r"^IMAGE_SUFFIXES = ", r"^DOMINANCE = ", r"def _threshold_for\b", r"def l2n\b",
                r"def _unit\b"]
    for pattern in patterns:
        res = subprocess.run(["git", "grep", "-n", "-E", pattern, "--", "*.py"], cwd=ROOT, capture_output=True,
                             text=True)
        hits = [line for line in res.stdout.splitlines()
                if not line.startswith(("faceberry/contract.py:", "tests/test_contract.py:"))]
        assert not hits, f"{pattern} defined outside faceberry/contract.py: {hits}"


def test_train_enroll_and_eval_pick_the_same_subject_face(detector_path):
    from faceberry.contract import SEVERAL_FACES, subject_face
    from faceberry.detector import FaceDetector
    from faceberry.device.recognition.enroll import usable_crops
    from faceberry.preprocess import load_image
    from faceberry.train.crops import CropMaker

    photos = _photos()
    size, min_face = 150, 40
    maker = CropMaker(size, detector_path, cache_dir=None, min_face_size=min_face, alignment="dlib-chip-v1")
    detector = FaceDetector(detector_path, min_face_size=0)
    outcomes = {"used": 0, "several": 0}
    for path in photos:
        train_crop, train_why = maker.crop_file(path)
        enroll_crops, refused = usable_crops([path], detector, size, min_face, "dlib-chip-v1")
        # device eval sees the daemon's faces (those at least min_face wide) and applies the same rule.
        daemon_faces = [f for f in FaceDetector(detector_path, min_face_size=min_face).detect(load_image(path))]
        _, eval_why = subject_face(daemon_faces, 0)
        assert (train_crop is None) == (not enroll_crops), (path, train_why, refused)
        if train_crop is not None:
            assert np.array_equal(train_crop, enroll_crops[0]), path
            outcomes["used"] += 1
        if train_why == SEVERAL_FACES:
            assert eval_why == SEVERAL_FACES and SEVERAL_FACES in refused[0][1], path
            outcomes["several"] += 1
    assert outcomes["used"] >= 30 and outcomes["several"] >= 1, outcomes  # two_people.jpg


def test_only_dlibs_resnet_enrols_face_and_mirror():
    from faceberry.contract import ENROLLED_VIEWS, FACE_ONLY, enrolled_views, mirror_mean, mirrored, needs_second_look

    assert enrolled_views("dlib-resnet-v1") == ENROLLED_VIEWS
    assert enrolled_views("mobilenetv2") == enrolled_views(None) == FACE_ONLY
    crops = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    assert np.array_equal(mirrored(crops)[1, 2, 0], crops[1, 2, 3]) and mirrored(crops[0]).shape == (3, 4, 3)
    both = mirror_mean(np.array([[3.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert np.allclose(both, [[2 ** -0.5, 2 ** -0.5]])
    assert needs_second_look(0.93, 0.94) and not needs_second_look(0.90, 0.94)
