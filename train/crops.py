"""Photos → aligned face crops, made with the device's own detector and alignment.

Every crop comes from faceberry.detector.FaceDetector + faceberry.preprocess.align_face, so the network
is trained on exactly what the Pi will show it. Results are cached per photo, keyed by the photo's
content and every setting that changes the crop, so a second run over the same folder is fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import faceberry.detector
import faceberry.preprocess
from faceberry.contract import (
    DOMINANCE,
    MIN_REFERENCE_PHOTOS,
    UNREADABLE,
    choose_subject,
    list_images,
    subject_candidates,
)
from faceberry.contract import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from faceberry.contract import NO_FACE as NO_FACE
from faceberry.contract import SEVERAL_FACES as SEVERAL_FACES
from faceberry.contract import TOO_SMALL as TOO_SMALL
from faceberry.contract import UNKNOWN as UNKNOWN
from faceberry.detector import FaceDetector
from faceberry.preprocess import ALIGN_TEMPLATE_NAME, ImageError, align_face, load_image, phone_reader
from faceberry.runtime import ModelError
from faceberry.train.progress import progress_bar

log = logging.getLogger(__name__)

# Bump when the crop-making logic changes so stale cache entries are ignored.
CACHE_VERSION = 2


@dataclass
class Candidates:
    """A photo's faces of similar size (faceberry.contract.subject_candidates), widest first, for
    resolve_subjects to choose among by the person's other photos."""

    crops: np.ndarray  # uint8 (K, S, S, 3)
    widths: np.ndarray  # (K,) face widths, pixels
    offsets: np.ndarray  # (K,) distance of each face's centre from the photo's, as a share of its diagonal


@dataclass
class CropSet:
    crops: np.ndarray  # uint8 (N, S, S, 3) RGB aligned faces
    labels: list[str]  # person per crop
    paths: list[str]  # source photo per crop
    skipped: list[dict[str, str]] = field(default_factory=list)  # {path, reason, label}
    # Photos with several faces of similar size: (label, path, their candidates), until resolve_subjects.
    ambiguous: list[tuple[str, str, Candidates]] = field(default_factory=list)

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
        from faceberry.models import default_detector_path

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
            b"".join(Path(mod.__file__).read_bytes() for mod in (faceberry.detector, faceberry.preprocess))
        ).hexdigest()
        settings = {
            "code": code_hash,
            "v": CACHE_VERSION, "size": self.input_size, "min_face": self.min_face_size,
            "score": self.score_threshold, "align": alignment, "detector": detector_hash,
            "dominance": DOMINANCE,
            # A phone photo refused for want of a library is read once the library is installed.
            "phone": [phone_reader("HEIC") is None, phone_reader("AVIF") is None],
        }
        self._settings_key = json.dumps(settings, sort_keys=True).encode()

    def _key(self, data: bytes) -> str:
        return hashlib.sha256(self._settings_key + hashlib.sha256(data).digest()).hexdigest()

    def crop_image(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(crop, None) or (None, skip reason) for an RGB image."""
        crop, reason, _ = self.crop_candidates(image)
        return crop, reason

    def crop_candidates(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None, Candidates | None]:
        """(crop, None, None); or (None, SEVERAL_FACES, the candidates); or (None, skip reason, None)."""
        faces, reason = subject_candidates(self.detector.detect(image), self.min_face_size)
        if not faces:
            return None, reason, None
        crops = np.stack([align_face(image, f.keypoints, self.input_size, self.alignment) for f in faces])
        if reason is None:
            return crops[0], None, None
        h, w = image.shape[:2]
        centre = np.array([w / 2.0, h / 2.0])
        offsets = [float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2.0 - centre) / np.hypot(w, h)) for f in faces]
        return None, reason, Candidates(crops, np.array([f.width for f in faces], np.float32),
                                        np.array(offsets, np.float32))

    def crop_file(self, path: Path) -> tuple[np.ndarray | None, str | None]:
        """(crop, None) or (None, skip reason); an unreadable or refused file is named in one log line."""
        crop, reason, _ = self.crop_file_candidates(path)
        return crop, reason

    def crop_file_candidates(self, path: Path) -> tuple[np.ndarray | None, str | None, Candidates | None]:
        """crop_candidates for a photo file, through the cache; an unreadable file is named in one log line."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("skipping %s: cannot read it (%s)", path, exc.strerror or exc)
            return None, f"{UNREADABLE} ({exc.strerror or exc})", None
        key = self._key(data)
        cached = self._cache_get(key)
        if cached is None:
            try:
                image = load_image(path)
            except ImageError as exc:
                cached = (None, f"{UNREADABLE} ({exc.reason})", None)
            else:
                cached = self.crop_candidates(image)
            self._cache_put(key, cached)
        reason = cached[1]
        if reason and reason.startswith(UNREADABLE):
            # Said on every run, cached or not: a hostile or broken photo is named and the batch goes on.
            log.warning("skipping %s: %s", path, reason)
        return cached

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.npz" if self.cache_dir else None

    def _cache_get(self, key: str) -> tuple[np.ndarray | None, str | None, Candidates | None] | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                reason = str(data["reason"])
                crop = data["crop"]
                widths, offsets = data["widths"], data["offsets"]
        except (OSError, KeyError, ValueError):
            return None  # a damaged entry is simply recomputed
        side = (self.input_size, self.input_size, 3)
        if reason and len(widths):
            if crop.shape[1:] != side or crop.dtype != np.uint8 or not len(crop) == len(widths) == len(offsets):
                return None
            return None, reason, Candidates(crop, widths, offsets)
        if reason:
            return None, reason, None
        if crop.shape != side or crop.dtype != np.uint8:
            return None
        return crop, None, None

    def _cache_put(self, key: str, result: tuple[np.ndarray | None, str | None, Candidates | None]) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        crop, reason, cands = result
        empty = np.zeros((0,), np.float32)
        if cands is not None:
            crop = cands.crops
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, crop=crop if crop is not None else np.zeros((0,), np.uint8), reason=np.array(reason or ""),
                     widths=cands.widths if cands is not None else empty,
                     offsets=cands.offsets if cands is not None else empty)
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
    choose_later: bool = False,
) -> CropSet:
    """Aligned crops for every image (faceberry.contract.IMAGE_SUFFIXES) in `photos_dir/<person>/`.

    `files` overrides the folder scan ({label: photos}); skipped photos are listed with a reason. A photo
    with several faces of similar size is skipped too, unless `choose_later`: then its candidate faces are
    kept in `ambiguous` for resolve_subjects.
    """
    maker = maker or CropMaker(input_size, detector_path, cache_dir, min_face_size=min_face_size)
    people = files if files is not None else list_people(Path(photos_dir))
    todo = [(label, p) for label, paths in people.items() for p in paths]
    bar = progress_bar(len(todo), f"face crops ({Path(photos_dir).name})", "photo", enabled=progress and bool(todo))
    crops, labels, paths, skipped = [], [], [], []
    ambiguous: list[tuple[str, str, Candidates]] = []
    for label, path in todo:
        crop, reason, cands = maker.crop_file_candidates(path)
        if cands is not None and choose_later:
            ambiguous.append((label, str(path), cands))
        elif crop is None:
            skipped.append({"path": str(path), "label": label, "reason": reason or "unknown"})
        else:
            crops.append(crop)
            labels.append(label)
            paths.append(str(path))
        bar.update()
    bar.close()
    size = maker.input_size
    array = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return CropSet(array, labels, paths, skipped, ambiguous)


def resolve_subjects(crop_set: CropSet, embed) -> dict[str, int]:
    """Each ambiguous photo's subject chosen by identity consistency (faceberry.contract.choose_subject), in place:
    a chosen face joins its person's crops, the rest go to `skipped` with the reason. `embed`: crops → embeddings
    (the backbone's, as the gallery makes them), or None to refuse them all (the fine-tune path has no
    embedder). Returns {"chosen": n, "refused": n}."""
    chosen: list[tuple[str, str, np.ndarray]] = []
    refused = 0
    labels = np.array(crop_set.labels)
    by_person: dict[str, list[tuple[str, Candidates]]] = defaultdict(list)
    for label, path, cands in crop_set.ambiguous:
        by_person[label].append((path, cands))
    for label, photos in by_person.items():
        mine = np.flatnonzero(labels == label)
        if embed is None or len(mine) < MIN_REFERENCE_PHOTOS:
            why = ("no face recognizer on this path to tell which face is the person's (train with --backbone)"
                   if embed is None else
                   f"fewer than {MIN_REFERENCE_PHOTOS} of the person's photos show one clear face")
            for path, _ in photos:
                crop_set.skipped.append({"path": path, "label": label,
                                         "reason": f"{SEVERAL_FACES} ({why})"})
            refused += len(photos)
            continue
        own = embed(crop_set.crops[mine])
        everyone = embed(np.concatenate([c.crops for _, c in photos]))
        start = 0
        for path, cands in photos:
            k = len(cands.crops)
            index, how = choose_subject(everyone[start:start + k], own, cands.widths, cands.offsets)
            start += k
            if index is None:
                crop_set.skipped.append({"path": path, "label": label, "reason": how})
                refused += 1
            else:
                chosen.append((label, path, cands.crops[index]))
    if chosen:
        crop_set.crops = np.concatenate([crop_set.crops, np.stack([c for _, _, c in chosen])])
        crop_set.labels += [label for label, _, _ in chosen]
        crop_set.paths += [path for _, path, _ in chosen]
    crop_set.ambiguous = []
    return {"chosen": len(chosen), "refused": refused}


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
