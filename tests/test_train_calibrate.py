"""The accept threshold and the negatives split (pure functions, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from faceberry.contract import threshold_for_far as _threshold_for
from faceberry.train.calibrate import calibrate, decisions
from faceberry.train.trainer import split_negatives

LABELS = ["alice", "bob", "unknown"]


def test_threshold_lets_through_at_most_the_target_share_of_strangers():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.3, 1.0, 200)
    for target in (0.0, 0.01, 0.05, 0.2):
        t = _threshold_for(scores, target)
        assert np.mean(scores >= t) <= target + 1e-12
        # …and it is the lowest such threshold: one step down lets one more through.
        below = np.sort(scores)[::-1][int(np.floor(target * len(scores)))]
        assert np.mean(scores >= below) > target
    assert _threshold_for(np.array([-np.inf, -np.inf]), 0.0) == 0.0  # all rejected anyway


def test_calibrate_on_strangers_and_the_device_rule():
    val = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.45, 0.5, 0.05]])
    val_truth = ["alice", "bob", "bob", "bob"]
    # Strangers: one confidently wrong, some mild, one the model calls unknown.
    neg = np.array([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    cal = calibrate(val, val_truth, neg, LABELS, target_far=0.25)
    assert cal["basis"] == "negative faces" and cal["impostors"] == 4
    assert 0.5 < cal["accept"] <= 0.95  # only the 0.95 stranger may pass
    assert cal["far"] == pytest.approx(0.25) and cal["stranger_far"] == cal["far"]
    # Known faces accepted as the right person at that threshold: alice (0.9) and bob (0.7).
    assert cal["known_accept_rate"] == pytest.approx(2 / 4)
    # bob at 0.6 looks like alice: above the threshold, a misidentification the report counts.
    assert decisions(val, LABELS, cal["accept"]) == ["alice", "bob", "alice", "unknown"]
    assert cal["misidentification_rate"] == pytest.approx(1 / 4)
    # A face whose best class is `unknown` is never accepted, whatever the threshold.
    assert decisions(np.array([[0.1, 0.1, 0.8]]), LABELS, 0.0) == ["unknown"]


def test_calibrate_without_strangers_uses_misidentifications():
    val = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    truth = ["a", "a", "b", "b"]  # the last one is a misidentification at 0.6
    cal = calibrate(val, truth, np.zeros((0, 2)), ["a", "b"], target_far=0.0)
    assert cal["basis"] == "validation misidentifications"
    assert 0.6 < cal["accept"] <= 0.7
    assert cal["misidentification_rate"] == 0.0
    assert cal["known_accept_rate"] == pytest.approx(3 / 4)


def test_negatives_split_by_person_when_there_are_several():
    groups = [f"negatives/p{i // 3}" for i in range(30)]  # 10 people × 3 photos
    tr, held = split_negatives(groups, 0.5, seed=0)
    train_people = {groups[i] for i in tr}
    held_people = {groups[i] for i in held}
    assert train_people.isdisjoint(held_people)  # calibration strangers were never trained on
    assert len(train_people) == 5 and len(held_people) == 5
    assert sorted(np.concatenate([tr, held]).tolist()) == list(range(30))
    # One loose folder: split by photo.
    tr, held = split_negatives(["unknown"] * 10, 0.5, seed=0)
    assert len(tr) == 5 and len(held) == 5
