"""Per-face tracking across frames (IoU) and identity by vote.

A single frame can misrecognise a face (motion blur, a turned head). A track therefore collects the
labels of its first `votes_needed` frames and decides by device.contract.visit_decision (a person is
named only when device.contract.VISIT_AGREEMENT of those frames, 4 of 5, named them, else `unknown`);
afterwards it changes identity only when another person wins that agreement among its last `votes_needed`
frames (or `unknown` a strict majority of them). Each decision (and each
change) is reported once, which is what becomes an MQTT event.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device.contract import UNKNOWN, visit_agreed, visit_decision


@dataclass
class Observation:
    """One recognised face in one frame."""

    box: np.ndarray  # x1, y1, x2, y2 in frame pixels
    label: str
    score: float
    extra: Any = None  # carried to the decision (e.g. the aligned crop for a snapshot)


@dataclass
class Track:
    track_id: int
    box: np.ndarray
    first_frame: int
    last_frame: int
    hits: int = 0
    votes: list[tuple[str, float]] = field(default_factory=list)  # the first votes_needed frames
    recent: deque = field(default_factory=deque)  # the last votes_needed (label, score)
    label: str | None = None  # decided identity, None until votes_needed frames were seen
    score: float = 0.0
    last_extra: Any = None


@dataclass
class Decision:
    """A track's identity was decided (previous is None) or changed (previous is the old label)."""

    track_id: int
    label: str
    score: float
    box: np.ndarray
    frames: int
    previous: str | None
    extra: Any = None


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def majority(votes: list[tuple[str, float]]) -> tuple[str, float, int]:
    """(label, mean score of its votes, count): most votes wins, ties go to the higher mean score."""
    counts = Counter(label for label, _ in votes)
    def mean(label: str) -> float:
        return float(np.mean([s for lab, s in votes if lab == label]))
    label = max(counts, key=lambda lab: (counts[lab], mean(lab)))
    return label, mean(label), counts[label]


class Tracker:
    def __init__(self, iou_threshold: float = 0.3, votes_needed: int = 5, max_age: int = 10) -> None:
        self.iou_threshold = iou_threshold
        self.votes_needed = max(1, int(votes_needed))
        self.max_age = max(0, int(max_age))
        self.tracks: dict[int, Track] = {}
        self._next_id = 1

    def _match(self, boxes: list[np.ndarray]) -> tuple[list[tuple[int, int]], list[int]]:
        """Greedy best-IoU matching: (track_id, observation index) pairs and unmatched observations."""
        ids = list(self.tracks)
        if not ids or not boxes:
            return [], list(range(len(boxes)))
        ious = iou_matrix(np.array([self.tracks[i].box for i in ids]), np.array(boxes))
        pairs: list[tuple[int, int]] = []
        used_t: set[int] = set()
        used_o: set[int] = set()
        for flat in np.argsort(-ious, axis=None):
            t, o = divmod(int(flat), ious.shape[1])
            if ious[t, o] < self.iou_threshold:
                break
            if t in used_t or o in used_o:
                continue
            used_t.add(t)
            used_o.add(o)
            pairs.append((ids[t], o))
        return pairs, [o for o in range(len(boxes)) if o not in used_o]

    def update(self, observations: list[Observation], frame_index: int) -> list[Decision]:
        """Feed one frame's faces; returns the identities decided or changed in this frame."""
        pairs, fresh = self._match([o.box for o in observations])
        decisions: list[Decision] = []
        for track_id, o in pairs:
            decision = self._observe(self.tracks[track_id], observations[o], frame_index)
            if decision:
                decisions.append(decision)
        for o in fresh:
            track = Track(self._next_id, np.asarray(observations[o].box, dtype=np.float32), frame_index, frame_index,
                          recent=deque(maxlen=self.votes_needed))
            self._next_id += 1
            self.tracks[track.track_id] = track
            decision = self._observe(track, observations[o], frame_index)
            if decision:
                decisions.append(decision)
        for track_id in [t.track_id for t in self.tracks.values() if frame_index - t.last_frame > self.max_age]:
            del self.tracks[track_id]
        return decisions

    def _observe(self, track: Track, obs: Observation, frame_index: int) -> Decision | None:
        track.box = np.asarray(obs.box, dtype=np.float32)
        track.last_frame = frame_index
        track.hits += 1
        track.last_extra = obs.extra
        vote = (obs.label, float(obs.score))
        track.recent.append(vote)
        if track.label is None:
            track.votes.append(vote)
            if len(track.votes) < self.votes_needed:
                return None
            track.label, track.score, _ = visit_decision(track.votes)
            return Decision(track.track_id, track.label, track.score, track.box.copy(), len(track.votes), None,
                            obs.extra)
        if len(track.recent) < self.votes_needed:
            return None
        label, score, count = majority(list(track.recent))
        # A new person needs the same agreement as a first decision; falling back to `unknown` a majority.
        agreed = visit_agreed(count, len(track.recent)) if label != UNKNOWN else count * 2 > len(track.recent)
        if label != track.label and agreed:
            previous, track.label, track.score = track.label, label, score
            track.recent.clear()
            return Decision(track.track_id, label, score, track.box.copy(), count, previous, obs.extra)
        return None

    def active(self) -> list[Track]:
        return list(self.tracks.values())
