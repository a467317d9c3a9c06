"""Recent faces, kept in state_dir so a face can be named or corrected after it was seen.

One folder per decided track, `<state_dir>/faces-<device_id>/<event_id>/`: up to `memory.crops_per_face`
JPEG crops of the frame around the face with a wide margin (so `device enroll`'s detector finds the face
again), `embeddings.npy` (the classifier's output for those frames) and `face.json` (label, score, track,
bundle, stranger_id, time), written last: a folder without it is an interrupted write and is removed.
Bounded by count (`memory.max_faces`) and age (`memory.max_age`); `forget` removes everything.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from faceberry.device.memory.locked import locked
from faceberry.device.messaging.dispatcher import FrameDone
from faceberry.statefile import DamagedFileError, RateLimitedLog, describe_error, set_aside, write_atomic

log = logging.getLogger(__name__)

META = "face.json"
EMBEDDINGS = "embeddings.npy"
# Margin around the face box, as a fraction of its size on each side: the detector needs context.
MARGIN = 0.6


def crop_with_margin(image: np.ndarray, box: Sequence[float], margin: float = MARGIN) -> np.ndarray:
    """The part of an RGB frame around `box` [x1, y1, x2, y2], grown by `margin` × its size on each side."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
    right, bottom = min(w, int(np.ceil(x2 + mx))), min(h, int(np.ceil(y2 + my)))
    return np.ascontiguousarray(image[top:max(bottom, top + 1), left:max(right, left + 1)])


@dataclass
class StoredFace:
    event_id: str
    label: str
    score: float
    track_id: int
    bundle_id: str
    at: float  # Unix time
    stranger_id: str | None
    folder: Path

    @property
    def crops(self) -> list[Path]:
        return sorted(self.folder.glob("crop_*.jpg"))

    def embeddings(self) -> np.ndarray:
        return np.load(self.folder / EMBEDDINGS)


def read_face(folder: Path) -> StoredFace:
    """One stored face; DamagedFileError naming what is wrong (its face.json or embeddings.npy)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedFileError(f"{META} is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise DamagedFileError(f"{META} is not JSON: {exc.msg}") from exc
    except RecursionError as exc:
        raise DamagedFileError(f"{META} is nested too deeply") from exc
    except IsADirectoryError as exc:
        raise DamagedFileError(f"{META} is a directory") from exc
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{META} is not an object")
    try:
        face = StoredFace(str(meta["event_id"]), str(meta["label"]), float(meta["score"]), int(meta["track_id"]),
                          str(meta["bundle_id"]), float(meta["at"]), meta.get("stranger_id"), folder)
    except KeyError as exc:
        raise DamagedFileError(f"{META} has no {exc.args[0]!r}") from exc
    except (ValueError, TypeError, OverflowError) as exc:
        raise DamagedFileError(f"{META} has a value of the wrong type ({exc})") from exc
    if not (math.isfinite(face.score) and math.isfinite(face.at)):
        raise DamagedFileError(f"{META} has a score or time that is not finite")
    if face.stranger_id is not None and not isinstance(face.stranger_id, str):
        raise DamagedFileError(f"{META} has a stranger_id that is not text")
    try:
        with open(folder / EMBEDDINGS, "rb") as fh:  # np.load given a path leaves it open on a refusal
            vectors = np.load(fh, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DamagedFileError(f"no {EMBEDDINGS}") from exc
    except OSError:
        raise
    except Exception as exc:
        # numpy's reader meets a damaged header with whatever its parser raises (ValueError, EOFError, a
        # pickle refused, tokenize's TokenError, SyntaxError, MemoryError for an absurd shape).
        raise DamagedFileError(f"{EMBEDDINGS} is unreadable ({describe_error(exc)})") from exc
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or not vectors.size or vectors.dtype.kind != "f":
        raise DamagedFileError(f"{EMBEDDINGS} is not a 2-D float array")
    if not np.all(np.isfinite(vectors)):
        raise DamagedFileError(f"{EMBEDDINGS} holds NaN or infinite values")
    return face


class FaceStore:
    def __init__(self, root: Path, max_faces: int = 50, max_age: float = 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.max_faces = int(max_faces)
        self.max_age = float(max_age)
        self.clock = clock
        self._failures = RateLimitedLog(log)
        # The frame loop adds faces while the command runner's thread reads, removes and forgets them.
        self.lock = threading.RLock()
        if (root.exists() or root.is_symlink()) and not root.is_dir():
            set_aside(root, "a file where the folder of recent faces should be",
                      "the recent faces it held cannot be named or corrected")
        self.root.mkdir(parents=True, exist_ok=True)
        self._faces: dict[str, StoredFace] = {}
        damaged: list[str] = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            if not (entry / META).exists():  # an interrupted write: never finished, nothing lost
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                face = read_face(entry)
            except (OSError, DamagedFileError) as exc:
                # Removed, not set aside: these are face photos, kept at most memory.max_age by design;
                # a copy set aside would outlive that promise.
                damaged.append(f"{entry.name} ({describe_error(exc)})")
                shutil.rmtree(entry, ignore_errors=True)
                continue
            self._faces[face.event_id] = face
        if damaged:
            log.warning("%s: %d stored faces were damaged and are removed (they can no longer be named or "
                        "corrected): %s; the daemon goes on", self.root, len(damaged),
                        "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""))
        self.prune()

    @locked
    def add(self, *, event_id: str, label: str, score: float, track_id: int, bundle_id: str,
            crops: Sequence[np.ndarray], embeddings: np.ndarray, stranger_id: str | None = None,
            at: float | None = None) -> StoredFace | None:
        """Store one decided face (RGB crops, their embeddings); None when nothing could be written."""
        safe = "".join(c for c in event_id if c.isalnum() or c == "-")[:64]
        vectors = np.atleast_2d(np.asarray(embeddings, np.float32))
        if not safe or not len(crops):
            return None
        if not vectors.size or not np.all(np.isfinite(vectors)):
            self._failures.fail("nan", f"the face of event {event_id} has embeddings that are not finite (NaN or "
                                "infinite): not stored; if this repeats, check the bundle")
            return None
        folder = self.root / safe
        at = self.clock() if at is None else at
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(crops):
                ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
                if ok:
                    (folder / f"crop_{i:02d}.jpg").write_bytes(jpeg.tobytes())
            np.save(folder / EMBEDDINGS, vectors)
            meta = {"event_id": event_id, "label": label, "score": round(float(score), 4), "track_id": int(track_id),
                    "bundle_id": bundle_id, "at": at, "stranger_id": stranger_id}
            write_atomic(folder / META, json.dumps(meta) + "\n")  # last, and whole: it marks the folder done
        except OSError as exc:
            # At every event while the disk is full: one line per kind, not one per face.
            self._failures.fail("write", f"cannot store the face of event {event_id} in {folder}: "
                                f"{describe_error(exc)}; it cannot be named or corrected; check the free space "
                                "in state_dir")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        self._failures.ok("write", f"recent faces are stored again in {self.root}")
        face = StoredFace(event_id, label, float(score), int(track_id), bundle_id, at, stranger_id, folder)
        self._faces[event_id] = face
        self.prune()
        return face

    @locked
    def prune(self) -> int:
        """Drop faces older than max_age, then the oldest beyond max_faces; returns how many went."""
        now = self.clock()
        ordered = sorted(self._faces.values(), key=lambda f: f.at)
        expired = [f for f in ordered if now - f.at > self.max_age]
        kept = [f for f in ordered if now - f.at <= self.max_age]
        expired += kept[:max(0, len(kept) - self.max_faces)]
        for face in expired:
            self.remove(face.event_id)
        return len(expired)

    @locked
    def remove(self, event_id: str) -> bool:
        face = self._faces.pop(event_id, None)
        if face is not None:
            shutil.rmtree(face.folder, ignore_errors=True)
        return face is not None

    @locked
    def forget(self, stranger_id: str | None = None) -> int:
        """Remove every stored face (or a stranger's); returns how many."""
        gone = [f.event_id for f in self._faces.values() if stranger_id is None or f.stranger_id == stranger_id]
        for event_id in gone:
            self.remove(event_id)
        return len(gone)

    @locked
    def get(self, event_id: str) -> StoredFace | None:
        return self._faces.get(event_id)

    @locked
    def last(self, label: str | None = None, exclude: str | None = None) -> StoredFace | None:
        """The most recent face (with `label`, or whose label is not `exclude`)."""
        faces = [f for f in self._faces.values()
                 if (label is None or f.label == label) and (exclude is None or f.label != exclude)]
        return max(faces, key=lambda f: f.at, default=None)

    @locked
    def of_stranger(self, stranger_id: str) -> list[StoredFace]:
        return sorted((f for f in self._faces.values() if f.stranger_id == stranger_id), key=lambda f: f.at)

    def __len__(self) -> int:
        return len(self._faces)

    def summary(self) -> dict[str, Any]:
        return {"faces": len(self._faces), "root": str(self.root)}


class FaceMemory:
    """The dispatcher's subscriber that stores every decided face (after the stranger memory named it), so
    a command can name or correct it later."""

    def __init__(self, store: FaceStore) -> None:
        self.store = store

    def frame(self, msg: FrameDone) -> None:
        for decided in msg.decided:
            event = decided.event
            regions = [s.region for s in decided.samples if s.region is not None]
            vectors = [s.vector for s in decided.samples if s.vector is not None]
            if regions and vectors:
                self.store.add(event_id=event["event_id"], label=event["label"], score=event["score"],
                               track_id=event["track_id"], bundle_id=event["model"], crops=regions,
                               embeddings=np.stack(vectors), stranger_id=event.get("stranger_id"))
