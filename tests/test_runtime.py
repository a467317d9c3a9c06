"""faceberry.runtime: LiteRT wrapper reads quantisation from tensor details and outputs by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from faceberry.runtime import ModelError, TFLiteModel


def _int8_two_output_model(tmp_path: Path) -> tuple[Path, object, np.ndarray]:
    tf = pytest.importorskip("tensorflow")
    keras = tf.keras
    rng = np.random.default_rng(0)
    inp = keras.Input((8,), name="x")
    hidden = keras.layers.Dense(16, activation="relu")(inp)
    # Two outputs of different widths and ranges: if outputs were read by index in the wrong
    # order, shapes and values would not line up with the Keras model.
    small = keras.layers.Dense(3, name="small")(hidden)
    big = keras.layers.Dense(5, name="big")(hidden)
    model = keras.Model(inp, {"small": small, "big": big * 10.0})
    data = rng.normal(size=(64, 8)).astype(np.float32)

    saved = tmp_path / "saved"
    model.export(str(saved), input_signature=[tf.TensorSpec([1, 8], tf.float32)], verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([row[None]] for row in data)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path = tmp_path / "two.tflite"
    path.write_bytes(converter.convert())
    return path, model, data


def test_int8_model_matches_float_and_outputs_are_named(tmp_path: Path) -> None:
    path, model, data = _int8_two_output_model(tmp_path)
    tfl = TFLiteModel(path)
    assert tfl.input_dtype == np.int8
    assert tfl.backend in ("ai_edge_litert", "tflite_runtime")
    for row in data[:8]:
        got = tfl.run_named(row[None])
        want = {k: np.asarray(v) for k, v in model(row[None]).items()}
        assert set(got) == {"small", "big"}
        for name in ("small", "big"):
            assert got[name].dtype == np.float32
            assert got[name].shape == want[name].shape
            span = float(np.abs(want[name]).max()) + 1e-6
            # int8 error is a few quantisation steps of the output's range, not more.
            assert np.abs(got[name] - want[name]).max() < 0.08 * span + 0.05


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        TFLiteModel(tmp_path / "nope.tflite")


def test_corrupt_model_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(ModelError, match=r"bad\.tflite"):
        TFLiteModel(bad)
