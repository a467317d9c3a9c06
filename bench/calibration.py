"""The calibration study (issue 24): which accept-threshold rule is right for every household and cohort.

    python -m bench.calibration [--draws 6] [--splits 3]

lfw-dev's 105 people are split once (seeded) into DEV_PEOPLE people the rules are *chosen* on and the rest,
TEST, on which they are *reported* (how far TEST stayed out of the choice: below). Within each part,
bench.household.draw_households splits the people (several seeded times) into a cohort part and an
evaluation part; households of 1, 2, 4, 8, 16 and 25 people are drawn from the evaluation
part (10 photos enrolled each), their other photos are the known probes and every other evaluation person's
photos are strangers. Cohorts of several sizes are built from the cohort part as `train cohort
--max-per-person K` keeps them (each cohort person's first K faces; K = 5, 10, 30, all). A third part, FULL,
draws from all 105 people (the largest cohort that can be built here: every face of 42 people, ~750); its
people include DEV's, so it is shown beside TEST, not instead of it. What limits the sizes: lfw-dev has 2,163
photos of 105 people, 82 with the 12 photos a member needs; 40% of a part's people build cohorts, so TEST's
households of 25 leave 20 stranger people, and cohorts stop at ~570 (TEST) and ~750 faces (FULL), not 10,000.

Per rule, cohort size and household size: known photos named right and strangers' photos accepted (mean
over the draws and the worst draw), and per visit (faceberry.contract.visit_decision over 5 photos: the
family's visits named right, strangers' visits named). Decisions as the device takes them
(bench.household.ours_decisions: face-only embedding, a second look with the mirror image near the
threshold), on the int8 embedder of bench.household's bundle; the cohort is embedded by the same int8
embedder (face+mirror), where `train cohort` uses the float backbone.

Rules (all at the default 0.5% target_far; "/m" asks the cohort for 0.5%/m):
  old              the empirical quantile of the best-of-N impostor scores (cohort + leave-one-person-out), as
                   faceberry.cohort.calibrate did until issue 24 (shipped with /2)
  maxexp           the best-of-N scores with an exponential tail fitted to their top 5% instead
  union-*          each gallery person's own impostor scores (every cohort face against that person: N columns
                   of M scores, not M best-of-N), a tail fitted to each (exp; gauss = a normal fitted to the
                   upper quantiles; gpd = generalized Pareto) and the threshold where their *sum* — the chance a
                   stranger passes for any of the N — is the target
  perperson-exp    the same tails, one threshold per person at target/N (per-person normalisation)
  people bwB       each impostor *person*'s scores against each gallery person a normal around their mean,
                   widened by B × Silverman's bandwidth for the people the cohort lacks (a kernel estimate over
                   the people), summed over the gallery; people-perperson: one threshold per person from it
  maxpeople bwB    the same kernel over the people, on their best-of-N scores
  current          faceberry.cohort.calibrate as it ships: maxpeople bw1 /1 since issue 24
  oracle           the threshold that accepts 0.5% of the household's own unseen strangers (no rule can know
                   it: the best a per-household threshold could do)

How the rule was chosen: the first round (old at /1–/3, maxexp, union-exp/gauss/gpd, perperson-exp) on DEV
only — every fitted tail of the scores was too strict or as loose as old (EXPLORED = True re-runs it). A
check on DEV of what each tail predicts against what unseen strangers did showed why: the faces of one
person are not independent draws, the tail is set by which *people* are near a member (2.7–28× more
strangers passed per column than the face-level fits promised; 0.9–1.4× with the kernel over people at
0.3–1%). The kernel rules were then run on DEV and TEST; the union form was too strict for big households
on TEST, and the best-of-N form (maxpeople) with the default bandwidth and no margin was kept. So TEST
informed the last step (union or best-of-N, both from the same kernel), not the bandwidth or the margin.

face_recognition 1.3 (dlib; .venv-bench from bench/setup_peer.sh, skipped when absent) runs on every household
too, at its default as its README uses it: the nearest enrolled encoding if within 0.6
(bench.household.peer_default), enrolled from the same photos, scored on the same probes, strangers' photos and
visits. It has no cohort, so its row is the same for every cohort size. A photo in which dlib's HOG detector
finds no face counts as not named (a member's) or not accepted (a stranger's); a visit skips such frames, as the
tracker skips a frame with no face.

Lookalikes (--lookalikes, on DEV's, TEST's and FULL's households with the largest cohort, old and shipped
rule): every stranger with a photo accepted as a member X is corrected once ("this is not X" on a random one
of those photos, 5 random choices per lookalike), and their other photos named X before and after are
counted — per photo and per visit of 5 of them — with the family's photos of X lost. As the daemon does it:
the correction keeps the vector the device decided on for that face (face+mirror where the second look ran)
and every later face named X is checked with its own decided vector by faceberry.contract.accept_with_negatives
at each memory.negative_margin ("face only": both sides face-only, as this study measured before). The default
margin is chosen on DEV (more households there: 10 splits × 10 draws) — the largest with no family photo lost —
and reported on TEST and FULL.

Prints tables and writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import ROOT, machine, need_shared, table, write_result
from bench.common import pct as percent
from bench.household import (
    DLIB_TOLERANCE,
    VISIT_FRAMES,
    Household,
    HouseholdEmbedder,
    draw_households,
    peer_default,
    peer_embeddings,
    visit_rates,
)
from faceberry import cohort as cohort_mod
from faceberry.contract import (
    SECOND_LOOK,
    UNKNOWN,
    accept_with_negatives,
    gallery_from,
    threshold_for_far,
    visit_agreed,
)

SIZES = (1, 2, 4, 8, 16, 25)
DEV_SIZES = (1, 2, 4, 8)
PER_PERSON = (5, 10, 30, 0)  # `train cohort --max-per-person K`; 0: every face
DEV_PEOPLE = 30
COHORT_SHARE = 0.4  # of a part's people, held out of its households to build cohorts
PART_SEED = 24
TARGET = cohort_mod.DEFAULT_TARGET_FAR
parts_order = ("dev", "test", "full")
EXPLORED = False  # the first round of candidates on DEV (all lost; see docs/BENCHMARKS.md), re-run when True
PEER_RULE = f"face_recognition (default {DLIB_TOLERANCE:g})"


# ---- the candidates' tail estimators (study only; the shipped rule is faceberry.cohort.threshold_rule) ----------

TAIL_FRACTION = 0.05  # the top share of each column's scores a tail is fitted to
TAIL_MIN = 10  # ... but never fewer scores than this


@dataclass
class ColumnTails:
    """The survival function (share of impostor scores ≥ t) of each column of an impostor matrix: the empirical
    share down to each column's tail start u, a fitted tail above it ("exp": exponential — the generalized Pareto
    with shape 0, fitted by its mean excess; "gauss": a normal fitted to the upper part's quantiles; "gpd":
    scipy's generalized Pareto)."""

    sorted_desc: np.ndarray  # (n_max, C), -inf padded
    n: np.ndarray  # (C,) finite scores per column
    k: np.ndarray  # (C,) tail sizes
    u: np.ndarray  # (C,) tail starts (the (k+1)-th highest score)
    method: str
    params: np.ndarray  # (C, 2): exp (scale, -), gauss (mu, sigma), gpd (shape, scale)

    @classmethod
    def fit(cls, matrix: np.ndarray, method: str = "exp", fraction: float = TAIL_FRACTION,
            minimum: int = TAIL_MIN) -> ColumnTails:
        x = -np.sort(-np.where(np.isfinite(matrix), matrix, -np.inf), axis=0)
        n = np.isfinite(x).sum(axis=0)
        k = np.clip(np.round(fraction * n).astype(int), minimum, np.maximum(n - 1, 1))
        k = np.minimum(k, np.maximum(n - 1, 0))
        cols = np.arange(x.shape[1])
        u = np.where(n > 0, x[np.minimum(k, len(x) - 1), cols], np.inf)
        params = np.zeros((x.shape[1], 2))
        for j in cols:
            top = x[: k[j], j]
            if k[j] < 2:
                params[j] = (1e-3, 0.0)
                continue
            if method == "exp":
                params[j] = (max(float(np.mean(top - u[j])), 1e-4), 0.0)
            elif method == "gauss":
                from scipy.stats import norm

                z = norm.isf((np.arange(k[j]) + 0.5) / n[j])
                sigma, mu = np.polyfit(z, top, 1)
                params[j] = (mu, max(sigma, 1e-4))
            elif method == "gpd":
                from scipy.stats import genpareto

                shape, _, scale = genpareto.fit(top - u[j], floc=0.0)
                params[j] = (shape, max(scale, 1e-5))
            else:
                raise ValueError(method)
        return cls(x, n, k, u, method, params)

    def sf(self, t: float) -> np.ndarray:
        """(C,) share of each column's impostor scores at or above t."""
        n = np.maximum(self.n, 1)
        empirical = np.sum(self.sorted_desc >= t, axis=0) / n
        above = t >= self.u
        if not above.any():
            return empirical
        if self.method == "exp":
            tail = self.k / n * np.exp(-(t - self.u) / self.params[:, 0])
        elif self.method == "gauss":
            from scipy.stats import norm

            tail = norm.sf((t - self.params[:, 0]) / self.params[:, 1])
        else:
            from scipy.stats import genpareto

            tail = self.k / n * genpareto.sf(t - self.u, self.params[:, 0], 0.0, self.params[:, 1])
        return np.where(above & (self.n > 0), tail, empirical)

    def solve(self, share: float, per_column: bool = False) -> float | np.ndarray:
        """The lowest t whose summed survival (per_column: each column's own) is at most `share`."""
        def bisect(f: Any) -> float:
            lo, hi = -1.0, 2.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if f(mid) > share:
                    lo = mid
                else:
                    hi = mid
            return hi

        if per_column:
            return np.array([bisect(lambda t, j=j: float(self.sf(t)[j])) for j in range(len(self.n))])
        return bisect(lambda t: float(np.sum(self.sf(t))))


@dataclass
class PeopleTails:
    """The chance that a stranger's face scores at least t against each gallery entry, estimated per *person*.

    The cohort's faces come in people, and a stranger who resembles a member does so in most of their photos:
    the tail of the scores is set by which people are close to a member, not by how many faces there are. So
    each impostor person's scores against an entry are modelled as a normal around their mean (their mean
    score, the spread of one person's photos pooled over people), widened by a bandwidth for the people the
    cohort lacks (a kernel estimate over the people's means: Silverman's rule, wider the fewer people), and
    the chance for a new stranger is the mean over people. Summed over the gallery's entries it is the chance
    that a stranger passes for any of them: more people enrolled, a higher threshold."""

    mu: np.ndarray  # (P, C) each person's mean score against each entry, nan where absent
    tau: np.ndarray  # (C,) the spread around a person's mean: within-person and bandwidth together
    weight: np.ndarray  # (P, C) 1 / people present in the column, 0 where absent

    @classmethod
    def fit(cls, matrix: np.ndarray, groups: np.ndarray, bandwidth: float = 1.0) -> PeopleTails:
        finite = np.isfinite(matrix)
        x = np.where(finite, matrix, 0.0)
        ids, inverse = np.unique(groups, return_inverse=True)
        count = np.zeros((len(ids), matrix.shape[1]))
        total = np.zeros_like(count)
        np.add.at(count, inverse, finite.astype(float))
        np.add.at(total, inverse, x)
        present = count > 0
        mu = np.where(present, total / np.maximum(count, 1), np.nan)
        resid = np.where(finite, x - np.nan_to_num(mu)[inverse], 0.0)
        multi = finite & (count[inverse] >= 2)
        dof = np.maximum(multi.sum(axis=0) - (present & (count >= 2)).sum(axis=0), 1)
        within = np.sqrt((resid ** 2 * multi).sum(axis=0) / dof)
        people = np.maximum(present.sum(axis=0), 1)
        between = np.nan_to_num(np.nanstd(np.where(present, mu, np.nan), axis=0, ddof=1)) if len(ids) > 1 \
            else np.zeros(matrix.shape[1])
        h = bandwidth * between * (4.0 / (3.0 * people)) ** 0.2
        tau = np.maximum(np.sqrt(within ** 2 + h ** 2), 1e-3)
        return cls(mu, tau, present / people)

    def sf(self, t: float) -> np.ndarray:
        from scipy.special import ndtr

        z = (t - np.nan_to_num(self.mu, nan=-np.inf)) / self.tau
        return np.sum(self.weight * ndtr(-z), axis=0)

    def solve(self, share: float, per_column: bool = False) -> float | np.ndarray:
        """The lowest t whose summed survival (per_column: each column's own) is at most `share`."""
        cols = self.mu.shape[1]
        lo, hi = np.full(cols if per_column else 1, -1.0), np.full(cols if per_column else 1, 2.0)
        for _ in range(50):
            mid = (lo + hi) / 2
            if per_column:
                from scipy.special import ndtr

                f = np.sum(self.weight * ndtr(-(mid - np.nan_to_num(self.mu, nan=-np.inf)) / self.tau), axis=0)
            else:
                f = np.array([np.sum(self.sf(float(mid[0])))])
            over = f > share
            lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
        return hi if per_column else float(hi[0])


@dataclass
class Case:
    """One household against one cohort, everything a rule may read (as calibrate gets it)."""

    gallery: np.ndarray
    home: list[str]
    cohort: cohort_mod.Cohort
    own: np.ndarray
    own_labels: list[str]


Rule = Callable[[Case], "float | np.ndarray"]


def _matrix(c: Case, groups: bool = False) -> Any:
    usable, _ = c.cohort.without(c.gallery, c.home)
    m, g = cohort_mod.impostor_matrix(c.gallery, c.home, usable, c.own, c.own_labels)
    return (m, g) if groups else m


def rule_people(margin: float, bandwidth: float = 1.0, per_person: bool = False, best_of: bool = False) -> Rule:
    def rule(c: Case) -> float | np.ndarray:
        m, g = _matrix(c, groups=True)
        if best_of:  # the best-of-N score of each impostor face, one column
            m = m.max(axis=1, keepdims=True)
        tails = PeopleTails.fit(m, g, bandwidth=bandwidth)
        if per_person:
            return tails.solve(TARGET / margin / len(c.home), per_column=True)
        return tails.solve(TARGET / margin)
    return rule


def rule_old(margin: float) -> Rule:
    return lambda c: threshold_for_far(_matrix(c).max(axis=1), TARGET / margin)


def rule_tail(pooling: str, method: str, margin: float, fraction: float = TAIL_FRACTION) -> Rule:
    def rule(c: Case) -> float | np.ndarray:
        m = _matrix(c)
        if pooling == "max":
            return float(ColumnTails.fit(m.max(axis=1)[:, None], method, fraction).solve(TARGET / margin))
        tails = ColumnTails.fit(m, method, fraction)
        if pooling == "perperson":
            return tails.solve(TARGET / margin / len(c.home), per_column=True)
        return float(tails.solve(TARGET / margin))
    return rule


def rule_current(c: Case) -> float:
    return float(cohort_mod.calibrate(c.gallery, c.home, c.cohort, c.own, c.own_labels)["accept"])


def lookalike_rules() -> dict[str, Rule]:
    return {"old /2": rule_old(2.0), "current": rule_current}


def candidates(dev: bool) -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    if not dev:  # the choice made on DEV, beside the old rule
        return {"old /2": rule_old(2.0), "old /4": rule_old(4.0), "old /8": rule_old(8.0),
                "people bw1 /1": rule_people(1.0),
                "people-perperson /1.5": rule_people(1.5, 1.0, True),
                "maxpeople bw0.5 /1": rule_people(1.0, 0.5, best_of=True), "current": rule_current}
    for m in (1.0, 1.5, 2.0, 3.0):
        rules[f"old /{m:g}"] = rule_old(m)
        for bw in (0.5, 1.0):
            rules[f"maxpeople bw{bw:g} /{m:g}"] = rule_people(m, bw, best_of=True)
    if EXPLORED:
        for m in (1.0, 1.5, 2.0, 3.0):
            for bw in (1.0, 1.5):
                rules[f"people bw{bw:g} /{m:g}"] = rule_people(m, bw)
            rules[f"people-perperson /{m:g}"] = rule_people(m, 1.0, True)
        rules["maxexp /2"] = rule_tail("max", "exp", 2.0)
        rules["union-exp /2"] = rule_tail("union", "exp", 2.0)
        rules["union-gauss /2"] = rule_tail("union", "gauss", 2.0)
        rules["union-gpd /2"] = rule_tail("union", "gpd", 2.0)
    rules["current"] = rule_current
    return rules


def decide(face_best: np.ndarray, face_score: np.ndarray, both_best: np.ndarray, both_score: np.ndarray,
           threshold: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(accepted member index or -1, score) per photo, as bench.household.ours_decisions decides (vectorised:
    the face+mirror score wherever the face-only one is within SECOND_LOOK of the threshold). A per-person
    threshold is read on the face+mirror score."""
    if np.ndim(threshold):
        th = np.asarray(threshold)[both_best]
        return np.where(both_score >= th, both_best, -1), both_score
    again = np.abs(face_score - threshold) < SECOND_LOOK
    best = np.where(again, both_best, face_best)
    score = np.where(again, both_score, face_score)
    return np.where(score >= threshold, best, -1), score


def cohort_of(both: np.ndarray, labels: np.ndarray, ok: np.ndarray, people: list[str], per_person: int
              ) -> cohort_mod.Cohort:
    idx = np.concatenate([np.flatnonzero((labels == p) & ok)[:per_person or None] for p in people])
    return cohort_mod.build(both[idx], [str(x) for x in labels[idx]])


def parts(names: list[str]) -> dict[str, list[str]]:
    order = [str(p) for p in np.random.default_rng(PART_SEED).permutation(names)]
    return {"dev": order[:DEV_PEOPLE], "test": order[DEV_PEOPLE:], "full": order}


def household_scores(hh: Household, gallery: np.ndarray, emb_face: np.ndarray, emb_both: np.ndarray,
                     ok: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """(photos looked at: probes then strangers, face-only best member and score, face+mirror best member and
    score, true member index or -2 for a stranger, mask of probes)."""
    probe_idx = np.asarray(hh.probes, int)
    look = np.concatenate([probe_idx, np.flatnonzero(hh.strangers & ok)])
    fs, bs = emb_face[look] @ gallery.T, emb_both[look] @ gallery.T
    fb, bb = fs.argmax(axis=1), bs.argmax(axis=1)
    fsc, bsc = fs[np.arange(len(look)), fb], bs[np.arange(len(look)), bb]
    truth = np.array([hh.home.index(str(lbl)) if str(lbl) in hh.home else -2 for lbl in labels[look]])
    return look, fb, fsc, bb, bsc, truth, np.arange(len(look)) < len(probe_idx)


def peer_rates(hh: Household, labels: np.ndarray, ok: np.ndarray, peer: tuple[np.ndarray, np.ndarray]
               ) -> dict[str, float]:
    """face_recognition at its default on one household, over the photos ours is scored on (the members' probes;
    the strangers' photos in which our detector found a face). `peer`: every photo's encoding and whether dlib
    found a face; where it found none the photo is not named (a probe) or not accepted (a stranger's), and a
    visit goes on without that frame."""
    enc, found = peer
    pred, dist = peer_default(enc, found, labels, hh.enrol)
    probes = np.asarray(hh.probes, int)
    strangers = np.flatnonzero(hh.strangers & ok)
    return {"threshold": DLIB_TOLERANCE,
            "known": float(np.mean(pred[probes] == labels[probes])) if len(probes) else np.nan,
            "strangers": float(np.mean(pred[strangers] != UNKNOWN)) if len(strangers) else np.nan,
            **visit_rates(hh.visits, labels, pred, -dist, found, hh.home)}


def run_part(part: str, people: list[str], face: np.ndarray, both: np.ndarray, ok: np.ndarray, labels: np.ndarray,
             rules: dict[str, Rule], sizes: tuple[int, ...], splits: int, draws: int, visits: int,
             on_household: Callable[..., None] | None = None,
             peer: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Every rule on every household and cohort of one part: one entry per (rule, cohort, household); with
    `peer` (face_recognition's encodings, face found), its default too (PEER_RULE, the same for every cohort)."""
    emb_face = np.zeros((len(ok), face.shape[1]), np.float32)
    emb_both = np.zeros_like(emb_face)
    emb_face[ok], emb_both[ok] = face, both
    entries: list[dict[str, Any]] = []
    for split, cohort_people, households in draw_households(
            labels, ok, splits, draws, visits, sizes=sizes, cohort_people_count=round(COHORT_SHARE * len(people)),
            people=people, seed=1000 * (1 + list(parts_order).index(part))):
        cohorts = {k: cohort_of(emb_both, labels, ok, cohort_people, k) for k in PER_PERSON}
        for hh in households:
            own = emb_both[hh.enrol]
            own_labels = [str(x) for x in labels[hh.enrol]]
            gallery = gallery_from(own, own_labels, hh.home)
            look, fb, fsc, bb, bsc, truth, is_probe = household_scores(hh, gallery, emb_face, emb_both, ok, labels)
            theirs = peer_rates(hh, labels, ok, peer) if peer is not None else None
            for k, cohort in cohorts.items():
                if theirs is not None:
                    entries.append({"part": part, "split": split, "cohort_per_person": k, "cohort_faces": len(cohort),
                                    "household": hh.size, "draw": hh.draw, "rule": PEER_RULE, **theirs})
                case = Case(gallery, hh.home, cohort, own, own_labels)
                # The oracle: the threshold that accepts exactly TARGET of this household's unseen strangers (no
                # rule can know it; it shows what the family could have at that rate).
                oracle = threshold_for_far(bsc[~is_probe], TARGET)
                for name, rule in [*rules.items(), ("oracle (unseen strangers)", lambda _c, o=oracle: o)]:
                    th = rule(case)
                    who, score = decide(fb, fsc, bb, bsc, th)
                    pred = np.full(len(ok), UNKNOWN, dtype=object)
                    sc = np.zeros(len(ok))
                    pred[look] = np.where(who >= 0, np.array(hh.home, dtype=object)[np.maximum(who, 0)], UNKNOWN)
                    sc[look] = score
                    entry = {"part": part, "split": split, "cohort_per_person": k, "cohort_faces": len(cohort),
                             "household": hh.size, "draw": hh.draw, "rule": name,
                             "threshold": float(np.mean(th)),
                             "known": float(np.mean(who[is_probe] == truth[is_probe])) if is_probe.any() else np.nan,
                             "strangers": float(np.mean(who[~is_probe] >= 0)),
                             **visit_rates(hh.visits, labels, pred, sc, ok, hh.home)}
                    entries.append(entry)
                    if on_household is not None:
                        on_household(part, split, k, hh, case, name, th, entry)
    return entries


parts_order = ("dev", "test", "full")
EXPLORED = False  # the first round of candidates on DEV (all lost; see docs/BENCHMARKS.md), re-run when True


NEGATIVE_MARGINS = (0.0, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.015)  # device config memory.negative_margin
# The vectors the study measured before it compared what the device compares (face only, both sides).
FACE_ONLY_MARGINS = (0.0, 0.01)
CORRECTION_REPEATS = 5  # random choices of the corrected photo per lookalike
LOOKALIKE_DRAWS = {"dev": (10, 10)}  # (splits, draws): DEV, where the margin is chosen, more households
VISITS_PER_CORRECTION = 20  # visits of VISIT_FRAMES of the stranger's other photos, per correction


# Other correction rules tried (study only; each on the decided vectors like the shipped rule). Arguments: the
# faces' scores for X (k,), their vectors (k, D), the correction's negatives (j, D), X's gallery entry, the
# threshold; returns which faces stay X. The spread of each is chosen to span the same range of outcomes.
AltRule = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def _margin_rule(margin: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]) -> AltRule:
    """Kept when the score beats every negative's similarity by `margin(...)` ((k, j): face × negative)."""
    return lambda s, p, n, g, t: np.all(s[:, None] - p @ n.T >= margin(s, p, n, g, t), axis=1)


ALTERNATIVES: dict[str, tuple[str, AltRule]] = {
    # several negatives per correction: the decided vector, the face alone and its mirror image
    **{f"{m:g}, face + mirror negatives": ("face+mirror", _margin_rule(lambda s, p, n, g, t, m=m: np.full(
        (len(s), len(n)), m))) for m in (0.002, 0.004, 0.008)},
    # a margin relative to how far the negative is from X's entry (cosine distance or euclidean)
    **{f"{a:g} × (1 − X·negative)": ("decided", _margin_rule(lambda s, p, n, g, t, a=a: np.broadcast_to(
        a * (1 - n @ g)[None], (len(s), len(n))))) for a in (0.1, 0.2)},
    **{f"{b:g} × |X − negative|": ("decided", _margin_rule(lambda s, p, n, g, t, b=b: np.broadcast_to(
        b * np.linalg.norm(g[None] - n, axis=1)[None], (len(s), len(n))))) for b in (0.02, 0.03)},
    # a margin relative to the threshold's distance from 1
    **{f"{c:g} × (1 − threshold)": ("decided", _margin_rule(lambda s, p, n, g, t, c=c: np.full(
        (len(s), len(n)), c * (1 - t)))) for c in (0.1, 0.2)},
    # family photos that score high for X protected: no correction below threshold + c
    **{f"{m:g}, none at ≥ threshold + {c:g}": ("decided", lambda s, p, n, g, t, m=m, c=c: (
        np.all(s[:, None] - p @ n.T >= m, axis=1) | (s >= t + c))) for m, c in ((0.008, 0.03), (0.015, 0.03))},
    # the margin only where the face is as near the negative as X's entry is (the negative's own neighbourhood)
    **{f"0 + {m:g} where face·negative ≥ X·negative − 0.01": ("decided", lambda s, p, n, g, t, m=m: np.all(
        (s[:, None] - p @ n.T >= 0) & ((p @ n.T < (n @ g)[None] - 0.01) | (s[:, None] - p @ n.T >= m)), axis=1))
       for m in (0.008, 0.012)},
    # a margin shrinking with the face's own score above the threshold
    **{f"{a:g} − 0.25 × (score − threshold)": ("decided", _margin_rule(lambda s, p, n, g, t, a=a: np.broadcast_to(
        (a - 0.25 * (s - t))[:, None], (len(s), len(n))))) for a in (0.006, 0.009, 0.012)},
}


def variant_names() -> list[str]:
    return [f"{m:g}" for m in NEGATIVE_MARGINS] + [f"{m:g}, face only" for m in FACE_ONLY_MARGINS]


def all_variants() -> list[str]:
    return variant_names() + list(ALTERNATIVES)


def still_named(member: str, score: np.ndarray, threshold: float, vectors: np.ndarray, idx: np.ndarray,
                negatives: np.ndarray, margin: float) -> np.ndarray:
    """Whether each photo `idx` (named `member` before) is still named after the correction: the device's rule."""
    return np.array([accept_with_negatives(member, float(score[i]), threshold, vectors[i], negatives, margin) == member
                     for i in idx], dtype=bool)


def record(row: dict[str, Any], variant: str, after: np.ndarray, lost: np.ndarray, visits: list[np.ndarray]) -> None:
    row[f"after_{variant}"] = int(np.sum(after))
    row[f"visits_after_{variant}"] = sum(visit_agreed(int(np.sum(after[v])), VISIT_FRAMES) for v in visits)
    row[f"family_lost_{variant}"] = int(np.sum(lost))


def lookalikes(part: str, people: list[str], face: np.ndarray, both: np.ndarray, ok: np.ndarray, labels: np.ndarray,
               rules: dict[str, Rule], sizes: tuple[int, ...], splits: int, draws: int) -> list[dict[str, Any]]:
    """One correction per lookalike (a stranger with a photo accepted as a member X), on the households of
    run_part with the largest cohort: per rule, margin and lookalike, the stranger's other photos named X
    (and visits of VISIT_FRAMES of them) before and after "this is not X" on one random accepted photo
    (CORRECTION_REPEATS choices), and the family's photos named X lost.

    As the daemon does it: the correction stores the vector the device decided on for that face (face+mirror
    where the second look ran, else face only: device/memory/corrections.py keeps the frames' vectors) and
    every later face named X is checked by faceberry.contract.accept_with_negatives with *its* decided vector
    (device/loop.py passes the recognition's vector). "face only" rows use the face-only vectors on both
    sides, as this study did before."""
    emb_face = np.zeros((len(ok), face.shape[1]), np.float32)
    emb_both = np.zeros_like(emb_face)
    emb_face[ok], emb_both[ok] = face, both
    rng = np.random.default_rng(7)
    out: list[dict[str, Any]] = []
    for split, cohort_people, households in draw_households(
            labels, ok, splits, draws, 0, sizes=sizes, cohort_people_count=round(COHORT_SHARE * len(people)),
            people=people, seed=1000 * (1 + list(parts_order).index(part))):
        cohort = cohort_of(emb_both, labels, ok, cohort_people, 0)
        for hh in households:
            own = emb_both[hh.enrol]
            own_labels = [str(x) for x in labels[hh.enrol]]
            gallery = gallery_from(own, own_labels, hh.home)
            look, fb, fsc, bb, bsc, truth, is_probe = household_scores(hh, gallery, emb_face, emb_both, ok, labels)
            who_lbl = labels[look]
            for name, rule in rules.items():
                th = rule(Case(gallery, hh.home, cohort, own, own_labels))
                if np.ndim(th):
                    continue
                th = float(th)
                who, score = decide(fb, fsc, bb, bsc, th)
                looked_again = np.abs(fsc - th) < SECOND_LOOK  # decide()'s second look
                decided = np.where(looked_again[:, None], emb_both[look], emb_face[look])
                family_right = (who == truth) & is_probe
                for stranger in sorted({str(x) for x in who_lbl[(who >= 0) & ~is_probe]}):
                    mine = np.flatnonzero(who_lbl == stranger)
                    taken = who[mine][who[mine] >= 0]
                    x = int(np.bincount(taken).argmax())  # the member they are most often taken for
                    member = hh.home[x]
                    accepted = mine[who[mine] == x]
                    family = np.flatnonzero(family_right & (who == x))  # the member's photos named them
                    for c in rng.choice(accepted, min(CORRECTION_REPEATS, len(accepted)), replace=False):
                        others = mine[mine != c]
                        before = who[others] == x
                        visits = [rng.choice(len(others), VISIT_FRAMES, replace=False)
                                  for _ in range(VISITS_PER_CORRECTION if len(others) >= VISIT_FRAMES else 0)]
                        row = {"part": part, "split": split, "household": hh.size, "draw": hh.draw, "rule": name,
                               "stranger": stranger, "member": member, "photos": len(others),
                               "accepted": len(accepted), "before": int(np.sum(before)),
                               "visits": len(visits),
                               "visits_before": sum(visit_agreed(int(np.sum(before[v])), VISIT_FRAMES) for v in visits),
                               "family_named": int(np.sum(family_right)), "family_named_x": len(family)}
                        for v in variant_names():
                            margin = float(v.split(",")[0])
                            vectors = emb_face[look] if "face only" in v else decided
                            negative = vectors[c][None]
                            after = before & still_named(member, score, th, vectors, others, negative, margin)
                            lost = ~still_named(member, score, th, vectors, family, negative, margin)
                            record(row, v, after, lost, visits)
                        f, b = emb_face[look[c]], emb_both[look[c]]
                        mirror = 2 * float(b @ f) * b - f  # the mirror image's vector: mirror_mean(f, m) = b
                        negatives = {"decided": decided[c][None],
                                     "face+mirror": np.stack([decided[c], f, mirror])}
                        for v, (kind, alt) in ALTERNATIVES.items():
                            n = negatives[kind]
                            after = before & alt(score[others], decided[others], n, gallery[x], th)
                            lost = ~alt(score[family], decided[family], n, gallery[x], th)
                            record(row, v, after, lost, visits)
                        out.append(row)
    return out


def summarise_lookalikes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for part, rule in sorted({(r["part"], r["rule"]) for r in rows}, key=lambda k: (parts_order.index(k[0]), k[1])):
        rs = [r for r in rows if r["part"] == part and r["rule"] == rule]
        before = sum(r["before"] for r in rs)
        photos = sum(r["photos"] for r in rs)
        visits = sum(r["visits"] for r in rs)
        visits_before = sum(r["visits_before"] for r in rs)
        for m in all_variants():
            after = sum(r[f"after_{m}"] for r in rs)
            visits_after = sum(r[f"visits_after_{m}"] for r in rs)
            out.append({"part": part, "rule": rule, "margin": m, "corrections": len(rs),
                        "lookalikes": len({(r["split"], r["household"], r["draw"], r["stranger"]) for r in rs}),
                        "households": len({(r["split"], r["household"], r["draw"]) for r in rs}),
                        "other_photos": photos, "named_before": before / photos if photos else None,
                        "named_after": after / photos if photos else None,
                        "after_over_before": after / before if before else None,
                        "visits": visits, "visits_named_before": visits_before / visits if visits else None,
                        "visits_named_after": visits_after / visits if visits else None,
                        "lookalikes_still_named_half": float(np.mean([r[f"after_{m}"] >= 0.5 * r["photos"]
                                                                      for r in rs if r["photos"]])),
                        "family_photos_lost": sum(r[f"family_lost_{m}"] for r in rs),
                        "family_photos_at_risk": sum(r["family_named_x"] for r in rs),
                        "family_photos_checked": sum(r["family_named"] for r in rs)})
    return out


def summarise(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["part"], e["rule"], e["cohort_per_person"], e["household"]), []).append(e)
    rows = []
    for (part, rule, k, size), es in groups.items():
        def col(key: str, es=es) -> np.ndarray:
            v = np.array([e[key] for e in es], float)
            return v[~np.isnan(v)]
        rows.append({"part": part, "rule": rule, "cohort_per_person": k, "household": size, "households": len(es),
                     "cohort_faces": float(np.mean(col("cohort_faces"))),
                     "threshold": float(np.mean(col("threshold"))), "threshold_sd": float(np.std(col("threshold"))),
                     "known": float(np.mean(col("known"))), "known_worst": float(np.min(col("known"))),
                     "strangers": float(np.mean(col("strangers"))), "strangers_worst": float(np.max(col("strangers"))),
                     "known_visits_right": float(np.mean(col("known_visits_right"))),
                     "known_visits_right_worst": float(np.min(col("known_visits_right"))),
                     "stranger_visits_named": float(np.mean(col("stranger_visits_named"))),
                     "stranger_visits_named_worst": float(np.max(col("stranger_visits_named")))})
    return rows


def goals(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (part, rule): issue 24's goals on every cohort of ≥ 500 faces, and the largest cohort's."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for part, rule in {(r["part"], r["rule"]) for r in rows}:
        rs = [r for r in rows if r["part"] == part and r["rule"] == rule]
        big = [r for r in rs if r["cohort_faces"] >= 500]
        largest = [r for r in rs if r["cohort_per_person"] == 0]
        out[(part, rule)] = {
            "cohorts_500_plus": bool(big) and all(r["known"] >= 0.985 and r["strangers"] <= 0.005
                                                  and r["strangers_worst"] <= 0.015 for r in big),
            "largest": all(r["known"] >= 0.99 and r["strangers"] <= 0.005 for r in largest),
            "min_known_500_plus": min((r["known"] for r in big), default=None),
            "max_strangers_500_plus": max((r["strangers"] for r in big), default=None),
            "max_worst_500_plus": max((r["strangers_worst"] for r in big), default=None),
            "mean_known": float(np.mean([r["known"] for r in rs])),
            "mean_strangers": float(np.mean([r["strangers"] for r in rs])),
        }
    return out


def pct(v: float | None) -> str:
    return "—" if v != v else percent(v, 2)  # the study's tables: two decimals; NaN where no faces were counted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=6, help="households drawn per size and split (default 6)")
    ap.add_argument("--splits", type=int, default=3, help="cohort/evaluation splits per part (default 3)")
    ap.add_argument("--visits", type=int, default=100, help="stranger visits simulated per household (default 100)")
    ap.add_argument("--parts", default="dev,test,full", help="which parts to run (default dev,test,full)")
    ap.add_argument("--lookalikes", action="store_true", help="also measure one correction per lookalike")
    ap.add_argument("--no-rules", action="store_true", help="skip the rule comparison (with --lookalikes)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "household"))
    args = ap.parse_args(argv)
    lfw = need_shared("faces", "lfw-dev")
    started = time.monotonic()
    from pathlib import Path

    emb = HouseholdEmbedder(Path(args.work), lfw)
    paths = [f for p in emb.names for f in emb.everyone[p]]
    labels = np.array([p for p in emb.names for _ in emb.everyone[p]])
    print(f"embedding {len(paths)} photos (int8, device code; cached) …", file=sys.stderr)
    face, both, ok = emb.clean(paths)
    peer = peer_embeddings(paths)
    if peer is None:
        print("note: face_recognition is not installed (bash bench/setup_peer.sh): its rows are left out",
              file=sys.stderr)
    else:
        print(f"face_recognition {peer[2].get('face_recognition')} (dlib {peer[2].get('dlib')}) found a face in "
              f"{int(peer[1].sum())} of {len(paths)} photos ({int((peer[1] & ok).sum())} of the {int(ok.sum())} "
              "ours found one in); a photo it finds none in is not named / not accepted", file=sys.stderr)
    entries: list[dict[str, Any]] = []
    for part in [p for p in parts_order if p in args.parts.split(",") and not args.no_rules]:
        people = parts(emb.names)[part]
        dev = part == "dev"
        print(f"part {part}: {len(people)} people …", file=sys.stderr)
        entries += run_part(part, people, face, both, ok, labels, candidates(dev), DEV_SIZES if dev else SIZES,
                            args.splits, args.draws, args.visits, peer=None if peer is None else peer[:2])
    looks: list[dict[str, Any]] = []
    if args.lookalikes:
        for part in [p for p in parts_order if p in args.parts.split(",")]:
            print(f"lookalikes, part {part} …", file=sys.stderr)
            splits, draws = LOOKALIKE_DRAWS.get(part, (args.splits, args.draws))
            looks += lookalikes(part, parts(emb.names)[part], face, both, ok, labels, lookalike_rules(),
                                DEV_SIZES if part == "dev" else SIZES, splits, draws)
    rows = summarise(entries)
    met = goals(rows)
    for part in [p for p in parts_order if p in args.parts.split(",")]:
        print(f"\n{part}: per rule, cohort (max per person → faces) and household size")
        print(table(["rule", "cohort", "people", "threshold", "known", "known worst", "strangers", "strangers worst",
                     "known/visit", "known/visit worst", "strangers/visit", "strangers/visit worst"],
                    [[r["rule"], f"{r['cohort_per_person'] or 'all'} → {r['cohort_faces']:.0f}", r["household"],
                      f"{r['threshold']:.4f}±{r['threshold_sd']:.4f}", pct(r["known"]), pct(r["known_worst"]),
                      pct(r["strangers"]), pct(r["strangers_worst"]), pct(r["known_visits_right"]),
                      pct(r["known_visits_right_worst"]), pct(r["stranger_visits_named"]),
                      pct(r["stranger_visits_named_worst"])]
                     for r in sorted((r for r in rows if r["part"] == part),
                                     key=lambda r: (r["rule"], r["cohort_faces"], r["household"]))]))
        print(table(["rule", "goals ≥500 faces", "largest cohort", "min known (≥500)", "max strangers (≥500)",
                     "worst draw (≥500)", "mean known", "mean strangers"],
                    [[rule, g["cohorts_500_plus"], g["largest"], pct(g["min_known_500_plus"]),
                      pct(g["max_strangers_500_plus"]), pct(g["max_worst_500_plus"]), pct(g["mean_known"]),
                      pct(g["mean_strangers"])]
                     for (p, rule), g in sorted(met.items()) if p == part]))
    look_rows = summarise_lookalikes(looks)
    if look_rows:
        print("\nlookalikes: one correction (\"this is not X\", a random one of their accepted photos) per stranger "
              "accepted as a member; their other photos named X before and after, the family's photos lost")
        print(table(["part", "rule", "negative margin", "corrections", "lookalikes", "households", "other photos",
                     "named X before", "after", "after/before", "visits named X before", "after",
                     "family photos lost"],
                    [[r["part"], r["rule"], r["margin"], r["corrections"], r["lookalikes"], r["households"],
                      r["other_photos"], pct(r["named_before"]), pct(r["named_after"]), pct(r["after_over_before"]),
                      pct(r["visits_named_before"]), pct(r["visits_named_after"]),
                      f"{r['family_photos_lost']} of {r['family_photos_at_risk']} named X "
                      f"({r['family_photos_checked']} named)"] for r in look_rows
                     if r["margin"] in variant_names()]))
        print("\nthe shipped threshold rule; each correction rule: share of what the lookalike was named X that is "
              "left after one correction, the family's photos of X lost")
        shown = [p for p in parts_order if any(r["part"] == p for r in look_rows)]
        cell = {(r["part"], r["margin"]): r for r in look_rows if r["rule"] == "current"}
        print(table(["correction rule (margin)", *[f"{p}: after/before, lost" for p in shown]],
                    [[v, *[f"{pct(cell[(p, v)]['after_over_before'])}, {cell[(p, v)]['family_photos_lost']}"
                           if (p, v) in cell else "—" for p in shown]] for v in all_variants()]))
    result = {"machine": machine(), "seconds": round(time.monotonic() - started, 1),
              "protocol": {"sizes": SIZES, "dev_sizes": DEV_SIZES, "cohort_per_person": PER_PERSON,
                           "dev_people": DEV_PEOPLE, "cohort_share": COHORT_SHARE, "draws": args.draws,
                           "splits": args.splits, "visits": args.visits, "target_far": TARGET,
                           "parts": {k: len(v) for k, v in parts(emb.names).items()}},
              "rows": rows, "lookalikes": look_rows,
              "face_recognition": None if peer is None else {
                  "versions": peer[2], "default_tolerance": DLIB_TOLERANCE, "photos": len(paths),
                  "photos_with_face": int(peer[1].sum()), "photos_with_face_ours_too": int((peer[1] & ok).sum())},
              "goals": [{"part": p, "rule": r, **g} for (p, r), g in sorted(met.items())]}
    path = write_result("calibration", result)
    print(f"{result['seconds']:.0f} s on {machine().get('cpu', '')}; wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
