"""Bounded, hostile images (issue 11): the header is read first and an image over the pixel limit is
refused with ImageError before a byte of it is decoded; eval, enroll and train skip such a file
with one line and carry on with the good photos beside it.

The hostile files are built here, on the fly: lying headers of every accepted format, and a real
12000×12000 PNG decompression bomb (~0.4 MB on disk, 432 MB decoded).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceberry.contract import OPENCV_SUFFIXES
from faceberry.preprocess import MAX_IMAGE_PIXELS, ImageError, image_size, load_image
from tests.conftest import ROOT, need_shared
from tests.plugins.files import LIARS, png_bomb, png_claiming, webp_claiming


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png_bomb())
    return path


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to cv2.imdecode fails the test: refused files must never reach the decoder."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("cv2.imdecode was called on a file that should have been refused from its header")

    monkeypatch.setattr(cv2, "imdecode", refuse)


def test_a_200_byte_png_claiming_60000_squared_is_refused_from_its_header(tmp_path, no_decoding):
    path = tmp_path / "liar.png"
    path.write_bytes(png_claiming(60000, 60000))
    assert path.stat().st_size < 200
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert "60000×60000" in message and "MP limit" in message and str(path) in message
    assert len(message.splitlines()) == 1
    assert str(path) not in info.value.reason  # the reason alone, for reports that list the path


@pytest.mark.parametrize("fmt", sorted(LIARS))
def test_every_accepted_format_is_refused_when_its_header_claims_too_much(fmt, tmp_path, no_decoding):
    # WebP: 100 MP, over our limit and under Pillow's own (178 MP), which its reader applies before it
    # allocates the canvas; the case above that is the next test.
    side = 10000 if fmt in ("webp",) else 20000
    path = tmp_path / f"liar.{fmt}"
    path.write_bytes(LIARS[fmt](side, side))
    assert image_size(path.read_bytes()) == (side, side)
    with pytest.raises(ImageError, match=f"{side}×{side}"):
        load_image(path)


def test_a_webp_over_pillows_own_limit_is_refused_before_its_canvas_is_allocated(tmp_path, no_decoding):
    path = tmp_path / "liar.webp"
    path.write_bytes(webp_claiming(16000, 16000))  # 256 MP (VP8L stores 14-bit sizes)
    with pytest.raises(ImageError, match=r"its header claims more than 179 MP, over the 40 MP limit \(resize it\)$"):
        load_image(path)


@pytest.mark.parametrize("ext", OPENCV_SUFFIXES)  # phone formats: tests/test_phone_formats.py
def test_every_accepted_suffix_is_read_with_its_true_size(ext, tmp_path):
    img = np.dstack([np.full((37, 53), v, np.uint8) for v in (10, 120, 240)])  # BGR, distinct channels
    path = tmp_path / f"photo{ext}"
    assert cv2.imwrite(str(path), img)
    assert image_size(path.read_bytes()) == (53, 37)
    rgb = load_image(path)
    assert rgb.shape == (37, 53, 3)
    assert abs(int(rgb[0, 0, 0]) - 240) <= 8 and abs(int(rgb[0, 0, 2]) - 10) <= 8  # channels swapped to RGB


def test_the_limit_is_inclusive_and_applies_to_the_header_size(tmp_path):
    path = tmp_path / "photo.png"
    assert cv2.imwrite(str(path), np.zeros((100, 100, 3), np.uint8))
    assert load_image(path, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageError, match="100×100"):
        load_image(path, max_pixels=9_999)
    assert MAX_IMAGE_PIXELS == 40_000_000


@pytest.mark.parametrize("content", [b"GIF89a" + b"\0" * 40, b"\x89PNG\r\n\x1a\n\0\0", b"\xff\xd8\xff\xe0\0\x10JFIF",
                                     b"just some text", b"\0" * 500])
def test_unknown_or_cut_short_headers_are_refused_without_decoding(content, tmp_path, no_decoding):
    path = tmp_path / "odd.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="header"):
        load_image(path)


def test_zero_sized_header_is_refused(tmp_path, no_decoding):
    path = tmp_path / "zero.png"
    path.write_bytes(png_claiming(0, 480))
    # Pillow's PNG reader refuses a zero side as an invalid header.
    with pytest.raises(ImageError, match="header is cut short or invalid"):
        load_image(path)


def test_the_png_bomb_is_refused_with_bounded_memory(bomb):
    """In a fresh process: the peak RSS stays far below the 432 MB the bomb decodes to (it cost 934 MB)."""
    assert bomb.stat().st_size < 1_000_000
    code = (
        "import resource, sys\n"
        "from faceberry.preprocess import ImageError, load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_image(sys.argv[1])\n"
        "except ImageError as exc:\n"
        "    print('refused', exc)\n"
        "print('rss_kb', before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(bomb)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "refused" in proc.stdout and "12000×12000" in proc.stdout
    before, after = (int(v) for v in proc.stdout.split("rss_kb")[1].split())
    assert after - before < 50_000, f"peak RSS grew by {(after - before) / 1024:.0f} MB while refusing the bomb"


# ---------------------------------------------------------------- the commands, beside good photos


def _hostile_beside(good: list[Path], folder: Path, bomb: Path) -> list[str]:
    """Good photos (symlinked) plus a lying PNG and the bomb in `folder`; returns the hostile names."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in good:
        (folder / path.name).symlink_to(path)
    (folder / "liar.png").write_bytes(png_claiming(60000, 60000))
    shutil.copyfile(bomb, folder / "bomb.png")
    return ["liar.png", "bomb.png"]


@pytest.mark.shared
def test_train_skips_hostile_files_with_a_reason_and_keeps_the_good_ones(tmp_path, bomb, detector_path, caplog):
    from faceberry.train.cli import build_parser
    from faceberry.train.trainer import collect_inputs, gather_crops

    lfw = need_shared("faces", "lfw-dev")
    photos = tmp_path / "photos"
    people = sorted(d for d in lfw.iterdir() if d.is_dir())[:2]
    for person in people:
        _hostile_beside(sorted(person.glob("*.jpg"))[:4], photos / person.name, bomb)
    args = build_parser().parse_args(["--photos", str(photos), "--out", str(tmp_path / "run"), "--no-cache",
                                      "--min-photos", "2", "--input-size", "112", "-q"])
    people_files, negatives, _warnings = collect_inputs(photos, None)
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="faceberry.train.crops"):
        gathered = gather_crops(args, photos, tmp_path / "run", 112, people_files, negatives)
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    hostile = {(Path(s["path"]).parent.name, Path(s["path"]).name) for s in skipped if "MP limit" in s["reason"]}
    assert hostile == {(p.name, n) for p in people for n in ("liar.png", "bomb.png")}
    assert all(s["reason"].startswith("unreadable (") for s in skipped if "MP limit" in s["reason"])
    assert sum(gathered.counts.values()) >= 6  # the good photos were all still used (a face or two may miss)
    refused_lines = [r.getMessage() for r in caplog.records if "MP limit" in r.getMessage()]
    assert len(refused_lines) == 4 and all(len(line.splitlines()) == 1 for line in refused_lines)


@pytest.mark.shared
def test_enroll_refuses_hostile_files_and_uses_the_good_ones(tmp_path, bomb, detector_path):
    from faceberry.detector import FaceDetector
    from faceberry.device.recognition.enroll import usable_crops

    person = need_shared("faces", "lfw-dev", "Hugo_Chavez")
    _hostile_beside(sorted(person.glob("*.jpg"))[:3], tmp_path / "photos", bomb)
    crops, refused = usable_crops(sorted((tmp_path / "photos").iterdir()), FaceDetector(detector_path), 112, 40)
    assert len(crops) == 3
    assert sorted(p.name for p, _why in refused) == ["bomb.png", "liar.png"]


@pytest.mark.shared
def test_eval_skips_hostile_files_with_one_line_each(gallery_bundle, heldout_photos, tmp_path, bomb, caplog):
    from faceberry.device.recognition import evaluate

    person = next(d for d in sorted(heldout_photos.iterdir()) if d.is_dir())
    photos = tmp_path / "photos"
    good = sorted(person.iterdir())
    _hostile_beside([p.resolve() for p in good], photos / person.name, bomb)
    out = tmp_path / "eval.json"
    with caplog.at_level(logging.WARNING, logger="faceberry.device.recognition.evaluate"):
        rc = evaluate.main(["--bundle", str(gallery_bundle), "--photos", str(photos), "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert sorted(Path(u["path"]).name for u in result["unreadable"]) == ["bomb.png", "liar.png"]
    assert all("MP limit" in u["reason"] for u in result["unreadable"])
    assert len(result["probes"]) == len(good)
    lines = [r.getMessage() for r in caplog.records if "MP limit" in r.getMessage()]
    assert len(lines) == 2 and all(len(line.splitlines()) == 1 for line in lines)


def test_the_folder_camera_skips_hostile_files_once_and_keeps_going(tmp_path, bomb, caplog):
    from faceberry.device.capture.camera import FolderSource

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        assert cv2.imwrite(str(folder / f"good{i}.jpg"), np.full((48, 64, 3), 60 * (i + 1), np.uint8))
    (folder / "good0b_liar.png").write_bytes(png_claiming(60000, 60000))
    shutil.copyfile(bomb, folder / "good1b_bomb.png")
    source = FolderSource(folder, loop=False)
    source.open()
    with caplog.at_level(logging.WARNING, logger="faceberry.device.capture.camera"):
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
    assert [f.shape for f in frames] == [(48, 64, 3), (48, 64, 3)]
    assert sorted(Path(p).name for p in source.skipped) == ["good0b_liar.png", "good1b_bomb.png"]
    lines = [r.getMessage() for r in caplog.records if "MP limit" in r.getMessage()]
    assert len(lines) == 2 and all(len(line.splitlines()) == 1 for line in lines)
