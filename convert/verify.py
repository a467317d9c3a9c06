"""Does the converted model decide like the float one? Run both on held-out crops and compare.

The converted model runs through device.runtime.TFLiteModel, the wrapper the Pi itself uses, so
quantisation parameters are read exactly as they will be on the device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from device.contract import UNKNOWN, accept_all, best_class, best_match, l2_normalize
from device.runtime import TFLiteModel


def run_tflite(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Outputs of the .tflite for each normalised input, one at a time (the device's batch of 1)."""
    model = TFLiteModel(path, num_threads=None)
    outs = [model.run(x[None])[0][0] for x in inputs]
    return np.stack(outs).astype(np.float32) if outs else np.zeros((0,), np.float32)


def softmax_decisions(probs: np.ndarray, labels: list[str], threshold: float) -> list[str]:
    return accept_all(*best_class(probs, labels), threshold)


def gallery_decisions(emb: np.ndarray, gallery: np.ndarray, gallery_labels: list[str],
                      threshold: float) -> tuple[list[str], list[str]]:
    """(decision, nearest) per embedding: nearest gallery entry by cosine, unknown below threshold."""
    if len(emb) == 0 or len(gallery) == 0:
        return [UNKNOWN] * len(emb), [UNKNOWN] * len(emb)
    nearest, scores = best_match(emb, l2_normalize(gallery), gallery_labels)
    return accept_all(nearest, scores, threshold), nearest


def _pick(values: list[str], mask: np.ndarray) -> list[str]:
    return [v for v, m in zip(values, mask, strict=True) if m]


def _acc(pred: list[str], truth: list[str]) -> float | None:
    return float(np.mean([p == t for p, t in zip(pred, truth, strict=True)])) if truth else None


def paired_counts(float_pred: list[str], converted_pred: list[str], truth: list[str]) -> dict[str, int]:
    """Face by face: how many only the float model gets right, and how many only the converted one.

    The faces both get right or both get wrong say nothing about a difference between the two models
    (McNemar); the accuracy drop is (float_only_right - converted_only_right) / faces."""
    f_right = [p == t for p, t in zip(float_pred, truth, strict=True)]
    q_right = [p == t for p, t in zip(converted_pred, truth, strict=True)]
    return {"faces": len(truth),
            "float_only_right": sum(f and not q for f, q in zip(f_right, q_right, strict=True)),
            "converted_only_right": sum(q and not f for f, q in zip(f_right, q_right, strict=True))}


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


def compare_softmax(float_out: np.ndarray, q_out: np.ndarray, truth: list[str], labels: list[str],
                    threshold: float, is_val: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and accuracy on validation faces; decision agreement on validation + strangers."""
    f_top = [labels[i] for i in np.argmax(float_out, axis=1)]
    q_top = [labels[i] for i in np.argmax(q_out, axis=1)]
    val_truth = [t for t, v in zip(truth, is_val, strict=True) if v]
    f_val = [p for p, v in zip(f_top, is_val, strict=True) if v]
    q_val = [p for p, v in zip(q_top, is_val, strict=True) if v]
    f_dec = softmax_decisions(float_out, labels, threshold)
    q_dec = softmax_decisions(q_out, labels, threshold)
    return {
        "faces": int(is_val.sum()),
        "faces_with_strangers": len(truth),
        "paired": paired_counts(f_val, q_val, val_truth),
        "top1_agreement": _acc(q_val, f_val),
        "float_accuracy": _acc(f_val, val_truth),
        "converted_accuracy": _acc(q_val, val_truth),
        "decision_agreement": _acc(q_dec, f_dec),
        "max_abs_prob_diff": float(np.max(np.abs(float_out - q_out))) if len(truth) else None,
    }


def compare_embedding(float_out: np.ndarray, q_out: np.ndarray, truth: list[str], gallery: np.ndarray,
                      gallery_labels: list[str], threshold: float, is_val: np.ndarray) -> dict[str, Any]:
    """Same accept/reject and person through the gallery; plus the float↔converted cosine."""
    f_dec, f_near = gallery_decisions(float_out, gallery, gallery_labels, threshold)
    q_dec, q_near = gallery_decisions(q_out, gallery, gallery_labels, threshold)
    val_truth = [t for t, v in zip(truth, is_val, strict=True) if v]
    cos = np.sum(l2_normalize(float_out) * l2_normalize(q_out), axis=1) if len(truth) else np.zeros(0)
    return {
        "faces": int(is_val.sum()),
        "faces_with_strangers": len(truth),
        "paired": paired_counts(_pick(f_near, is_val), _pick(q_near, is_val), val_truth),
        "top1_agreement": _acc(_pick(q_near, is_val), _pick(f_near, is_val)),
        "decision_agreement": _acc(q_dec, f_dec),
        # The gate is the nearest person: the device's threshold is re-fitted on the converted embedder
        # (convert.build._device_gallery), and a strict threshold puts validation faces near it, where a
        # float↔int8 wobble of 1e-3 would count as a quantization loss it is not.
        "float_accuracy": _acc(_pick(f_near, is_val), val_truth),
        "converted_accuracy": _acc(_pick(q_near, is_val), val_truth),
        "float_accept_accuracy": _acc([p for p, v in zip(f_dec, is_val, strict=True) if v], val_truth),
        "converted_accept_accuracy": _acc([p for p, v in zip(q_dec, is_val, strict=True) if v], val_truth),
        "float_decision_accuracy": _acc(f_dec, truth),
        "converted_decision_accuracy": _acc(q_dec, truth),
        "mean_cosine": float(np.mean(cos)) if len(cos) else None,
        "min_cosine": float(np.min(cos)) if len(cos) else None,
    }
