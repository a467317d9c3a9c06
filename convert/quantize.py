"""Keras model → TFLite (full-integer int8, float16 or float32) via SavedModel export."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def representative_samples(train_inputs: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to `count` normalised training crops, spread over the set, for int8 calibration."""
    if len(train_inputs) <= count:
        return train_inputs
    rng = np.random.default_rng(seed)
    return train_inputs[np.sort(rng.choice(len(train_inputs), size=count, replace=False))]


def convert_model(model, quantization: str, representative: np.ndarray | None = None) -> bytes:
    """The TFLite flatbuffer of a Keras model taking (N, S, S, 3) float32 input.

    int8 is full-integer (int8 input and output, only integer builtin ops), so the Pi runs it with
    the integer kernels and reads scale/zero point from the tensor details.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="faceberry-export-") as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if quantization == "int8":
            if representative is None or len(representative) == 0:
                raise ValueError("int8 conversion needs training crops for its representative set")

            def gen() -> Iterator[list[np.ndarray]]:
                for x in representative:
                    yield [x[None].astype(np.float32)]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = gen
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        elif quantization == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization != "float32":
            raise ValueError(f"unknown quantization {quantization!r}")
        return converter.convert()
