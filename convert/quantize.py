"""Keras model → TFLite (full-integer int8, 16x8, dynamic-range, float16 or float32) via SavedModel export.

int8 weights are quantised per output channel (conv, depthwise and dense: the converter's default, which
convert never turns off); activations per tensor, from the ranges seen on the representative set.

- int8: full-integer, int8 weights and activations (XNNPACK's fast integer kernels).
- int16x8: int8 weights, int16 activations (TFLite's experimental 16x8 mode; float input and output). 256
  times finer activations than int8, but LiteRT runs it on its reference kernels (no XNNPACK).
- dynamic: int8 weights, float activations (dynamic-range quantisation: weights dequantised or activations
  quantised on the fly); no calibration.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

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
