"""The stranger cohort and the accept threshold calibrated on it.

A household of two has no strangers to calibrate on: scored "each person against the others" it has
a few dozen impostor scores, and in a measured run such a threshold let 30% of strangers' photos be
named as family. The cohort fixes that: embeddings (never photos) of thousands of faces of other
people, made once per backbone (`python -m train cohort`) and carried in every bundle, so training,
`convert`, `device enroll` and any later enrolment all calibrate on the same strangers.

cohort.npz: `embeddings` (N, D) float16, unit length; `identity` (N,) int32 (which cohort person each
face is; the people themselves are not named); `name_hashes` (P,) sha256 hex of each identity's
folder name (device.cohort.same_name), so a household member who is also in the public set can be left out;
`same_person_cosine` (): centroid similarity above which two identities are taken to be one person,
measured on the cohort itself when it was built; `views` (): how each face was embedded
(device.contract.enrolled_views of the backbone: face and mirror image for dlib's ResNet) — absent in
cohorts of earlier releases, which embedded the face alone and are refused where the gallery is
face+mirror.

The threshold rule (calibrate): every cohort face is scored against the gallery like a camera face —
best cosine over the gallery's people — and so are the negatives given at training and every
person's own photos against the *other* people (leave-one-person-out). The accept threshold lets
through at most target_far / STRANGER_MARGIN of those impostor scores: strangers the cohort never
saw score higher than the cohort does, the more so the stricter the rate (bench/household.py's shift
table: asked for 0.25% of the cohort, unseen strangers' photos were accepted up to 1.8× as often),
so the cohort is asked for a stricter rate than the one promised. The margin is not larger because
every bit of it costs the family: asked for 0.1% instead of 0.25%, a household of eight had ~2 points
fewer of its own photos named (docs/BENCHMARKS.md, households; face-only embeddings then).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device.contract import ENROLLED_VIEWS, FACE_ONLY, MIN_IMPOSTOR_SCORES, best_match, l2_normalize, threshold_for_far
from device.errors import UsageError

log = logging.getLogger(__name__)

COHORT_FILE = "cohort.npz"
# The share of strangers' photos a default threshold may accept, and the factor by which the cohort
# is asked to be stricter than that: the largest cohort → unseen-strangers ratio measured at that rate
# (see the module docstring and docs/BENCHMARKS.md).
DEFAULT_TARGET_FAR = 0.005
STRANGER_MARGIN = 2.0


class CohortError(UsageError, ValueError):
    """A cohort file that is missing, corrupt or from another backbone; the message says the fix."""


def same_name(name: str) -> str:
    """A name as folders and datasets spell it alike: `Ada_Lovelace`, `ada lovelace` → `ada lovelace`."""
    return " ".join(name.replace("_", " ").lower().split())


def name_hash(name: str) -> str:
    return hashlib.sha256(same_name(name).encode("utf-8")).hexdigest()


@dataclass
class Cohort:
    embeddings: np.ndarray  # (N, D) float32, unit rows
    identity: np.ndarray  # (N,) int
    name_hashes: list[str]
    same_person_cosine: float
    views: str = ENROLLED_VIEWS

    @property
    def people(self) -> int:
        return len(np.unique(self.identity))

    def __len__(self) -> int:
        return len(self.embeddings)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, embeddings=self.embeddings.astype(np.float16),
                                identity=self.identity.astype(np.int32),
                                name_hashes=np.array(self.name_hashes, dtype=str),
                                same_person_cosine=np.float32(self.same_person_cosine), views=np.str_(self.views))
        tmp.replace(path)

    def without(self, gallery: np.ndarray, names: list[str]) -> tuple[Cohort, int]:
        """The cohort less any identity who is a gallery person (same name, or a centroid as close as one
        person's photos are to each other): their faces are no strangers. Returns (cohort, identities left out)."""
        hashes = {name_hash(n) for n in names}
        drop = {i for i, h in enumerate(self.name_hashes) if h in hashes}
        if len(gallery):
            ids, cents = identity_centroids(self.embeddings, self.identity)
            if len(ids):
                close = np.max(cents @ np.asarray(gallery, np.float32).T, axis=1) >= self.same_person_cosine
                drop.update(int(i) for i in ids[close])
        if not drop:
            return self, 0
        keep = ~np.isin(self.identity, list(drop))
        return Cohort(self.embeddings[keep], self.identity[keep], self.name_hashes, self.same_person_cosine,
                      self.views), len(drop)


def identity_centroids(embeddings: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(identities with two or more faces, their device.contract.centroid rows), in one pass over the faces:
    a per-identity loop costs identities × faces, which for a cohort of thousands runs at every calibration."""
    ids, inverse, counts = np.unique(identity, return_inverse=True, return_counts=True)
    sums = np.zeros((len(ids), embeddings.shape[1]), np.float64)
    np.add.at(sums, inverse, l2_normalize(embeddings))
    multi = counts >= 2
    return ids[multi], l2_normalize(sums[multi] / counts[multi, None])


def build(embeddings: np.ndarray, identities: list[str], views: str = ENROLLED_VIEWS) -> Cohort:
    """A cohort from embeddings made as `views` says and the folder name of each face's person."""
    names = sorted(set(identities))
    index = {n: i for i, n in enumerate(names)}
    ident = np.array([index[n] for n in identities], dtype=np.int32)
    emb = l2_normalize(embeddings)
    # Two different cohort people's centroids are never this close; one person's are (measured on dlib's
    # embedder: different people ≤ 0.961, one person's two halves ≥ 0.992), so halfway to 1 is the line.
    _, cents = identity_centroids(emb, ident)
    if len(cents) >= 2:
        sims = cents @ cents.T
        np.fill_diagonal(sims, -1.0)
        same = (float(sims.max()) + 1.0) / 2.0
    else:
        same = 0.98
    return Cohort(emb, ident, [name_hash(n) for n in names], same, views)


def load(path: str | Path, dim: int | None = None, views: str | None = None) -> Cohort:
    """The cohort at `path`; with `views`, refused unless its faces were embedded that way (as the gallery)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            emb = data["embeddings"].astype(np.float32)
            cohort = Cohort(l2_normalize(emb), data["identity"].astype(np.int64),
                            [str(h) for h in data["name_hashes"]], float(data["same_person_cosine"]),
                            str(data["views"]) if "views" in data.files else FACE_ONLY)
    except (OSError, KeyError, ValueError) as exc:
        raise CohortError(f"{path}: unreadable stranger cohort ({exc}); "
                          "rebuild it with `python -m train cohort`") from exc
    if emb.ndim != 2 or len(cohort.identity) != len(emb) or not np.all(np.isfinite(emb)):
        raise CohortError(f"{path}: malformed stranger cohort; rebuild it with `python -m train cohort`")
    if dim is not None and emb.shape[1] != dim:
        raise CohortError(f"{path}: cohort embeddings are {emb.shape[1]}-d but the embedder gives {dim}-d: it was "
                          "built for another backbone; rebuild it with `python -m train cohort --backbone ...`")
    if views is not None and cohort.views != views:
        raise CohortError(f"{path}: its faces were embedded as {cohort.views!r} but the gallery's as {views!r} (a "
                          "cohort from an earlier faceberry); rebuild it with `python -m train cohort --backbone ...` "
                          "and train again")
    return cohort


def leave_one_out(own: np.ndarray, own_labels: list[str], gallery: np.ndarray, names: list[str]) -> np.ndarray:
    """Best score of each person's faces against the *other* people's entries: strangers to a gallery without them."""
    if len(own) == 0 or len(names) < 2:
        return np.zeros(0)
    sims = l2_normalize(own) @ np.asarray(gallery).T
    index = {n: i for i, n in enumerate(names)}
    rows = [i for i, lbl in enumerate(own_labels) if lbl in index]
    sims = sims[rows]
    sims[np.arange(len(rows)), [index[own_labels[i]] for i in rows]] = -np.inf
    return sims.max(axis=1)


def calibrate(
    gallery: np.ndarray,
    names: list[str],
    cohort: Cohort | None,
    own: np.ndarray | None = None,
    own_labels: list[str] | None = None,
    negatives: np.ndarray | None = None,
    target_far: float = DEFAULT_TARGET_FAR,
    margin: float = STRANGER_MARGIN,
) -> dict[str, Any]:
    """The accept threshold for this gallery and what it rests on (see the module docstring)."""
    parts: list[tuple[str, np.ndarray, int]] = []  # (what, scores, people)
    left_out = 0
    if cohort is not None and len(cohort):
        usable, left_out = cohort.without(gallery, names)
        parts.append(("stranger cohort", best_match(usable.embeddings, gallery, names)[1], usable.people))
    if negatives is not None and len(negatives):
        parts.append(("negative faces", best_match(negatives, gallery, names)[1], 0))
    if own is not None and own_labels is not None and len(names) > 1:
        parts.append(("leave-one-person-out", leave_one_out(own, own_labels, gallery, names), len(names)))
    # float64: the threshold sits just above a float32 score, and comparing in float32 would round it back onto it.
    scores = np.concatenate([p[1] for p in parts]).astype(np.float64) if parts else np.zeros(0)
    scores = scores[np.isfinite(scores)]
    calibrated_at = target_far / margin if cohort is not None and len(cohort) else target_far
    accept = threshold_for_far(scores, calibrated_at) if len(scores) else 0.0
    result: dict[str, Any] = {
        "accept": float(accept),
        "target_far": float(target_far),
        "calibrated_far": float(calibrated_at),
        "margin": float(margin) if calibrated_at != target_far else 1.0,
        "basis": " + ".join(f"{what} ({len(s)} scores)" for what, s, _ in parts) or "none",
        "impostor_scores": len(scores),
        "cohort_people": int(parts[0][2]) if cohort is not None and len(cohort) else 0,
        "cohort_people_left_out": int(left_out),
        "far": float(np.mean(scores >= accept)) if len(scores) else None,
        "warnings": [],
    }
    if cohort is None or not len(cohort):
        result["warnings"].append(
            "no stranger cohort: the threshold rests on your own photos only and will name strangers as family; "
            "build one with `python -m train cohort --backbone BACKBONE_DIR --photos FACES_DIR` (or --lfw)")
    if len(scores) < MIN_IMPOSTOR_SCORES:
        result["warnings"].append(
            f"the accept threshold rests on only {len(scores)} impostor scores (want {MIN_IMPOSTOR_SCORES}+): "
            "its false-accept rate is a guess; use a bigger stranger cohort")
    return result
