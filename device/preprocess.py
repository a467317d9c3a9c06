"""The one definition of image preprocessing shared by train/, convert/ and device/.

Reading photos, aligning a detected face to a canonical crop and normalising it for the
network all live here, so a face seen by the Pi is cropped exactly as the training crops were.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# Canonical positions (fractions of the crop side) of the right eye, left eye, nose tip and
# mouth centre as BlazeFace orders them (the subject's right eye is on the image's left).
# They are the ArcFace 112×112 template shrunk by 0.9 about the centre: a little forehead and
# chin stay in the crop, which helps ImageNet-initialised backbones, and the face still fills it.
ALIGN_TEMPLATE_NAME = "faceberry-v1"
ALIGN_TEMPLATE = np.array(
    [
        [0.3577, 0.4654],  # right eye (image left)
        [0.6409, 0.4638],  # left eye (image right)
        [0.5002, 0.6265],  # nose tip
        [0.5012, 0.7915],  # mouth centre
    ],
    dtype=np.float64,
)
# The same four BlazeFace points where dlib's face chip (get_face_chip, 150 px, padding 0.25) puts
# them: dlib's ResNet embedder (train.dlib_resnet) was trained on such chips and loses accuracy on any
# other framing. Measured, not designed: the mean position of BlazeFace's keypoints inside dlib's own
# chips of 642 LFW faces (bench/align_template.py re-derives it). A looser crop than faceberry-v1.
DLIB_TEMPLATE_NAME = "dlib-chip-v1"
DLIB_TEMPLATE = np.array(
    [
        [0.3108, 0.3120],  # right eye (image left)
        [0.6873, 0.3152],  # left eye (image right)
        [0.4949, 0.5340],  # nose tip
        [0.4944, 0.7303],  # mouth centre
    ],
    dtype=np.float64,
)
TEMPLATES = {ALIGN_TEMPLATE_NAME: ALIGN_TEMPLATE, DLIB_TEMPLATE_NAME: DLIB_TEMPLATE}
# BlazeFace keypoint indices used for alignment (ears are unreliable off-frontal).
ALIGN_KEYPOINTS = (0, 1, 2, 3)

DEFAULT_INPUT_SIZE = 128


class ImageError(ValueError):
    """A photo or frame that cannot be decoded."""


@dataclass(frozen=True)
class Preprocessing:
    """How a classifier expects its input; stored in every bundle's manifest."""

    input_size: int = DEFAULT_INPUT_SIZE
    color_order: str = "RGB"
    # x_normalised = x * scale + offset  (MobileNetV2: x / 127.5 - 1)
    scale: float = 1.0 / 127.5
    offset: float = -1.0
    alignment: str = ALIGN_TEMPLATE_NAME

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        prep = cls(**data)
        if prep.color_order not in ("RGB", "BGR"):
            raise ValueError(f"color_order must be RGB or BGR, not {prep.color_order!r}")
        if prep.alignment not in TEMPLATES:
            raise ValueError(
                f"alignment {prep.alignment!r} is not known to this version (knows {sorted(TEMPLATES)}); "
                "upgrade faceberry on this machine"
            )
        return prep


def load_image(path: str | Path) -> np.ndarray:
    """Read a photo as RGB uint8 (H, W, 3): EXIF rotation applied, alpha dropped, grey expanded."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None or data.size == 0:
        raise ImageError(f"cannot read {path}: file missing or empty")
    # IMREAD_COLOR applies EXIF orientation (phone photos), drops alpha and expands greyscale.
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"cannot decode {path}: not an image or corrupt")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src → dst (Umeyama).

    Returns a 2×3 matrix for cv2.warpAffine.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1
    rot = u @ d @ vt
    var_s = (s_c**2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ d) / var_s) if var_s > 0 else 1.0
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def template(alignment: str) -> np.ndarray:
    try:
        return TEMPLATES[alignment]
    except KeyError:
        raise ValueError(f"unknown alignment {alignment!r} (knows {sorted(TEMPLATES)})") from None


def alignment_matrix(keypoints: np.ndarray, size: int, alignment: str = ALIGN_TEMPLATE_NAME) -> np.ndarray:
    """The 2×3 matrix taking frame pixels to the aligned crop of side `size`."""
    pts = np.asarray(keypoints, dtype=np.float64)[list(ALIGN_KEYPOINTS)]
    return similarity_transform(pts, template(alignment) * size)


def align_face(
    image: np.ndarray, keypoints: np.ndarray, size: int = DEFAULT_INPUT_SIZE, alignment: str = ALIGN_TEMPLATE_NAME
) -> np.ndarray:
    """Warp the face whose BlazeFace keypoints (6×2, frame pixels) are given into a size×size crop."""
    matrix = alignment_matrix(keypoints, size, alignment)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def normalize(crops: np.ndarray, prep: Preprocessing | None = None) -> np.ndarray:
    """uint8 RGB crop(s) → float32 network input, in the colour order and range `prep` names."""
    prep = prep or Preprocessing()
    x = np.asarray(crops)
    if prep.color_order == "BGR":
        x = x[..., ::-1]
    return x.astype(np.float32) * np.float32(prep.scale) + np.float32(prep.offset)
