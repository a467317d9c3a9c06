"""One wrapper per .tflite model: LiteRT first, tflite_runtime as fallback.

The interpreter is created once; input/output dtypes, scales and zero points are read from the
tensor details, so the same code runs float32, float16 and full-integer int8 models.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.errors import UsageError

log = logging.getLogger(__name__)


class ModelError(UsageError):
    """A model file that cannot be loaded or run; the message names the file and the fix."""


def _interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError as exc:
        raise ModelError(
            "no TFLite runtime found: install one with `pip install ai-edge-litert` "
            "(or `pip install tflite-runtime`)"
        ) from exc


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    if dtype in (np.float32, np.float16):
        return x.astype(dtype)
    scale, zero = detail["quantization"]
    if not scale:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if y.dtype in (np.float32, np.float16):
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    if not scale:
        return y.astype(np.float32)
    return (y.astype(np.float32) - zero) * scale


class TFLiteModel:
    """A loaded .tflite model with float-in/float-out `run`, whatever its quantisation."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        interpreter_cls, self.backend = _interpreter_class()
        try:
            self.interpreter = interpreter_cls(model_path=str(self.path), num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"cannot load {self.path} with {self.backend}: {first}; rebuild it with "
                "`python -m convert` or fetch it again"
            ) from exc
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input tensor, found {len(inputs)}")
        self.input_detail = inputs[0]
        self.output_details = self.interpreter.get_output_details()
        # Output order in the flatbuffer is not guaranteed to follow the signature's order
        # (multi-output int8 models shuffle it), so outputs are addressed by signature name.
        self.output_names: list[str] = []
        signatures = self.interpreter.get_signature_list() if hasattr(self.interpreter, "get_signature_list") else {}
        if signatures:
            sig = next(iter(signatures.values()))
            runner = self.interpreter.get_signature_runner(next(iter(signatures)))
            out_map = runner.get_output_details()
            by_index = {d["index"]: d for d in self.output_details}
            ordered = []
            for name in sig["outputs"]:
                idx = out_map[name]["index"]
                ordered.append(by_index[idx])
                self.output_names.append(name)
            self.output_details = ordered
        else:
            self.output_names = [d["name"] for d in self.output_details]
        log.debug("loaded %s with %s (input %s %s)", self.path.name, self.backend,
                  self.input_detail["shape"], self.input_detail["dtype"].__name__)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.input_detail["shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the first output (the classifier's probabilities or embedding)."""
        return tuple(int(v) for v in self.output_details[0]["shape"])

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.input_detail["dtype"])

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one batch (float32, already normalised); returns the dequantised float32 outputs."""
        self.interpreter.set_tensor(self.input_detail["index"], _quantize(x, self.input_detail))
        self.interpreter.invoke()
        return [_dequantize(self.interpreter.get_tensor(d["index"]), d) for d in self.output_details]

    def run_named(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(x), strict=True))
