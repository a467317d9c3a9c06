"""Does the converted model decide like the float one? Run both on held-out crops and compare.

Each classifier kind's head compares the two its own way (faceberry.heads: `verify`, compare_softmax,
compare_embedding); this module runs the converted model and holds the statistics of the refusal.

The converted model runs through faceberry.runtime.TFLiteModel, the wrapper the Pi itself uses, so
quantisation parameters are read exactly as they will be on the device.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from faceberry.runtime import TFLiteModel


def run_tflite(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Outputs of the .tflite for each normalised input, one at a time (the device's batch of 1)."""
    model = TFLiteModel(path, num_threads=None)
    outs = [model.run(x[None])[0][0] for x in inputs]
    return np.stack(outs).astype(np.float32) if outs else np.zeros((0,), np.float32)


def mcnemar_p(float_only_right: int, converted_only_right: int) -> float:
    """One-sided exact McNemar test: the chance of at least `float_only_right` of the discordant faces going
    the float model's way if neither model were better (each discordant face a fair coin).

    One face of 43 lost and none gained gives 0.5: no evidence of a drop. Eight lost and none gained,
    0.004: a drop."""
    n = float_only_right + converted_only_right
    if n == 0 or float_only_right == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(float_only_right, n + 1)) / 2.0 ** n)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion seen as successes / n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
