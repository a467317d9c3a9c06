"""The distillation teacher: dlib's ResNet face embedder, run on our own aligned crops.

The teacher is the 128-d face descriptor of dlib (`dlib_face_recognition_resnet_model_v1`,
trained by Davis King on about 3 million faces; 99.38% on LFW verification) with dlib's 5-point
landmark model to place its face chip. Both files come from the `face-recognition-models` package
(0.3.0): its LICENSE file is **CC0 1.0 Universal** and its README says the models are "licensed in
the public domain or under CC0 1.0 Universal" (the wheel's metadata field says "MIT license", which
contradicts the LICENSE file it ships; either way reuse is unrestricted). dlib itself comes from
`dlib-bin` (Boost Software License). Only the 5-point predictor is used: the 68-point one in the
same package was trained on iBUG 300-W, whose terms exclude commercial use.

The teacher runs only on the workstation (it is slow: ~0.1–0.3 s a face on one x86 core); the
device never sees it. It is fed exactly the aligned crop the student sees (faceberry.preprocess
alignment), padded by replicating its border so dlib's chip (150×150, padding 0.25) has room, with
the 5-point predictor run on the crop's own rectangle. Outputs are L2-normalised and cached on
disk, keyed by a hash of the exact pixels fed in, so augmented views are labelled once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from faceberry.errors import EXIT_USAGE, UnavailableError

log = logging.getLogger(__name__)

TEACHER_ID = "dlib_face_recognition_resnet_model_v1+shape_predictor_5_face_landmarks (face-recognition-models 0.3.0)"
TEACHER_LICENCE = (
    "CC0-1.0 (face-recognition-models LICENSE file; models by Davis King, public domain / CC0); "
    "dlib runtime: Boost Software License 1.0"
)
TEACHER_DIM = 128
INSTALL_HINT = "install the teacher with `pip install -r requirements-train.txt` (dlib-bin, face-recognition-models)"


class TeacherUnavailableError(UnavailableError):
    """dlib or the model files are missing; the message says how to install them."""

    # A package that is not installed is a setup to fix, not an outage to wait out (faceberry/errors.py).
    exit_code = EXIT_USAGE


def crop_key(crop: np.ndarray) -> str:
    """A stable key for exactly these pixels (shape included)."""
    arr = np.ascontiguousarray(crop, dtype=np.uint8)
    digest = hashlib.sha1(str(arr.shape).encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


class Teacher:
    """dlib's face embedder on aligned uint8 RGB crops → L2-normalised float32 (128,)."""

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as exc:
            raise TeacherUnavailableError(f"the backbone teacher needs dlib ({exc}); {INSTALL_HINT}") from exc
        try:
            self._shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
            self._net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        except RuntimeError as exc:
            raise TeacherUnavailableError(f"cannot load dlib's face models ({exc}); {INSTALL_HINT}") from exc
        self._dlib = dlib

    def embed(self, crop: np.ndarray) -> np.ndarray:
        crop = np.asarray(crop, dtype=np.uint8)
        if crop.ndim != 3 or crop.shape[2] != 3:
            raise ValueError(f"teacher expects an RGB crop (S,S,3), got {crop.shape}")
        h, w = crop.shape[:2]
        pad = max(h, w) // 4
        big = np.ascontiguousarray(np.pad(crop, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
        rect = self._dlib.rectangle(pad, pad, pad + w - 1, pad + h - 1)
        shape = self._shape(big, rect)
        desc = np.asarray(self._net.compute_face_descriptor(big, shape, 0, 0.25), dtype=np.float32)
        return desc / max(float(np.linalg.norm(desc)), 1e-12)


class RebuiltTeacher:
    """The same dlib network, rebuilt in Keras (faceberry.train.dlib_resnet), labelling crops in batches.

    It is fed the crop itself, resized to 150 px: with the student's crops aligned by `dlib-chip-v1`
    that is exactly the chip dlib's network was trained on, and no landmark model is needed. Batched
    TensorFlow instead of dlib's one-face-at-a-time CPU path: tens of times faster on a CPU, and it
    runs on a GPU, which is what distilling from a large face set needs.
    """

    batch_size = 64

    def __init__(self) -> None:
        from faceberry.train.dlib_resnet import DlibModelError, build_keras, default_weights_path, read_weights

        try:
            self._model = build_keras(read_weights(default_weights_path()))
        except DlibModelError as exc:
            raise TeacherUnavailableError(f"{exc}; {INSTALL_HINT}") from exc

    def embed_batch(self, crops: np.ndarray) -> np.ndarray:
        import cv2

        from faceberry.preprocess import normalize
        from faceberry.train.dlib_resnet import INPUT_SIZE

        crops = np.asarray(crops, dtype=np.uint8)
        if crops.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            crops = np.stack([cv2.resize(c, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR) for c in crops])
        # build_keras takes faceberry.preprocess's default normalisation (x / 127.5 - 1).
        out = self._model.predict(normalize(crops), batch_size=self.batch_size, verbose=0)
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def embed(self, crop: np.ndarray) -> np.ndarray:
        return self.embed_batch(np.asarray(crop)[None])[0]


TEACHERS = ("rebuilt", "dlib")
# Cache keys per teacher: the two see different chips (dlib's own keys came first, without a prefix).
_CACHE_PREFIX = {"dlib": "", "rebuilt": "rebuilt:"}
_TEACHER_CLASS: dict[str, type[Teacher] | type[RebuiltTeacher]] = {"dlib": Teacher, "rebuilt": RebuiltTeacher}


class TeacherCache:
    """Teacher embeddings on disk: one .npz of keys and vectors, appended to as views are labelled."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._data: dict[str, np.ndarray] = {}
        if self.path and self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    for key, vec in zip(data["keys"], data["embeddings"], strict=True):
                        self._data[str(key)] = vec.astype(np.float32)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("ignoring unreadable teacher cache %s (%s)", self.path, exc)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> np.ndarray | None:
        return self._data.get(key)

    def put(self, key: str, vec: np.ndarray) -> None:
        self._data[key] = np.asarray(vec, dtype=np.float32)

    def save(self) -> None:
        if not self.path or not self._data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._data), dtype="<U64")
        emb = np.stack(list(self._data.values())).astype(np.float32)
        # Write beside and rename, so an interrupted run never leaves a truncated cache.
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, keys=keys, embeddings=emb)
        os.replace(tmp, self.path)


def label_crops(
    crops: np.ndarray,
    cache: TeacherCache,
    teacher: Teacher | RebuiltTeacher | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    save_every: int = 200,
    kind: str = "dlib",
) -> np.ndarray:
    """Teacher embeddings (N,128) for uint8 crops (N,S,S,3), computing only what the cache lacks.

    The teacher is created only when something is missing, so a fully cached run needs no dlib.
    `kind` picks the teacher ("dlib": dlib itself with its landmark model on the padded crop;
    "rebuilt": the Keras rebuild fed the crop as it is); the two see different chips, so their
    cache entries are kept apart.
    """
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher {kind!r} (choose from {TEACHERS})")
    prefix = _CACHE_PREFIX[kind]
    out = np.zeros((len(crops), TEACHER_DIM), dtype=np.float32)
    missing = []
    for i, crop in enumerate(crops):
        key = prefix + crop_key(crop)
        vec = cache.get(key)
        if vec is None:
            missing.append((i, key))
        else:
            out[i] = vec
    if not missing:
        return out
    teacher = teacher or _TEACHER_CLASS[kind]()
    t0 = time.perf_counter()
    step = getattr(teacher, "batch_size", 1) * 8 if hasattr(teacher, "embed_batch") else 1
    done = 0
    for start in range(0, len(missing), step):
        chunk = missing[start : start + step]
        if hasattr(teacher, "embed_batch"):
            vecs = teacher.embed_batch(crops[[i for i, _ in chunk]])
        else:
            vecs = [teacher.embed(crops[i]) for i, _ in chunk]
        for (i, key), vec in zip(chunk, vecs, strict=True):
            out[i] = vec
            cache.put(key, vec)
        done += len(chunk)
        if done % save_every < len(chunk):
            cache.save()
        if progress:
            progress(done, len(missing), time.perf_counter() - t0)
    cache.save()
    return out
