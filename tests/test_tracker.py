"""IoU tracking and identity by vote: one bad frame does not announce the wrong person."""

from __future__ import annotations

import numpy as np

from faceberry.device.recognition.tracker import (
    REVERIFY_EVERY,
    REVERIFY_SCORE_DRIFT,
    REVERIFY_SETTLED,
    Observation,
    Tracker,
    iou_matrix,
    majority,
)


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
    from faceberry.contract import visit_decision

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


# --- re-verification (issue 23): a decided, settled track is embedded only every k frames ------------------

def box(x: float, y: float = 0.0, size: float = 100.0) -> np.ndarray:
    return np.array([x, y, x + size, y + size], dtype=np.float32)


def step(tracker: Tracker, faces: list[tuple[np.ndarray, str, float]], index: int,
         every: int = REVERIFY_EVERY) -> tuple[list, list[bool]]:
    """One frame the way FacePipeline.process and the daemon drive the tracker: plan, embed the faces the
    plan asks for (their label is what the embedder would say), reuse the others' last recognition.
    Returns the decisions and, per face, whether it was embedded."""
    planned = tracker.plan([b for b, _, _ in faces], [s for _, _, s in faces], every)
    observations, embedded = [], []
    for slot, (b, label, _) in zip(planned, faces, strict=True):
        if slot.reuse is None:
            slot.memo = label
            observations.append(Observation(b, label, 0.9))
        else:
            observations.append(Observation(b, slot.reuse, 0.9))
        embedded.append(slot.reuse is None)
    return tracker.update(observations, index), embedded


def test_the_config_default_is_the_trackers() -> None:
    from faceberry.device.config import RecognitionConfig

    assert RecognitionConfig().reverify_every == REVERIFY_EVERY > 1


def test_a_settled_track_is_embedded_every_kth_frame_and_an_undecided_one_every_frame() -> None:
    tracker = Tracker(votes_needed=5, max_age=3)
    settled_after = REVERIFY_SETTLED * 5
    runs = []
    for i in range(60):
        decisions, embedded = step(tracker, [(box(10), "alice", 0.9)], i, every=5)
        runs.append(embedded[0])
        if i == 4:
            assert [d.label for d in decisions] == ["alice"]
    # Every frame until settled (the first 5 decide, then 15 agreeing fresh votes in a row), then every 5th.
    assert all(runs[:settled_after])
    after = runs[settled_after:]
    assert [i for i, e in enumerate(after) if e] == list(range(4, len(after), 5))
    assert sum(runs) == settled_after + (60 - settled_after) // 5
    assert tracker.reasons["reused"] == 60 - sum(runs) and tracker.reasons["every"] == (60 - settled_after) // 5
    track = tracker.tracks[1]
    assert track.hits == 60 and track.reused == 60 - sum(runs) and len(track.recent) == 5


def test_k_of_1_embeds_every_face_on_every_frame() -> None:
    tracker = Tracker(votes_needed=2, max_age=3)
    for i in range(40):
        _, embedded = step(tracker, [(box(10), "alice", 0.9), (box(300), "bob", 0.8)], i, every=1)
        assert embedded == [True, True]


def test_reused_recognitions_never_vote_so_a_decision_cannot_be_made_of_them() -> None:
    tracker = Tracker(votes_needed=5, max_age=3)
    i = 0
    while not tracker.tracks or tracker.tracks[1].streak < REVERIFY_SETTLED * 5:
        step(tracker, [(box(10), "alice", 0.9)], i)
        i += 1
    recent = list(tracker.tracks[1].recent)
    # However often a reused observation says "bob" (say a stale or wrong recognition), it is no vote:
    # only the faces the embedder saw decide.
    for _ in range(REVERIFY_EVERY - 1):
        planned = tracker.plan([box(10)], [0.9])
        assert planned[0].reuse == "alice"
        assert tracker.update([Observation(box(10), "bob", 0.99)], i) == []
        i += 1
    assert list(tracker.tracks[1].recent) == recent and tracker.tracks[1].label == "alice"
    # An undecided track never reuses: its first votes_needed frames are all embedded.
    fresh = Tracker(votes_needed=5, max_age=3)
    for j in range(5):
        assert step(fresh, [(box(10), "carol", 0.9)], j)[1] == [True]


def test_a_disagreeing_vote_sends_the_track_back_to_every_frame_and_a_real_change_is_announced() -> None:
    tracker = Tracker(votes_needed=5, max_age=3)
    i = 0
    while tracker.reasons["reused"] == 0:
        step(tracker, [(box(10), "alice", 0.9)], i)
        i += 1
    # The face in the box is now bob's: the first re-verification sees it, then every frame is embedded
    # until the change is voted on (4 of 5 fresh votes), exactly as without re-verification.
    embedded_at, changes = [], []
    for _ in range(3 * REVERIFY_EVERY):
        decisions, embedded = step(tracker, [(box(10), "bob", 0.9)], i)
        changes += decisions
        if embedded[0]:
            embedded_at.append(i)
        i += 1
    assert [(d.label, d.previous) for d in changes] == [("bob", "alice")]
    first = embedded_at[0]
    assert first - (i - 3 * REVERIFY_EVERY) < REVERIFY_EVERY  # seen at the next re-verification
    assert embedded_at[:5] == list(range(first, first + 5))  # then every frame
    assert changes[0].frames == 4 and tracker.reasons["unsettled"] > 0


def test_a_box_jump_or_a_score_drift_reverifies_at_once() -> None:
    tracker = Tracker(votes_needed=5, max_age=3)
    i = 0
    while tracker.reasons["reused"] == 0:
        step(tracker, [(box(10), "alice", 0.9)], i)
        i += 1
    # Moved by 30% of its width: still the same track (IoU 0.54 > 0.3), but the embedder looks again.
    _, embedded = step(tracker, [(box(40), "alice", 0.9)], i)
    assert embedded == [True] and tracker.reasons["moved"] == 1
    assert step(tracker, [(box(41), "alice", 0.9)], i + 1)[1] == [False]  # a pixel from where it was embedded
    # The detector is suddenly less sure (a hand, a turned head): embedded at once too.
    _, embedded = step(tracker, [(box(41), "alice", 0.9 - REVERIFY_SCORE_DRIFT - 0.05)], i + 2)
    assert embedded == [True] and tracker.reasons["score"] == 1
    assert len(tracker.tracks) == 1


def test_a_plan_for_other_faces_is_ignored_and_every_observation_votes() -> None:
    tracker = Tracker(votes_needed=2, max_age=3)
    tracker.plan([box(10), box(300)], [0.9, 0.9])
    # update() is given other faces than planned (a caller without the pipeline): all are fresh votes.
    decisions = []
    for i in range(2):
        decisions += tracker.update([obs(500, "bob")], i)
    assert [d.label for d in decisions] == ["bob"]


def test_a_face_that_looks_different_in_the_same_place_is_reverified_at_once() -> None:
    from faceberry.device.recognition.tracker import REVERIFY_MIN_LIKENESS

    rng = np.random.default_rng(0)
    alice = rng.normal(size=64)
    alice /= np.linalg.norm(alice)
    tracker = Tracker(votes_needed=5, max_age=3)

    def planned(look: np.ndarray, index: int, label: str = "alice") -> bool:
        slot = tracker.plan([box(10)], [0.9], REVERIFY_EVERY, [look])[0]
        if slot.reuse is None:
            slot.memo = label
        tracker.update([Observation(box(10), label if slot.reuse is None else slot.reuse, 0.9)], index)
        return slot.reuse is None

    i = 0
    while tracker.reasons["reused"] == 0:
        planned(alice, i)
        i += 1
    # Nearly the same picture (correlation above the bound): reused; another face in the same box: embedded.
    noise = rng.normal(size=64)
    noise -= (noise @ alice) * alice
    noise /= np.linalg.norm(noise)
    similar = alice * 0.97 + noise * np.sqrt(1 - 0.97 ** 2)
    other = alice * (REVERIFY_MIN_LIKENESS - 0.1) + noise * np.sqrt(1 - (REVERIFY_MIN_LIKENESS - 0.1) ** 2)
    assert planned(similar, i) is False
    assert planned(other, i + 1, "bob") is True and tracker.reasons["looks"] == 1
