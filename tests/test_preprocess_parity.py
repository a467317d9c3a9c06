"""Train-time and device-time face crops of the same photo are byte-identical.

Training crops come from faceberry.train.crops (the device's FaceDetector + align_face); device crops come
from the device's own path: a FolderSource camera frame through faceberry.device.recognition.pipeline.FacePipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from faceberry.bundle import load_bundle
from faceberry.detector import FaceDetector
from faceberry.device.capture.camera import FolderSource
from faceberry.device.recognition.pipeline import FacePipeline
from faceberry.preprocess import align_face, load_image
from faceberry.train.crops import CropMaker
from tests.conftest import need_shared

pytestmark = pytest.mark.shared


def _device_crops(pipeline: FacePipeline, folder: Path) -> dict[str, np.ndarray]:
    """{photo path: aligned crop of its first face} as the running device would produce them."""
    source = FolderSource(folder)
    source.open()
    out = {}
    try:
        while (frame := source.read()) is not None:
            result = pipeline.process(frame)
            if result.recognitions:
                out[source.origin()] = result.recognitions[0].crop
    finally:
        source.close()
    return out


def test_training_crops_in_the_run_equal_device_pipeline_crops(tiny_run, tiny_bundle, tmp_path):
    """The crops the tiny model was trained on, against the device's camera → pipeline path."""
    with np.load(tiny_run / "crops.npz") as data:
        crops, paths = data["crops"], [str(p) for p in data["paths"]]
    config = json.loads((tiny_run / "config.json").read_text())
    # A few photos per person, copied (not linked) so the FolderSource reads real files.
    chosen = list(range(0, len(paths), max(1, len(paths) // 12)))[:12]
    folder = tmp_path / "frames"
    folder.mkdir()
    names = {}
    for i in chosen:
        src = Path(paths[i])
        dst = folder / f"{i:04d}{src.suffix}"
        shutil.copyfile(src, dst)
        names[str(dst)] = i
    pipeline = FacePipeline(load_bundle(tiny_bundle), min_face_size=config["detector"]["min_face_size"])
    device = _device_crops(pipeline, folder)
    assert set(device) == set(names)
    for path, crop in device.items():
        train_crop = crops[names[path]]
        assert crop.dtype == train_crop.dtype == np.uint8
        assert crop.shape == train_crop.shape
        assert np.array_equal(crop, train_crop), path


@pytest.mark.parametrize("size", [96, 128, 160])
def test_crop_maker_equals_detector_plus_alignment(size, detector_path):
    photos = sorted(need_shared("photos", "scenes").glob("*.jpg"))[:4]
    photos += sorted(need_shared("faces", "five-celebrities", "val").rglob("*.*"))[:4]
    maker = CropMaker(size, detector_path, cache_dir=None, min_face_size=40)
    detector = FaceDetector(detector_path, min_face_size=40)
    compared = 0
    for photo in photos:
        crop, _ = maker.crop_file(photo)
        if crop is None:
            continue
        image = load_image(photo)
        faces = detector.detect(image)
        face = max(faces, key=lambda f: f.width)
        assert np.array_equal(crop, align_face(image, face.keypoints, size)), photo
        compared += 1
    assert compared >= 4


def test_cached_crop_is_identical_to_a_fresh_one(tmp_path, detector_path):
    photo = sorted(need_shared("faces", "lfw-dev", "Jacques_Chirac").glob("*.jpg"))[0]
    cached_maker = CropMaker(128, detector_path, cache_dir=tmp_path)
    first, _ = cached_maker.crop_file(photo)
    again, _ = CropMaker(128, detector_path, cache_dir=tmp_path).crop_file(photo)
    fresh, _ = CropMaker(128, detector_path, cache_dir=None).crop_file(photo)
    assert list(tmp_path.rglob("*.npz"))
    assert np.array_equal(first, fresh) and np.array_equal(again, fresh)
