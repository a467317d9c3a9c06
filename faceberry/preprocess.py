"""The one definition of image preprocessing shared by train/, convert/ and device/.

Reading photos, aligning a detected face to a canonical crop and normalising it for the
network all live here, so a face seen by the Pi is cropped exactly as the training crops were.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from faceberry.errors import UsageError

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
# them: dlib's ResNet embedder (faceberry.train.dlib_resnet) was trained on such chips and loses accuracy on any
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


class ImageError(UsageError, ValueError):
    """A photo or frame that cannot be decoded, or that is refused before decoding.

    `reason` is the message without the path, for reports that list the path beside it.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def _image_error(path: Path, reason: str) -> ImageError:
    return ImageError(f"{path}: {reason}", reason)


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


# The largest image any command decodes. A decoded photo costs 3 bytes a pixel (and its RGB copy is
# made in place), so 40 MP is 120 MB: phone photos (12-50 MP, most under 40) pass, a lying header or
# a decompression bomb is refused before a byte is decoded, which a Pi with 1 GB needs.
MAX_IMAGE_PIXELS = 40_000_000


@functools.cache
def _header_readers() -> tuple[Any, ...]:
    """The formats cv2 decodes (faceberry.contract.OPENCV_SUFFIXES), as Pillow's header readers, most common first.

    Each reads the header only and decodes nothing until asked to. They are used directly rather than
    through Image.open so that Pillow's own decompression-bomb check (a global limit, far above ours) does not
    replace our refusal, which names the claimed size and honours `max_pixels`. Imported at the first image
    file read: a daemon on a live camera never reads one, and Pillow would cost it ~7 MB of memory."""
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin

    return (JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile, WebPImagePlugin.WebPImageFile,
            BmpImagePlugin.BmpImageFile, TiffImagePlugin.TiffImageFile)


# Pillow's TIFF reader warns (Python warnings, on stderr) about each damaged tag it skips while reading a
# header; the refusal, or cv2's decode, already says what is wrong with the file, in the log, once.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


class _OverPillowsLimitError(Exception):
    """A WebP whose header claims more than Pillow's own limit: Pillow refuses it before allocating its canvas."""


def image_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) from the header of a JPEG, PNG, WebP, BMP or TIFF, or None if it has none.

    Only the header is read: this is how a hostile file is refused before cv2 decodes it.
    """
    from PIL import Image

    buffer = io.BytesIO(data if isinstance(data, bytes) else data.tobytes())
    for reader in _header_readers():
        buffer.seek(0)
        try:
            with reader(buffer) as im:
                return im.size
        except Image.DecompressionBombError:
            raise _OverPillowsLimitError from None
        except Exception:  # not this format, or a header cut short: each reader fails in its own way
            continue
    return None


# ISO base media file brands (the `ftyp` box that starts every HEIF and AVIF file): AVIF's, and HEIC/HEIF's.
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def phone_format(data: bytes | np.ndarray) -> str | None:
    """"AVIF" or "HEIC" when the bytes start like such a file (its `ftyp` box names the brand), else None."""
    head = bytes(data[:64]) if not isinstance(data, bytes) else data[:64]
    if len(head) < 16 or head[4:8] != b"ftyp":
        return None
    box = min(max(int.from_bytes(head[:4], "big"), 16), len(head))
    # The major brand, then the compatible brands (a HEIF file may say only `mif1` first and `heic` later).
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, box - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIC"
    return None


def phone_reader(image_format: str) -> str | None:
    """None when this machine can decode `image_format` ("HEIC" or "AVIF"); else the skip reason, with the fix."""
    try:
        from PIL import features
    except ImportError:
        features = None
    if image_format == "HEIC":
        try:
            import pillow_heif
        except ImportError:
            return "HEIC photo: install pillow-heif, or convert to JPEG"
        if features is None:
            return "HEIC photo: install Pillow and pillow-heif, or convert to JPEG"
        pillow_heif.register_heif_opener()  # idempotent: Pillow then opens HEIC/HEIF itself
        return None
    if features is None or not features.check("avif"):
        return "AVIF photo: install Pillow 11.3 or later (pip install 'pillow>=11.3'), or convert to JPEG"
    return None


def _load_phone_photo(path: Path, data: np.ndarray, kind: str, max_pixels: int) -> np.ndarray:
    """A HEIC/HEIF or AVIF photo through Pillow, refused (ImageError with the fix) where it cannot be read."""
    missing = phone_reader(kind)
    if missing is not None:
        raise _image_error(path, missing)
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            width, height = im.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise _image_error(
                    path, f"its header claims {width}×{height} pixels ({width * height / 1e6:.0f} MP), over the "
                    f"{max_pixels / 1e6:.0f} MP limit (resize it)"
                )
            # EXIF rotation as for a JPEG (pillow-heif has applied the file's own rotation and cleared the tag).
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise _image_error(path, f"its header claims more than the {max_pixels / 1e6:.0f} MP limit (resize it)") \
            from None
    except Exception as exc:  # a decoder's own errors on a broken file are of many kinds
        raise _image_error(path, f"cannot decode this {kind} photo (corrupt, or cut short: {type(exc).__name__})") \
            from None


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a photo as RGB uint8 (H, W, 3): EXIF rotation applied, alpha dropped, grey expanded.

    The header is read first: a file that is not a PNG, JPEG, BMP, WebP, TIFF, HEIC/HEIF or AVIF image,
    or that claims more than `max_pixels`, raises ImageError without being decoded. HEIC/HEIF and AVIF go
    through Pillow (faceberry.contract.PHONE_SUFFIXES); without the library the ImageError says what to install.
    """
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    except OSError as exc:
        raise _image_error(path, f"cannot read it ({exc.strerror or exc})") from None
    if data is None or data.size == 0:
        raise _image_error(path, "file missing or empty")
    try:
        size = image_size(data)
    except _OverPillowsLimitError:
        from PIL import Image

        raise _image_error(path, f"its header claims more than {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} MP, over the "
                           f"{max_pixels / 1e6:.0f} MP limit (resize it)") from None
    if size is None:
        kind = phone_format(data)
        if kind is not None:
            return _load_phone_photo(path, data, kind, max_pixels)
        raise _image_error(path, "not a JPEG, PNG, BMP, WebP, TIFF, HEIC or AVIF image, or its header is cut short "
                           "or invalid")
    width, height = size
    if width <= 0 or height <= 0:
        raise _image_error(path, f"its header claims {width}×{height} pixels")
    if width * height > max_pixels:
        raise _image_error(
            path, f"its header claims {width}×{height} pixels ({width * height / 1e6:.0f} MP), over the "
            f"{max_pixels / 1e6:.0f} MP limit (resize it)"
        )
    # IMREAD_COLOR applies EXIF orientation (phone photos), drops alpha and expands greyscale.
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own limits, should a header be read differently from this parser
        bgr = None
    if bgr is None:
        raise _image_error(path, "cannot decode it (not an image, or corrupt)")
    # In place: a second full-size copy would double the peak memory of a large photo.
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)


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
