"""Faces a fresh clone can test with, without ../shared: the sample photos that ship inside two PyPI wheels.

- Grace Hopper: `grace_hopper.jpg`, in matplotlib's sample data (matplotlib is in requirements-train.txt);
- Eileen Collins: `astronaut.png`, in scikit-image's bundled data (requirements-dev.txt).

One photo per person is too little to train on, so each becomes ten views a camera could produce (a
mirror image, a small roll, nearer/farther, darker/brighter, low JPEG quality): six per person build the
gallery, four are probes. Views of one photo are easier than new photos of the person, so what these
tests can show is that the whole path works end to end on real faces — detector, alignment, the dlib
backbone rebuilt from face-recognition-models' weights (PyPI), calibration, int8 conversion, eval,
enroll, the daemon and MQTT — not how accurate it is (that is bench/'s job, on many people).

The bundle (`public_sample` fixture; this module is a pytest plugin, registered in tests/conftest.py) knows
Grace Hopper only, calibrated with Eileen Collins' gallery views as the negatives folder, so Eileen Collins is
a stranger to it until a test enrols her.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

from tests.plugins.processes import python

KNOWN, STRANGER = "grace_hopper", "eileen_collins"
GALLERY_VIEWS = 6
# (roll in degrees, scale, gamma, mirrored, JPEG quality): the first GALLERY_VIEWS are the gallery.
VIEWS = [
    (0, 1.0, 1.0, False, 95), (0, 1.0, 1.0, True, 95), (6, 1.0, 1.0, False, 90), (-6, 1.0, 1.0, True, 90),
    (0, 0.8, 1.0, False, 90), (0, 1.15, 1.0, True, 90),
    (0, 1.0, 0.7, False, 85), (0, 1.0, 1.4, True, 85), (3, 0.9, 1.0, False, 50), (-3, 1.05, 0.85, True, 70),
]


def source_photos() -> dict[str, Path]:
    """{person: the photo inside an installed wheel}; skips the test when a package is missing."""
    try:
        import matplotlib.cbook
    except ImportError as exc:
        pytest.skip(f"matplotlib is not installed ({exc}): pip install -r requirements-dev.txt")
    try:
        astronaut = Path(str(importlib.resources.files("skimage") / "data" / "astronaut.png"))
    except ModuleNotFoundError as exc:
        pytest.skip(f"scikit-image is not installed ({exc}): pip install -r requirements-dev.txt")
    photos = {KNOWN: Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
              STRANGER: astronaut}
    for person, path in photos.items():
        if not path.is_file():
            pytest.skip(f"{path} ({person}'s sample photo) is missing from its package: reinstall it")
    return photos


def write_views(photo: Path, person: str, gallery: Path, probes: Path) -> None:
    import cv2
    import numpy as np

    image = cv2.imread(str(photo))
    h, w = image.shape[:2]
    for i, (angle, scale, gamma, mirrored, quality) in enumerate(VIEWS):
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        view = cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)
        if mirrored:
            view = np.ascontiguousarray(view[:, ::-1])
        view = np.clip(255.0 * (view / 255.0) ** gamma, 0, 255).astype(np.uint8)
        folder = (gallery if i < GALLERY_VIEWS else probes) / person
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{person}_{i:02d}.jpg"), view, [cv2.IMWRITE_JPEG_QUALITY, quality])


def build(work: Path, backbone: Path) -> dict[str, Path]:
    """gallery/, probes/ (<person>/*.jpg), run/ and bundle/ under `work`, by the user's commands, on the
    session's `backbone` (tests/plugins/bundles.py: `python -m train backbone --arch dlib-resnet`)."""
    from faceberry.models import default_detector_path

    if not default_detector_path().is_file():
        pytest.skip(f"{default_detector_path()} is absent: run `python -m models fetch` first")
    gallery, probes = work / "gallery", work / "probes"
    for person, photo in source_photos().items():
        write_views(photo, person, gallery, probes)
    known = work / "photos"
    known.mkdir()
    (known / KNOWN).symlink_to(gallery / KNOWN)
    python("-m", "train", "--photos", str(known), "--negatives", str(gallery / STRANGER), "--out", str(work / "run"),
           "--backbone", str(backbone), "-q", what="python -m train --backbone", check=True)
    python("-m", "convert", "--run", str(work / "run"), "--out", str(work / "bundle"), "--quiet",
           what="python -m convert", check=True)
    return {"gallery": gallery, "probes": probes, "bundle": work / "bundle", "work": work}


@pytest.fixture(scope="session")
def public_sample(tmp_path_factory: pytest.TempPathFactory, backbone: Path) -> dict[str, Path]:
    """The public sample's views and its int8 embedding bundle (Grace Hopper known, Eileen Collins not)."""
    return build(tmp_path_factory.mktemp("public-sample"), backbone)
