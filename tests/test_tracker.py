"""IoU tracking and identity by vote: one bad frame does not announce the wrong person."""

from __future__ import annotations

import numpy as np

from device.tracker import Observation, Tracker, iou_matrix, majority


def obs(x: float, label: str, score: float = 0.9, y: float = 0.0) -> Observation:
    return Observation(np.array([x, y, x + 100, y + 100], dtype=np.float32), label, score)


def test_iou_matrix() -> None:
    a = np.array([[0, 0, 10, 10], [100, 100, 110, 110]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10]])
    m = iou_matrix(a, b)
    assert m.shape == (2, 2)
    assert np.isclose(m[0, 0], 1.0) and np.isclose(m[0, 1], 50 / 150) and m[1].max() == 0


def test_majority_breaks_ties_by_mean_score() -> None:
    assert majority([("a", 0.9), ("b", 0.6), ("a", 0.7)]) == ("a", 0.8, 2)
    assert majority([("a", 0.6), ("b", 0.9)])[0] == "b"


def test_identity_is_decided_by_vote_after_n_frames() -> None:
    tracker = Tracker(iou_threshold=0.3, votes_needed=5, max_age=3)
    labels = ["alice", "bob", "alice", "alice", "alice"]  # one misread frame
    decisions = []
    for i, label in enumerate(labels):
        decisions += tracker.update([obs(10 + 2 * i, label, 0.8 if label == "alice" else 0.5)], i)
        if i < 4:
            assert decisions == []  # nothing announced before N frames
    assert len(decisions) == 1
    d = decisions[0]
    assert (d.label, d.frames, d.previous, d.track_id) == ("alice", 5, None, 1)
    assert np.isclose(d.score, 0.8)
    # More frames of the same person: no new event.
    for i in range(5, 15):
        assert tracker.update([obs(20, "alice")], i) == []


def test_a_person_needs_four_of_five_frames_and_a_stranger_named_in_three_stays_unknown() -> None:
    from device.contract import visit_decision

    assert visit_decision([("bob", 0.7)] * 4 + [("unknown", 0.4)])[0] == "bob"
    assert visit_decision([("bob", 0.7)] * 3 + [("unknown", 0.4)] * 2)[:2] == ("unknown", 0.4)
    assert visit_decision([("bob", 0.7)] * 3 + [("ann", 0.8)] * 2)[0] == "unknown"
    tracker = Tracker(votes_needed=5, max_age=3)
    decisions = []
    for i, label in enumerate(["bob", "unknown", "bob", "bob", "unknown"]):
        decisions += tracker.update([obs(10, label, 0.7 if label == "bob" else 0.4)], i)
    assert [d.label for d in decisions] == ["unknown"]
    # Later, 3 of the last 5 frames naming bob do not rename the track; 4 of 5 do.
    for i, label in enumerate(["bob", "unknown", "bob", "bob", "unknown"], start=5):
        assert tracker.update([obs(10, label, 0.7 if label == "bob" else 0.4)], i) == []
    changes = []
    for i in range(10, 14):
        changes += tracker.update([obs(10, "bob", 0.7)], i)
    assert [(d.label, d.previous) for d in changes] == [("bob", "unknown")]


def test_identity_changes_only_when_another_label_persists() -> None:
    tracker = Tracker(votes_needed=3, max_age=5)
    frame = 0
    for _ in range(3):
        tracker.update([obs(0, "unknown", 0.3)], frame)
        frame += 1
    assert tracker.tracks[1].label == "unknown"
    # A single frame of bob is not enough …
    assert tracker.update([obs(0, "bob")], frame) == []
    frame += 1
    assert tracker.update([obs(0, "unknown", 0.3)], frame) == []
    frame += 1
    # … bob in all of the last 3 frames is (VISIT_AGREEMENT: 3 of 3).
    changes = []
    for _ in range(3):
        changes += tracker.update([obs(0, "bob", 0.95)], frame)
        frame += 1
    assert len(changes) == 1
    assert (changes[0].label, changes[0].previous, changes[0].track_id) == ("bob", "unknown", 1)


def test_two_faces_get_two_tracks_and_keep_them_while_moving() -> None:
    tracker = Tracker(votes_needed=2, max_age=2)
    decisions = []
    for i in range(4):
        decisions += tracker.update([obs(300 - 3 * i, "bob"), obs(10 + 3 * i, "alice")], i)
    assert sorted((d.label, d.track_id) for d in decisions) == [("alice", 2), ("bob", 1)]
    assert len(tracker.tracks) == 2


def test_tracks_expire_after_max_age_and_a_return_is_a_new_track() -> None:
    tracker = Tracker(votes_needed=1, max_age=2)
    assert [d.track_id for d in tracker.update([obs(0, "alice")], 0)] == [1]
    tracker.update([], 1)
    tracker.update([], 2)
    assert 1 in tracker.tracks  # unseen for 2 frames: still alive
    tracker.update([], 3)
    assert tracker.tracks == {}
    again = tracker.update([obs(0, "alice")], 4)
    assert [(d.track_id, d.label) for d in again] == [(2, "alice")]


def test_a_face_that_jumps_away_starts_a_new_track() -> None:
    tracker = Tracker(iou_threshold=0.3, votes_needed=1, max_age=5)
    tracker.update([obs(0, "alice")], 0)
    out = tracker.update([obs(500, "alice")], 1)
    assert [d.track_id for d in out] == [2]
