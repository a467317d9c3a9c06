"""Keras model → TFLite (full-integer int8, 16x8, dynamic-range, float16 or float32) via SavedModel export.

int8 weights are quantised per output channel (conv, depthwise and dense: the converter's default, which
convert never turns off); activations per tensor, from the ranges seen on the representative set.

- int8: full-integer, int8 weights and activations (XNNPACK's fast integer kernels).
- int16x8: int8 weights, int16 activations (TFLite's experimental 16x8 mode; float input and output). 256
  times finer activations than int8, but LiteRT runs it on its reference kernels (no XNNPACK).
- dynamic: int8 weights, float activations (dynamic-range quantisation: weights dequantised or activations
  quantised on the fly); no calibration.

The last two are measured by bench/card_path.py and not offered by `convert`: on the card's fine-tune 16x8 took
70 ms a face in LiteRT (int8 1.1 ms, float16 2.3 ms) and dynamic range 4.2 ms, and both changed as many answers
as uncorrected int8. What keeps int8's answers is bias_correct, below.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def representative_samples(train_inputs: np.ndarray, count: int, seed: int = 0,
                           augment: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """`count` normalised training crops for int8 calibration, spread over the set.

    With `augment` (the training augmentation) every crop is used once and augmented copies fill the set
    up to `count`: the activation ranges then cover the rotated, shifted, darker and brighter faces the
    network was trained on and a door camera shows, not only the few well-framed photos."""
    rng = np.random.default_rng(seed)
    if augment is None or len(train_inputs) >= count or len(train_inputs) == 0:
        if len(train_inputs) <= count:
            return train_inputs
        return train_inputs[np.sort(rng.choice(len(train_inputs), size=count, replace=False))]
    picks = rng.choice(len(train_inputs), size=count - len(train_inputs), replace=True)
    extra = [np.asarray(augment(train_inputs[picks[i:i + 64]]), dtype=np.float32) for i in range(0, len(picks), 64)]
    return np.concatenate([train_inputs.astype(np.float32), *extra])


# TFLite builtin ops kept in float by convert_model(float_ops=...): a softmax run's head — the global
# pooling, the dense layer and the softmax — where a weak model's class scores lie a few int8 steps apart.
HEAD_OPS = ("MEAN", "FULLY_CONNECTED", "SOFTMAX")


def convert_model(model, quantization: str, representative: np.ndarray | None = None,
                  float_ops: Sequence[str] = (), per_channel: bool = True) -> bytes:
    """The TFLite flatbuffer of a Keras model taking (N, S, S, 3) float32 input.

    int8 is full-integer (int8 input and output, only integer builtin ops), so the Pi runs it with
    the integer kernels and reads scale/zero point from the tensor details. With `float_ops` (TFLite
    builtin names, e.g. HEAD_OPS) those ops stay float (selective quantisation): int8 input, the rest
    integer, a float output; faceberry.runtime reads either. `per_channel=False` gives one weight scale per
    tensor (only to measure what per-channel buys: bench/card_path.py).
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="faceberry-export-") as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        converter._experimental_disable_per_channel = not per_channel  # no public switch
        if quantization == "int8":
            if representative is None or len(representative) == 0:
                raise ValueError("int8 conversion needs training crops for its representative set")

            def gen() -> Iterator[list[np.ndarray]]:
                for x in representative:
                    yield [x[None].astype(np.float32)]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = gen
            if float_ops:
                return _selective_int8(converter, float_ops)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        elif quantization == "int16x8":
            if representative is None or len(representative) == 0:
                raise ValueError("int16x8 conversion needs training crops for its representative set")
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in representative)
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        elif quantization == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantization == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization != "float32":
            raise ValueError(f"unknown quantization {quantization!r}")
        return converter.convert()


def _selective_int8(converter, float_ops: Sequence[str]) -> bytes:
    """Calibrate, then quantise everything but `float_ops` (what tf.lite.experimental.QuantizationDebugger's
    get_nondebug_quantized_model does with denylisted_ops, without its instrumented debug model)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tflite_convert

    converter._experimental_calibrate_only = True  # the route QuantizationDebugger takes
    calibrated = converter.convert()
    return tflite_convert.mlir_quantize(
        calibrated, disable_per_channel=False, fully_quantize=True, input_data_type=tf.int8,
        output_data_type=tf.float32, denylisted_ops=list(float_ops),
    )


def weight_scales(flatbuffer: bytes) -> dict[str, int]:
    """Of the int8 conv, depthwise and dense weights: how many carry one scale per output channel, how
    many a single scale for the whole tensor (the record that per-channel quantisation was used)."""
    from faceberry.runtime import _interpreter_class

    interpreter_cls, _ = _interpreter_class()
    interpreter = interpreter_cls(model_content=flatbuffer)
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    counts = {"per_channel": 0, "per_tensor": 0, "float": 0}
    for op in interpreter._get_ops_details():  # private, but what LiteRT's own debugger reads
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op["inputs"]) < 2:
            continue
        weights = tensors.get(int(op["inputs"][1]))
        if weights is None:
            continue
        if weights["dtype"] != np.int8:
            counts["float"] += 1
        else:
            scales = weights["quantization_parameters"]["scales"]
            counts["per_channel" if len(scales) > 1 else "per_tensor"] += 1
    return counts


def bias_correct(model, calibration: np.ndarray) -> dict[str, Any]:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019), in place, before int8.

    Rounding a layer's weights to int8 shifts the mean of its outputs; through MobileNetV2's 52 convolutions
    those shifts add up, and a model whose classes lie close together (the card's ImageNet fine-tune) changes a
    quarter of its answers. Layer by layer in network order: fold the batch norm into the conv weights as the
    TFLite converter does, snap them to the symmetric per-channel int8 grid the converter will use (so it
    re-quantises them exactly), and move the mean output change the rounding causes on `calibration` faces
    (run through the layers already corrected) into the batch norm's beta; the dense layers the same way
    into their bias. The float model itself is left to the caller: pass a copy.

    Applies to a model whose backbone is a nested Keras model fed the model's input (faceberry.train.model's
    layout); returns what was done ({"layers": 0, ...} when nothing was)."""
    import time

    import keras

    started = time.monotonic()
    backbone = next((layer for layer in model.layers if isinstance(layer, keras.Model)), None)
    pairs = []
    if backbone is not None and tuple(backbone.input.shape[1:]) == tuple(model.input.shape[1:]):
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization) and len(layer.get_weights()) == 4:
                conv = layer.input._keras_history.operation
                if isinstance(conv, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and not conv.use_bias:
                    pairs.append((conv, layer))
    for conv, bn in pairs:
        gamma, beta, mean, var = bn.get_weights()
        factor = gamma / np.sqrt(var + bn.epsilon)  # what the converter multiplies the weights by
        w = conv.get_weights()[0]
        depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
        per_out = factor.reshape(w.shape[2], w.shape[3]) if depthwise else factor
        safe = np.where(per_out != 0, per_out, 1.0)
        snapped = snap_kernel(w * per_out, depthwise)
        x = _run_eagerly(keras.Model(backbone.input, conv.input), calibration)
        before = _run_eagerly(conv, x).mean(axis=(0, 1, 2))
        conv.set_weights([np.where(per_out != 0, snapped / safe, w).astype(w.dtype)])
        after = _run_eagerly(conv, x).mean(axis=(0, 1, 2))
        bn.set_weights([gamma, beta - factor * (after - before), mean, var])
    dense_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense) and layer.use_bias]
    for dense in dense_layers:
        w, b = dense.get_weights()
        snapped = _snap_per_channel(w)
        x = _run_eagerly(keras.Model(model.input, dense.input), calibration)
        dense.set_weights([snapped, (b - (x @ snapped - x @ w).mean(0)).astype(b.dtype)])
    return {"layers": len(pairs) + len(dense_layers), "faces": len(calibration),
            "seconds": round(time.monotonic() - started, 1)}


def _run_eagerly(layer, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """`layer` on `x` in batches, called directly: Model.predict on 50 new sub-models would trace a tf.function
    for each and TensorFlow warns about the retracing on the user's console."""
    return np.concatenate([np.asarray(layer(x[i:i + batch], training=False)) for i in range(0, len(x), batch)])


def snap_kernel(w: np.ndarray, depthwise: bool = False) -> np.ndarray:
    """A conv, depthwise or dense kernel on the per-channel int8 grid TFLite quantises it to (a depthwise kernel,
    (h, w, in, multiplier), has one scale per input channel and multiplier)."""
    if depthwise:
        return _snap_per_channel(w.reshape(*w.shape[:-2], -1)).reshape(w.shape)
    return _snap_per_channel(w)


def _snap_per_channel(w: np.ndarray) -> np.ndarray:
    """`w` on the symmetric int8 grid with one scale per output channel (the last axis), as TFLite
    quantises conv, depthwise and dense weights: scale = max |w| / 127."""
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.round(w / scale) * scale).astype(w.dtype)
