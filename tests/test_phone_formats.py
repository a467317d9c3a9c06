"""Phone photos (issue 24): HEIC/HEIF and AVIF read on the workstation (pillow-heif, Pillow), refused with the fix
where the library is absent (the Pi), never ignored; one list of photo suffixes for the whole project.

The faces are the public sample's (tests/public_faces.py: photos inside PyPI wheels), so a fresh clone runs these.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from faceberry.contract import IMAGE_SUFFIXES, OPENCV_SUFFIXES, PHONE_SUFFIXES, UNREADABLE
from faceberry.preprocess import ImageError, load_image
from tests.conftest import ROOT
from tests.public_faces import KNOWN, source_photos, write_views

HEIC_FIX = "HEIC photo: install pillow-heif, or convert to JPEG"


def _pillow_heif():
    pillow_heif = pytest.importorskip("pillow_heif", reason="pip install -r requirements-train.txt (pillow-heif)")
    pillow_heif.register_heif_opener()
    return pillow_heif


def save_phone_photo(rgb: np.ndarray, path: Path, quality: int = 95) -> Path:
    """`rgb` as HEIC/HEIF or AVIF, by `path`'s suffix, as a phone would write it."""
    _pillow_heif()
    from PIL import Image, features

    if path.suffix == ".avif" and not features.check("avif"):
        pytest.skip("this Pillow cannot write AVIF: pip install 'pillow>=11.3'")
    Image.fromarray(rgb).save(path, format="AVIF" if path.suffix == ".avif" else "HEIF", quality=quality)
    return path


def _without_pillow_heif(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without pillow-heif: importing it fails."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)


@pytest.mark.parametrize("ext", PHONE_SUFFIXES)
def test_every_phone_suffix_is_read_with_its_true_size_and_colours(ext: str, tmp_path: Path) -> None:
    rgb = np.dstack([np.full((37, 53), v, np.uint8) for v in (240, 120, 10)])
    path = save_phone_photo(rgb, tmp_path / f"photo{ext}")
    out = load_image(path)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).max() <= 12  # lossy, but the channels are in RGB order


def test_a_heic_photo_gives_the_face_crop_its_jpeg_gives(tmp_path: Path, detector_path: Path) -> None:
    from faceberry.train.crops import CropMaker

    photo = source_photos()[KNOWN]
    rgb = load_image(photo)
    heic = save_phone_photo(rgb, tmp_path / "grace.heic")
    maker = CropMaker(112, detector_path, cache_dir=None)
    from_jpeg, why_jpeg = maker.crop_file(photo)
    from_heic, why_heic = maker.crop_file(heic)
    assert why_jpeg is None and why_heic is None, (why_jpeg, why_heic)
    assert np.abs(from_heic.astype(float) - from_jpeg.astype(float)).mean() < 6


def _photos(tmp_path: Path) -> Path:
    """photos/grace/ (six JPEG views and one HEIC view) and photos/phone_only/ (two HEIC views)."""
    views = tmp_path / "views"
    write_views(source_photos()[KNOWN], KNOWN, views, tmp_path / "probes")
    jpegs = sorted((views / KNOWN).glob("*.jpg"))
    photos = tmp_path / "photos"
    (photos / "grace").mkdir(parents=True)
    (photos / "phone_only").mkdir()
    for p in jpegs:
        (photos / "grace" / p.name).symlink_to(p)
    save_phone_photo(load_image(jpegs[0]), photos / "grace" / "from_phone.heic")
    for p in jpegs[1:3]:
        save_phone_photo(load_image(p), photos / "phone_only" / f"{p.stem}.heic")
    return photos


def _gather(photos: Path, out: Path):
    from faceberry.train.cli import build_parser
    from faceberry.train.inputs import collect_inputs, gather_crops

    args = build_parser().parse_args(["--photos", str(photos), "--out", str(out), "--no-cache", "--min-photos", "2",
                                      "--input-size", "112", "-q"])
    people, negatives, _ = collect_inputs(photos, None)
    out.mkdir()
    return people, lambda: gather_crops(args, photos, out, 112, people, negatives)


def test_heic_photos_reach_the_crops(tmp_path: Path, detector_path: Path) -> None:
    _people, gather = _gather(_photos(tmp_path), tmp_path / "run")
    gathered = gather()
    paths = [Path(p).name for p in gathered.people.paths]
    assert "from_phone.heic" in paths
    assert gathered.counts["phone_only"] == 2 and gathered.counts["grace"] == 7
    assert json.loads((tmp_path / "run" / "skipped.json").read_text()) == []


def test_without_pillow_heif_heic_photos_are_listed_with_the_fix_and_a_heic_only_person_stops_training(
    tmp_path: Path, detector_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faceberry.train.errors import TrainError

    photos = _photos(tmp_path)
    _without_pillow_heif(monkeypatch)
    with pytest.raises(ImageError, match=HEIC_FIX):
        load_image(photos / "grace" / "from_phone.heic")
    people, gather = _gather(photos, tmp_path / "run")
    assert len(people["phone_only"]) == 2  # listed as photos, not ignored as an empty folder
    with pytest.raises(TrainError) as err:
        gather()
    message = str(err.value)
    assert "phone_only: 0 of 2" in message and HEIC_FIX in message and "grace" not in message
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert {(Path(s["path"]).name, s["reason"]) for s in skipped} == {
        ("from_phone.heic", f"{UNREADABLE} ({HEIC_FIX})"),
        *((f"{KNOWN}_{i:02d}.heic", f"{UNREADABLE} ({HEIC_FIX})") for i in (1, 2)),
    }


def test_a_person_folder_of_files_faceberry_cannot_read_is_an_error_not_a_silent_drop(tmp_path: Path) -> None:
    from faceberry.train.errors import TrainError
    from faceberry.train.inputs import collect_inputs

    for person, name in (("a", "1.jpg"), ("b", "1.jpg"), ("c", "clip.mov"), ("c", "anim.gif")):
        (tmp_path / person).mkdir(exist_ok=True)
        (tmp_path / person / name).write_bytes(b"x")
    with pytest.raises(TrainError, match=r"c has 2 file\(s\) but no photo faceberry reads \(1 \.gif, 1 \.mov\)"):
        collect_inputs(tmp_path, None)


def test_the_pis_environment_refuses_a_heic_photo_with_the_fix(tmp_path: Path) -> None:
    python = ROOT / ".venv-device" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} is absent: make the Pi's environment (README, install on the Pi) to run this")
    heic = save_phone_photo(np.zeros((20, 30, 3), np.uint8), tmp_path / "x.heic")
    code = ("import sys\nfrom faceberry.preprocess import ImageError, load_image\n"
            "try:\n    load_image(sys.argv[1])\nexcept ImageError as exc:\n    print(exc.reason)\n")
    proc = subprocess.run([str(python), "-c", code, str(heic)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        subprocess.run([str(python), "-c", "import pillow_heif"], check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError:
        assert proc.stdout.strip() == HEIC_FIX
    else:
        assert proc.stdout.strip() == ""  # this Pi environment has pillow-heif after all: the photo was read


def test_one_list_of_photo_suffixes_for_the_whole_project(capsys: pytest.CaptureFixture) -> None:
    import faceberry.device.capture.camera
    import faceberry.device.recognition.enroll
    import faceberry.train.crops
    import faceberry.train.inputs
    from faceberry.train.cli import EPILOG

    assert IMAGE_SUFFIXES == OPENCV_SUFFIXES + PHONE_SUFFIXES and {".heic", ".heif", ".avif"} <= set(IMAGE_SUFFIXES)
    assert faceberry.train.crops.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert faceberry.train.inputs.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert faceberry.device.capture.camera.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert ", ".join(IMAGE_SUFFIXES) == faceberry.device.recognition.enroll.SUFFIXES
    assert all(s in EPILOG for s in IMAGE_SUFFIXES)
    # No second, hand-written list: every other module filters photos through faceberry.contract.
    res = subprocess.run(["git", "grep", "-n", "-E", r"suffix(\.lower\(\))? in \(|glob\(\"\*\.(jpg|jpeg|png)\"\)",
                          "--", "*.py"], cwd=ROOT, capture_output=True, text=True)
    hits = [line for line in res.stdout.splitlines() if not line.startswith("tests/")]
    assert not hits, f"photo suffixes filtered outside faceberry.contract: {hits}"


def test_the_demo_gives_the_daemon_a_png_for_a_phone_photo(tmp_path: Path) -> None:
    """The demo's daemon and `device eval` run in the Pi's environment (no pillow-heif): a HEIC sample photo
    reaches their folders as a PNG of the same pixels, a JPEG as itself."""
    import cv2

    import demo

    rgb = load_image(source_photos()[KNOWN])
    heic = save_phone_photo(rgb, tmp_path / "grace.heic")
    name = demo.copy_for_device(heic, tmp_path / "00001")
    assert name == "00001.png"
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(tmp_path / name)), cv2.COLOR_BGR2RGB), load_image(heic))
    jpeg = source_photos()[KNOWN]
    assert demo.copy_for_device(jpeg, tmp_path / "00002") == "00002.jpg"
    assert (tmp_path / "00002.jpg").read_bytes() == jpeg.read_bytes()
