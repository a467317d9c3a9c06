"""BlazeFace on real photos: the right number of faces, sensible boxes and keypoints; none where there is none."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from faceberry.detector import KEYPOINT_NAMES, FaceDetector
from faceberry.device.recognition.tracker import iou_matrix
from faceberry.preprocess import load_image
from tests.conftest import need_shared

SINGLE = ["alex-lacamoire.png", "biden.jpg", "lin-manuel-miranda.png", "obama.jpg", "obama2.jpg",
          "obama-240p.jpg", "obama-480p.jpg", "obama-720p.jpg", "obama-1080p.jpg", "obama_partial_face2.jpg"]


@pytest.fixture(scope="module")
def detector(detector_path: Path) -> FaceDetector:
    return FaceDetector(detector_path, num_threads=1)


def scene(name: str) -> np.ndarray:
    return load_image(need_shared("photos", "scenes", name))


def assert_sensible(face, image: np.ndarray) -> None:
    x1, y1, x2, y2 = face.box
    w, h = x2 - x1, y2 - y1
    assert w > 20 and 0.7 < w / h < 1.4, face.box  # BlazeFace boxes are near square
    kp = dict(zip(KEYPOINT_NAMES, face.keypoints, strict=True))
    for name in ("right_eye", "left_eye", "nose_tip", "mouth_center"):
        px, py = kp[name]
        assert x1 <= px <= x2 and y1 <= py <= y2, (name, kp[name], face.box)
    # Upright faces: both eyes above the nose, the nose above the mouth; the subject's right eye on the left.
    assert max(kp["right_eye"][1], kp["left_eye"][1]) < kp["nose_tip"][1] < kp["mouth_center"][1]
    assert kp["right_eye"][0] < kp["left_eye"][0]
    eye_dist = np.linalg.norm(kp["left_eye"] - kp["right_eye"])
    assert 0.2 * w < eye_dist < 0.6 * w
    assert 0.5 < face.score <= 1.0


@pytest.mark.parametrize("name", SINGLE)
def test_one_face_in_single_person_photos(detector: FaceDetector, name: str) -> None:
    image = scene(name)
    faces = detector.detect(image)
    assert len(faces) == 1, [f.box for f in faces]
    assert_sensible(faces[0], image)


def test_two_faces_in_two_people(detector: FaceDetector) -> None:
    image = scene("two_people.jpg")
    faces = detector.detect(image)
    assert len(faces) == 2
    for face in faces:
        assert_sensible(face, image)
    assert iou_matrix(faces[0].box, faces[1].box)[0, 0] == 0  # two separate people
    assert faces[0].score >= faces[1].score


def test_the_same_face_at_every_resolution(detector: FaceDetector) -> None:
    boxes = []
    for name in ("obama-240p.jpg", "obama-480p.jpg", "obama-720p.jpg", "obama-1080p.jpg"):
        image = scene(name)
        (face,) = detector.detect(image)
        h, w = image.shape[:2]
        boxes.append(face.box / np.array([w, h, w, h]))
    ious = iou_matrix(np.array(boxes), np.array(boxes))
    assert ious.min() > 0.8, ious


def test_min_face_size_drops_small_faces(detector_path: Path) -> None:
    image = scene("obama-240p.jpg")  # the face is about 56 px wide
    assert len(FaceDetector(detector_path, min_face_size=40).detect(image)) == 1
    assert FaceDetector(detector_path, min_face_size=80).detect(image) == []


def test_no_face_in_a_drawn_scene(detector: FaceDetector) -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((480, 640, 3), np.uint8)
    image[:] = np.linspace(40, 200, 640, dtype=np.uint8)[None, :, None]  # a sky-like gradient
    cv2.rectangle(image, (50, 300), (250, 460), (120, 80, 40), -1)  # a house
    cv2.fillPoly(image, [np.array([[40, 300], [150, 200], [260, 300]])], (150, 30, 30))  # its roof
    cv2.circle(image, (520, 90), 45, (250, 230, 80), -1)  # a sun
    cv2.line(image, (0, 460), (640, 440), (30, 140, 30), 12)
    image = np.clip(image.astype(int) + rng.integers(-8, 8, image.shape), 0, 255).astype(np.uint8)
    assert detector.detect(image) == []
    assert detector.detect(np.zeros((240, 320, 3), np.uint8)) == []
