"""The `unknown` threshold: the lowest softmax score at which a face is accepted as a known person
such that no more than a target fraction of strangers (false accepts) get through."""

from __future__ import annotations

from typing import Any

import numpy as np

from faceberry.contract import UNKNOWN, accept_all, accept_scores, best_class, threshold_for_far


def decisions(probs: np.ndarray, labels: list[str], threshold: float) -> list[str]:
    """The device's rule (faceberry.contract.accept) on a batch of softmax probabilities."""
    best, scores = best_class(probs, labels)
    return accept_all(best, scores, threshold)


def _accept_scores(probs: np.ndarray, labels: list[str]) -> np.ndarray:
    """Score at which each probe would be accepted; -inf when its best class is `unknown`."""
    return accept_scores(*best_class(probs, labels))


def calibrate(
    val_probs: np.ndarray,
    val_labels: list[str],
    neg_probs: np.ndarray,
    labels: list[str],
    target_far: float,
) -> dict[str, Any]:
    """Pick the accept threshold and report what it does on validation and stranger faces.

    Strangers are the held-out negative faces. Without any, the impostors are validation faces
    the model would name as the wrong person (a misidentification is a false accept too).
    """
    val_probs = np.asarray(val_probs, dtype=np.float64).reshape(-1, len(labels))
    neg_probs = np.asarray(neg_probs, dtype=np.float64).reshape(-1, len(labels))
    val_scores = _accept_scores(val_probs, labels) if len(val_probs) else np.zeros(0)
    truth = np.array(val_labels)
    predicted = np.array([labels[i] for i in np.argmax(val_probs, axis=1)]) if len(val_probs) else np.array([])
    wrong = (predicted != truth) & (truth != UNKNOWN) if len(truth) else np.zeros(0, bool)
    if len(neg_probs):
        impostors, basis = _accept_scores(neg_probs, labels), "negative faces"
    else:
        impostors, basis = np.where(wrong, val_scores, -np.inf), "validation misidentifications"
    threshold = threshold_for_far(impostors, target_far) if len(impostors) else 0.0
    known = truth != UNKNOWN
    accepted_right = (val_scores >= threshold) & ~wrong & known
    result: dict[str, Any] = {
        "accept": threshold,
        "target_far": target_far,
        "basis": basis,
        "impostors": len(impostors),
        "far": float(np.mean(impostors >= threshold)) if len(impostors) else None,
        "known_accept_rate": float(accepted_right.sum() / max(known.sum(), 1)) if len(truth) else None,
        "misidentification_rate": float(np.mean((val_scores >= threshold) & wrong)) if len(truth) else None,
    }
    if len(neg_probs):
        result["stranger_far"] = result["far"]
    return result
