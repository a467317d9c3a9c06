"""Photos → aligned face crops, made with the device's own detector and alignment.

Every crop comes from device.detector.FaceDetector + device.preprocess.align_face, so the network
is trained on exactly what the Pi will show it. Results are cached per photo, keyed by the photo's
content and every setting that changes the crop, so a second run over the same folder is fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import device.detector
import device.preprocess
from device.contract import DOMINANCE, UNREADABLE, list_images, subject_face
from device.contract import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from device.contract import NO_FACE as NO_FACE
from device.contract import SEVERAL_FACES as SEVERAL_FACES
from device.contract import TOO_SMALL as TOO_SMALL
from device.contract import UNKNOWN as UNKNOWN
from device.detector import FaceDetector
from device.preprocess import ALIGN_TEMPLATE_NAME, ImageError, align_face, load_image
from device.runtime import ModelError

log = logging.getLogger(__name__)

# Bump when the crop-making logic changes so stale cache entries are ignored.
CACHE_VERSION = 1


@dataclass
class CropSet:
    crops: np.ndarray  # uint8 (N, S, S, 3) RGB aligned faces
    labels: list[str]  # person per crop
    paths: list[str]  # source photo per crop
    skipped: list[dict[str, str]] = field(default_factory=list)  # {path, reason, label}

    def __len__(self) -> int:
        return len(self.labels)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "faceberry" / "crops"


def list_photos(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (sorted, hidden files ignored)."""
    return list_images(folder)


def list_people(photos_dir: Path) -> dict[str, list[Path]]:
    """{person: photos} for every sub-folder of photos_dir (empty folders included, as [])."""
    if not photos_dir.is_dir():
        raise FileNotFoundError(f"photos folder not found: {photos_dir}")
    return {d.name: list_photos(d) for d in sorted(photos_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}


class _Progress:
    """A plain one-line progress bar on stderr (no dependency; quiet when not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        # On a terminal the bar appears at once; in a log the first line waits for the first interval,
        # so a fast run writes only its final line.
        self.last = -1.0 if self.tty else self.start

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = done >= self.total
        # On a terminal redraw often; in a log print a line every few seconds.
        if not final and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(now - self.start, 1e-6)
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} ({rate:.1f}/s)"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        if final and self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


class CropMaker:
    """Detect + align one photo, with an on-disk cache of the result (crop or skip reason)."""

    def __init__(
        self,
        input_size: int,
        detector_path: str | Path | None = None,
        cache_dir: str | Path | None = None,
        min_face_size: int = 40,
        score_threshold: float = 0.5,
        alignment: str = ALIGN_TEMPLATE_NAME,
    ) -> None:
        from models import default_detector_path

        self.detector_path = Path(detector_path) if detector_path else default_detector_path()
        if not self.detector_path.is_file():
            raise ModelError(f"face detector not found: {self.detector_path}; run `python -m models fetch`")
        self.input_size = int(input_size)
        self.alignment = alignment
        self.min_face_size = int(min_face_size)
        self.score_threshold = float(score_threshold)
        # min_face_size is applied here, not in the detector, so "too small" can be told from "no face".
        self.detector = FaceDetector(self.detector_path, score_threshold=score_threshold, min_face_size=0)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        detector_hash = hashlib.sha256(self.detector_path.read_bytes()).hexdigest()
        # The device code that decodes boxes and warps crops is part of the key too: after an
        # upgrade that changes either, cached crops would no longer match what the Pi computes.
        code_hash = hashlib.sha256(
            b"".join(Path(mod.__file__).read_bytes() for mod in (device.detector, device.preprocess))
        ).hexdigest()
        settings = {
            "code": code_hash,
            "v": CACHE_VERSION, "size": self.input_size, "min_face": self.min_face_size,
            "score": self.score_threshold, "align": alignment, "detector": detector_hash,
            "dominance": DOMINANCE,
        }
        self._settings_key = json.dumps(settings, sort_keys=True).encode()

    def _key(self, data: bytes) -> str:
        return hashlib.sha256(self._settings_key + hashlib.sha256(data).digest()).hexdigest()

    def crop_image(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(crop, None) or (None, skip reason) for an RGB image."""
        face, reason = subject_face(self.detector.detect(image), self.min_face_size)
        if face is None:
            return None, reason
        return align_face(image, face.keypoints, self.input_size, self.alignment), None

    def crop_file(self, path: Path) -> tuple[np.ndarray | None, str | None]:
        """(crop, None) or (None, skip reason); an unreadable or refused file is named in one log line."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("skipping %s: cannot read it (%s)", path, exc.strerror or exc)
            return None, f"{UNREADABLE} ({exc.strerror or exc})"
        key = self._key(data)
        cached = self._cache_get(key)
        if cached is None:
            try:
                image = load_image(path)
            except ImageError as exc:
                cached = (None, f"{UNREADABLE} ({exc.reason})")
            else:
                cached = self.crop_image(image)
            self._cache_put(key, cached)
        reason = cached[1]
        if reason and reason.startswith(UNREADABLE):
            # Said on every run, cached or not: a hostile or broken photo is named and the batch goes on.
            log.warning("skipping %s: %s", path, reason)
        return cached

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.npz" if self.cache_dir else None

    def _cache_get(self, key: str) -> tuple[np.ndarray | None, str | None] | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                reason = str(data["reason"])
                crop = data["crop"]
        except (OSError, KeyError, ValueError):
            return None  # a damaged entry is simply recomputed
        if reason:
            return None, reason
        if crop.shape != (self.input_size, self.input_size, 3) or crop.dtype != np.uint8:
            return None
        return crop, None

    def _cache_put(self, key: str, result: tuple[np.ndarray | None, str | None]) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        crop, reason = result
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, crop=crop if crop is not None else np.zeros((0,), np.uint8), reason=np.array(reason or ""))
            os.replace(tmp, path)
        except OSError:
            pass  # the cache is an optimisation; a read-only disk must not stop training


def build_crop_set(
    photos_dir: str | Path,
    input_size: int,
    detector_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    min_face_size: int = 40,
    maker: CropMaker | None = None,
    files: dict[str, list[Path]] | None = None,
) -> CropSet:
    """Aligned crops for every image (device.contract.IMAGE_SUFFIXES) in `photos_dir/<person>/`.

    `files` overrides the folder scan ({label: photos}); skipped photos are listed with a reason.
    """
    maker = maker or CropMaker(input_size, detector_path, cache_dir, min_face_size=min_face_size)
    people = files if files is not None else list_people(Path(photos_dir))
    todo = [(label, p) for label, paths in people.items() for p in paths]
    bar = _Progress(len(todo), f"face crops ({Path(photos_dir).name})", progress)
    crops, labels, paths, skipped = [], [], [], []
    for i, (label, path) in enumerate(todo, 1):
        crop, reason = maker.crop_file(path)
        if crop is None:
            skipped.append({"path": str(path), "label": label, "reason": reason or "unknown"})
        else:
            crops.append(crop)
            labels.append(label)
            paths.append(str(path))
        bar.update(i)
    size = maker.input_size
    array = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return CropSet(array, labels, paths, skipped)


def split_per_person(labels: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each person's crops shuffled with `seed`, round(n × val_fraction) to val.

    Every person with two or more crops keeps at least one crop on each side.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    train_idx, val_idx = [], []
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return np.array(sorted(train_idx), dtype=int), np.array(sorted(val_idx), dtype=int)


def summarize_skips(skipped: list[dict[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in skipped:
        counts[item["reason"].split(" (")[0]] += 1
    return dict(sorted(counts.items()))
