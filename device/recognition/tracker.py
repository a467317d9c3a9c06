"""Per-face tracking across frames (IoU) and identity by vote.

A single frame can misrecognise a face (motion blur, a turned head). A track therefore collects the
labels of its first `votes_needed` frames and decides by faceberry.contract.visit_decision (a person is
named only when faceberry.contract.VISIT_AGREEMENT of those frames, 4 of 5, named them, else `unknown`);
afterwards it changes identity only when another person wins that agreement among its last `votes_needed`
votes (or `unknown` a strict majority of them). Each decision (and each change) is reported once, which is
what becomes an MQTT event.

Re-verification (issue 23): once a track is decided, its face need not be embedded on every frame. Before a
frame's faces are embedded, `plan()` says which of them continue a settled track (decided, and its last
REVERIFY_SETTLED × votes_needed fresh votes all named who it is) that may reuse its last recognition. Such a
face is embedded only on every `reverify_every`-th frame it is seen, and at once when its box jumped (IoU with
the box last embedded below REVERIFY_MIN_IOU), the detector's score drifted (REVERIFY_SCORE_DRIFT) or the
aligned face looks different from the one last embedded (REVERIFY_MIN_LIKENESS). Undecided and unsettled
tracks are embedded on every frame, so first decisions are exactly those of embedding every frame. A reused
recognition keeps its track alive and moves its box but casts no vote: identity is only ever decided, or
changed, by votes from faces the embedder saw, so repeating one recognition can never make up an agreement.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from faceberry.contract import UNKNOWN, visit_agreed, visit_decision

# A settled track's face is embedded afresh on every k-th frame it is seen (recognition.reverify_every; 1 =
# every frame, as before issue 23). 5 cuts a still person's embedder runs about fivefold, and a change the
# triggers below miss (the same face, the same place, the model changing its mind) waits at most 4 frames.
REVERIFY_EVERY = 5
# Embed at once when the box overlaps the box last embedded by less than this (IoU): the face moved by a
# quarter of its width, or grew or shrank by a quarter, since the embedder last saw it.
REVERIFY_MIN_IOU = 0.6
# ... or when the detector's confidence moved by more than this since (a head turning, a hand in front).
REVERIFY_SCORE_DRIFT = 0.1
# ... or when the aligned face looks different from the one last embedded: the correlation of their 16×16
# grey thumbnails (faceberry.device.recognition.pipeline.appearance) below this. Another person's face in the same
# place (a folder
# camera's next photo, a swap at the door) barely moves the box: between two different people of the shared
# LFW photos (aligned crops, 1,200 pairs) the correlation was at most 0.86 (median 0.20), while a still face
# jittered by 2 px (bench/lingering.py) stayed above 0.93 and the man turning his head slowly in the shared
# head-pose clip above 0.96 nine frames apart.
REVERIFY_MIN_LIKENESS = 0.9
# A decided track starts reusing only once this many × votes_needed fresh votes in a row named who it is
# (15 at the default 5 votes). A face the model hesitates on (a head turning, a stranger near the threshold)
# keeps being embedded on every frame: with 1× instead of 3×, a few identity changes that flicker across
# 3–5 frames fell between two re-verifications on the shared head-pose clips and were never announced.
REVERIFY_SETTLED = 3
# Why a face was embedded (Tracker.reasons): a new track, an undecided or unsettled one, the k-th frame,
# its detection score drifted, its box moved, it looks different; "reused" counts the faces not embedded.
REASONS = ("new", "undecided", "unsettled", "every", "score", "moved", "looks", "reused")


@dataclass
class Observation:
    """One recognised face in one frame."""

    box: np.ndarray  # x1, y1, x2, y2 in frame pixels
    label: str
    score: float
    extra: Any = None  # carried to the decision (e.g. the aligned crop for a snapshot)


@dataclass
class Planned:
    """One detected face of the frame being planned (Tracker.plan), in detection order."""

    box: np.ndarray
    detection_score: float
    track_id: int | None  # the track it continues; None: it starts a new one
    look: np.ndarray | None = None  # its appearance signature (unit vector), when the caller gave one
    reuse: Any = None  # the track's last fresh recognition when this frame may reuse it; None: embed the face
    memo: Any = None  # set by the caller to the fresh recognition of an embedded face, for later frames


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
    # Re-verification: the last fresh recognition (Planned.memo), where and how sure the detector was then,
    # and the frames seen since.
    memo: Any = None
    verified_box: np.ndarray | None = None
    verified_score: float = 0.0
    verified_look: np.ndarray | None = None
    since_verified: int = 0
    streak_label: str | None = None  # the label of the last fresh votes, and how many in a row named it
    streak: int = 0
    reused: int = 0  # observations that reused a recognition (no vote)


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
        self._planned: list[Planned] | None = None  # the plan of the frame whose update comes next
        # Faces planned, by outcome: REASONS (embedded, and why) or "reused" (not embedded).
        self.reasons: Counter[str] = Counter()

    def plan(self, boxes: list[np.ndarray], detection_scores: list[float], reverify_every: int = REVERIFY_EVERY,
             looks: list[np.ndarray] | None = None) -> list[Planned]:
        """Before embedding a frame's faces: which may reuse their decided track's last recognition.

        `boxes` and `detection_scores` are the detector's, in the order the observations will be given to
        the next `update()`; `looks` their appearance signatures (unit vectors; None: not compared). A face
        whose `reuse` is set need not be embedded, and is given to `update()` with that recognition's label,
        which then counts as seen but not as a vote. Set `memo` on the others (what a later frame may
        reuse). The plan holds for the next `update()` only.
        """
        pairs, _ = self._match(boxes)
        planned = [Planned(np.asarray(b, dtype=np.float32), float(s), None)
                   for b, s in zip(boxes, detection_scores, strict=True)]
        if looks is not None:
            for slot, look in zip(planned, looks, strict=True):
                slot.look = look
        for track_id, o in pairs:
            track = self.tracks[track_id]
            planned[o].track_id = track_id
            why = self._why_embed(track, planned[o], int(reverify_every))
            if why is None:
                planned[o].reuse = track.memo
                self.reasons["reused"] += 1
            else:
                self.reasons[why] += 1
        self.reasons["new"] += len(planned) - len(pairs)
        self._planned = planned
        return planned

    def _why_embed(self, track: Track, face: Planned, every: int) -> str | None:
        """Why this face of a known track must be embedded now (a REASONS key), or None: it may reuse."""
        if every <= 1:
            return "every"
        if track.label is None or track.memo is None or track.verified_box is None:
            return "undecided"
        # Settled: its last REVERIFY_SETTLED × votes_needed fresh votes all named who it is. Any disagreement
        # sends it back to every frame until they do again.
        if track.streak_label != track.label or track.streak < REVERIFY_SETTLED * self.votes_needed:
            return "unsettled"
        if track.since_verified + 1 >= every:
            return "every"  # the k-th frame since the embedder last saw the face
        if abs(face.detection_score - track.verified_score) > REVERIFY_SCORE_DRIFT:
            return "score"
        if float(iou_matrix(track.verified_box, face.box)[0, 0]) < REVERIFY_MIN_IOU:
            return "moved"
        if (face.look is not None and track.verified_look is not None
                and float(np.dot(face.look, track.verified_look)) < REVERIFY_MIN_LIKENESS):
            return "looks"
        return None

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
        """Feed one frame's faces; returns the identities decided or changed in this frame.

        After `plan()`, the observations are that plan's faces in its order; without one, every
        observation is a fresh vote.
        """
        planned, self._planned = self._planned, None
        if planned is not None and (len(planned) != len(observations) or not all(
                np.array_equal(p.box, np.asarray(o.box, dtype=np.float32))
                for p, o in zip(planned, observations, strict=False))):
            planned = None  # not the faces planned: treat them all as fresh, as without a plan
        pairs, fresh = self._match([o.box for o in observations])
        decisions: list[Decision] = []
        for track_id, o in pairs:
            decision = self._observe(self.tracks[track_id], observations[o], frame_index,
                                     planned[o] if planned is not None else None)
            if decision:
                decisions.append(decision)
        for o in fresh:
            track = Track(self._next_id, np.asarray(observations[o].box, dtype=np.float32), frame_index, frame_index,
                          recent=deque(maxlen=self.votes_needed))
            self._next_id += 1
            self.tracks[track.track_id] = track
            decision = self._observe(track, observations[o], frame_index, planned[o] if planned is not None else None)
            if decision:
                decisions.append(decision)
        for track_id in [t.track_id for t in self.tracks.values() if frame_index - t.last_frame > self.max_age]:
            del self.tracks[track_id]
        return decisions

    def _observe(self, track: Track, obs: Observation, frame_index: int,
                 slot: Planned | None = None) -> Decision | None:
        track.box = np.asarray(obs.box, dtype=np.float32)
        track.last_frame = frame_index
        track.hits += 1
        track.last_extra = obs.extra
        if slot is not None and slot.reuse is not None:
            # A reused recognition: seen, never a vote, whatever track it ends up in (a decision needs faces
            # the embedder saw).
            track.since_verified += 1
            track.reused += 1
            return None
        if slot is not None:
            track.memo = slot.memo
            track.verified_box = slot.box
            track.verified_score = slot.detection_score
            track.verified_look = slot.look
        track.since_verified = 0
        if obs.label == track.streak_label:
            track.streak += 1
        else:
            track.streak_label, track.streak = obs.label, 1
        return self._vote(track, (obs.label, float(obs.score)), obs.extra)

    def _vote(self, track: Track, vote: tuple[str, float], extra: Any) -> Decision | None:
        track.recent.append(vote)
        if track.label is None:
            track.votes.append(vote)
            if len(track.votes) < self.votes_needed:
                return None
            track.label, track.score, _ = visit_decision(track.votes)
            return Decision(track.track_id, track.label, track.score, track.box.copy(), len(track.votes), None,
                            extra)
        if len(track.recent) < self.votes_needed:
            return None
        label, score, count = majority(list(track.recent))
        # A new person needs the same agreement as a first decision; falling back to `unknown` a majority.
        agreed = visit_agreed(count, len(track.recent)) if label != UNKNOWN else count * 2 > len(track.recent)
        if label != track.label and agreed:
            previous, track.label, track.score = track.label, label, score
            track.recent.clear()
            return Decision(track.track_id, label, score, track.box.copy(), count, previous, extra)
        return None

    def active(self) -> list[Track]:
        return list(self.tracks.values())
