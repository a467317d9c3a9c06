"""The stranger cohort and the accept threshold calibrated on it.

A household of two has no strangers to calibrate on: scored "each person against the others" it has
a few dozen impostor scores, and in a measured run such a threshold let 30% of strangers' photos be
named as family. The cohort fixes that: embeddings (never photos) of thousands of faces of other
people, made once per backbone (`python -m train cohort`) and carried in every bundle, so training,
`convert`, `device enroll` and any later enrolment all calibrate on the same strangers.

cohort.npz: `embeddings` (N, D) float16, unit length; `identity` (N,) int32 (which cohort person each
face is; the people themselves are not named); `name_hashes` (P,) sha256 hex of each identity's
folder name (faceberry.cohort.same_name), so a household member who is also in the public set can be left out;
`same_person_cosine` (): centroid similarity above which two identities are taken to be one person,
measured on the cohort itself when it was built; `views` (): how each face was embedded
(faceberry.contract.enrolled_views of the backbone: face and mirror image for dlib's ResNet) — absent in
cohorts of earlier releases, which embedded the face alone and are refused where the gallery is
face+mirror.

The threshold rule (calibrate): every cohort face is scored against the gallery like a camera face —
best cosine over the gallery's people — and so are the negatives given at training and every
person's own photos against the *other* people (leave-one-person-out). Those impostor scores come in
people, and the tail is fitted over the people (threshold_rule): each person's best scores a normal
around their mean, widened by a kernel bandwidth for the people the cohort lacks, and the threshold is
where a new stranger's chance of passing for someone is target_far. Until issue 24 the threshold was
the empirical quantile at target_far / 2 of the faces' scores: with a few hundred cohort faces that
rested on the one or two highest scores and was too strict for big households and too loose for small
ones; on people the study never chose on it let 1.1% of strangers' photos through where this rule lets
0.4% (bench/calibration.py, docs/BENCHMARKS.md "Calibration"). The result also says how sure the
threshold is: a bootstrap over the cohort's people (accept_interval).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.contract import ENROLLED_VIEWS, FACE_ONLY, MIN_IMPOSTOR_SCORES, l2_normalize, threshold_for_far
from faceberry.errors import UsageError

log = logging.getLogger(__name__)

COHORT_FILE = "cohort.npz"
# The share of strangers' photos a default threshold may accept, and the factor by which the cohort is asked
# to be stricter than that: 1 since issue 24, as the fitted tail already allows for the people the cohort
# lacks (the empirical quantile needed 2; see the module docstring and docs/BENCHMARKS.md "Calibration").
DEFAULT_TARGET_FAR = 0.005
STRANGER_MARGIN = 1.0


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
    """(identities with two or more faces, their faceberry.contract.centroid rows), in one pass over the faces:
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


# Below this many cohort people the tail widens enough to cost the family photos (a cohort of 12 people left the
# study's households with 81–90% named, of 30 people 97–100%: docs/BENCHMARKS.md "Calibration").
MIN_COHORT_PEOPLE = 30
NEGATIVE_GROUP = -1_000_000  # impostor_matrix's group of the first negative face (the next ones count down)
BANDWIDTH = 1.0  # × Silverman's rule: the widening for the people a cohort lacks
BOOTSTRAP_RESAMPLES = 200  # resamples of the cohort's people for the threshold's uncertainty
BOOTSTRAP_SEED = 0  # fixed: the same gallery and cohort give the same interval everywhere


def people_stats(best: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(P, 3) per impostor person: faces, mean best score, sum of squared deviations from that mean."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=best) / counts
    ss = np.bincount(inverse, weights=(best - means[inverse]) ** 2)
    return np.stack([counts, means, ss], axis=1)


def threshold_rule(stats: np.ndarray, rate: float, bandwidth: float = BANDWIDTH) -> float:
    """THE threshold rule: the lowest threshold at which at most `rate` of strangers' faces would pass for someone
    in the gallery, from the best-of-gallery scores of the impostor people (people_stats).

    Strangers come as people, and one who resembles a member does so in most of their photos, so the far tail
    is set by *which people* are close, not by how many faces there are: with a few hundred cohort faces the
    empirical quantile (the rule until issue 24) rested on the one or two highest scores. Here each impostor
    person's scores are a normal around their mean (the spread of one person's photos pooled over people),
    widened by a kernel bandwidth for the people the cohort lacks (Silverman's rule on the people's means:
    wider the fewer people), and a new stranger's chance is the mean over people. The scores are each face's
    best over the gallery, so more people enrolled raise the threshold. No margin is needed on top
    (bench/calibration.py, docs/BENCHMARKS.md "Calibration")."""
    return float(_solve(stats[None], rate, bandwidth)[0]) if len(stats) else 0.0


def _solve(stats: np.ndarray, rate: float, bandwidth: float) -> np.ndarray:
    """threshold_rule for a batch of people sets ((B, P, 3), as people_stats) at once: (B,) thresholds."""
    from scipy.special import ndtr

    counts, means, ss = stats[..., 0], stats[..., 1], stats[..., 2]
    multi = counts >= 2
    dof = np.sum(np.where(multi, counts - 1, 0.0), axis=1)
    within = np.sqrt(np.sum(np.where(multi, ss, 0.0), axis=1) / np.maximum(dof, 1.0)) * (dof > 0)
    people = means.shape[1]
    between = np.std(means, axis=1, ddof=1) if people > 1 else np.zeros(len(means))
    h = bandwidth * between * (4.0 / (3.0 * people)) ** 0.2
    tau = np.maximum(np.hypot(within, h), 1e-3)[:, None]
    lo, hi = means.min(axis=1) - 10 * tau[:, 0], means.max(axis=1) + 10 * tau[:, 0]
    for _ in range(60):  # the mean survival falls as t rises: bisect to float precision
        mid = (lo + hi) / 2
        over = np.mean(ndtr((means - mid[:, None]) / tau), axis=1) > rate
        lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
    return hi


def threshold_interval(stats: np.ndarray, cohort_rows: np.ndarray, rate: float,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float] | None:
    """(5th percentile, 95th percentile, standard deviation) of the threshold over bootstrap resamples of the
    cohort's people (whole people drawn with replacement: one person's photos stand or fall together); the
    household's own people and the negative faces stay as they are. None without two or more cohort people."""
    cohort, rest = stats[cohort_rows], stats[~cohort_rows]
    if len(cohort) < 2:
        return None
    pick = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(cohort), (resamples, len(cohort)))
    batch = np.concatenate([np.broadcast_to(rest, (resamples, *rest.shape)), cohort[pick]], axis=1)
    draws = _solve(batch, rate, BANDWIDTH)
    lo, hi = np.percentile(draws, [5, 95])
    return float(lo), float(hi), float(np.std(draws))


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
    """The accept threshold for this gallery, what it rests on and how sure it is (see the module docstring)."""
    usable, left_out = (cohort.without(gallery, names) if cohort is not None and len(cohort) else (None, 0))
    matrix, groups = impostor_matrix(gallery, names, usable, own, own_labels, negatives)
    # float64: the threshold sits just above a float32 score, and comparing in float32 would round it back onto it.
    best = matrix.max(axis=1) if matrix.shape[1] else np.zeros(0)
    finite = np.isfinite(best)
    best, groups = best[finite], groups[finite]
    negative = groups <= NEGATIVE_GROUP
    parts = [(what, int(np.sum(sel))) for what, sel in (("stranger cohort", groups >= 0), ("negative faces", negative),
                                                          ("leave-one-person-out", (groups < 0) & ~negative))
             if np.any(sel)]
    has_cohort = usable is not None and len(usable) > 0
    calibrated_at = target_far / margin if has_cohort else target_far
    ids = np.unique(groups)
    stats = people_stats(best, groups)
    if has_cohort:  # a cosine: a fitted tail past 1.0 (a cohort face identical to a member) means "only 1.0"
        accept = min(threshold_rule(stats, calibrated_at), 1.0)
        interval = threshold_interval(stats, ids >= 0, calibrated_at)
    else:
        # The household's own people only (2–8 of them): too few for a tail over people — on lfw-dev it left
        # households of three with 80% of their photos named — so the empirical quantile stays, with the
        # warning below that it names strangers.
        accept, interval = (threshold_for_far(best, calibrated_at) if len(best) else 0.0), None
    result: dict[str, Any] = {
        "accept": float(accept),
        "target_far": float(target_far),
        "calibrated_far": float(calibrated_at),
        "margin": float(margin) if calibrated_at != target_far else 1.0,
        "basis": " + ".join(f"{what} ({n} scores)" for what, n in parts) or "none",
        "impostor_scores": len(best),
        "impostor_people": len(ids),
        "rule": ("people-kernel tail of the best-of-gallery scores (faceberry.cohort.threshold_rule)" if has_cohort
                 else "empirical quantile of the household's own scores (no cohort)"),
        "cohort_people": int(usable.people) if usable is not None else 0,
        "cohort_people_left_out": int(left_out),
        "far": float(np.mean(best >= accept)) if len(best) else None,
        # How far the threshold would move with other strangers of the same kind: a cohort of other people
        # drawn like this one (bootstrap over its people) gives a threshold in this range 90% of the time.
        "accept_interval": [interval[0], interval[1]] if interval else None,
        "accept_sd": interval[2] if interval else None,
        "warnings": [],
    }
    if cohort is None or not len(cohort):
        result["warnings"].append(
            "no stranger cohort: the threshold rests on your own photos only and will name strangers as family; "
            "build one with `python -m train cohort --backbone BACKBONE_DIR --photos FACES_DIR` (or --lfw)")
    elif usable.people < MIN_COHORT_PEOPLE:
        result["warnings"].append(
            f"the stranger cohort has only {usable.people} people (want {MIN_COHORT_PEOPLE}+): the threshold allows "
            "for the many people it lacks and will miss more of your own photos; build it from more people")
    if len(best) < MIN_IMPOSTOR_SCORES:
        result["warnings"].append(
            f"the accept threshold rests on only {len(best)} impostor scores (want {MIN_IMPOSTOR_SCORES}+): "
            "its false-accept rate is a guess; use a bigger stranger cohort")
    return result


# ---- the far tail of the impostor scores -------------------------------------------------------------------


def impostor_matrix(gallery: np.ndarray, names: list[str], cohort: Cohort | None, own: np.ndarray | None = None,
                    own_labels: list[str] | None = None, negatives: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Every impostor face's cosine to every gallery entry: ((K, len(names)) scores, (K,) group).

    Rows: the cohort's faces (group = cohort identity ≥ 0), the household's own faces (group -1 - the person's
    index; their own person's entries are -inf: leave-one-person-out) and negative faces (each its own group:
    who they are is not known). A stranger is accepted when
    *any* entry scores at least the threshold, so each column is one chance for each stranger."""
    gal = np.asarray(gallery, np.float32)
    blocks, groups = [], []
    if cohort is not None and len(cohort):
        blocks.append(cohort.embeddings @ gal.T)
        groups.append(np.asarray(cohort.identity, np.int64))
    if own is not None and own_labels is not None and len(own) and len(set(names)) > 1:
        sims = (l2_normalize(own) @ gal.T).astype(np.float64)
        sims[np.asarray(own_labels)[:, None] == np.asarray(names)[None, :]] = -np.inf
        keep = np.isfinite(sims).any(axis=1)
        people = sorted(set(own_labels))
        blocks.append(sims[keep])
        groups.append(-1 - np.array([people.index(lbl) for lbl in own_labels], np.int64)[keep])
    if negatives is not None and len(negatives):
        blocks.append(l2_normalize(negatives) @ gal.T)
        groups.append(NEGATIVE_GROUP - np.arange(len(negatives), dtype=np.int64))
    if not blocks:
        return np.zeros((0, len(names))), np.zeros(0, np.int64)
    return np.concatenate(blocks).astype(np.float64), np.concatenate(groups)
