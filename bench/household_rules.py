"""Gallery and score rules for a household, compared at the same share of strangers accepted (issue 14).

    python -m bench.household            # first: builds the backbone, the int8 bundle and the cohorts
    python -m bench.household_rules [--draws 8]

The shipped rule is one centroid per person (faceberry.contract.centroid of the enrolled photos' face+mirror
embeddings) and one threshold on the best cosine over the gallery. Each alternative here is kept only if
it names more of the family at the *same* share of strangers' photos accepted: for every rule a
threshold is swept, and known and strangers are averaged over the same households
bench.household draws (same people, same 10 enrolled photos, same probes), and the known rate is read off
at 0.1%, 0.25% and 0.5% of strangers accepted (linear interpolation between swept points). The threshold
is swept over one grid per rule and household size, common to its households (the rule's ROC, free of any
one household's calibration noise).

Rules: the centroid of face-only embeddings (the rule before 2026-12-04); the centroid of face+mirror
embeddings (every face and its mirror image, averaged; shipped: the device mirrors a camera face only
when its score is near the threshold, which bench.household shows decides the same); a gallery of the
photos and their mirror images (the card's flip augmentation, free on the device); the nearest enrolled
photo (face_recognition's rule); the mean of each person's 3 nearest photos; the centroid plus 2 k-means
prototypes per person (glasses, beard); a trimmed centroid without the enrolled photo farthest from it (a
quality gate on what the embedder sees); Z-norm (each person's scores standardised on the cohort's scores
against them) and T-norm (each face's scores standardised on its scores against the cohort's people).

Clean photos, int8 embedder of bench.household's bundle, cohort = each cohort person's first 30 photos
with a face (as `train cohort --max-per-person 30` takes them), in both views for the flip rules.
Prints a table and writes bench/results/household-rules[-NAME].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, machine, need_shared, table, write_result
from bench.household import SIZES, draw_households
from faceberry.contract import l2_normalize, mirrored

RATES = (0.001, 0.0025, 0.005)  # strangers accepted, where known is read off
GRID = 400  # thresholds swept per rule and household size
Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # faces → (best member index, score)


def per_person(sims: np.ndarray, glab: np.ndarray, home: list[str], reduce: Callable[[np.ndarray], np.ndarray]
               ) -> np.ndarray:
    """(faces, members) from (faces, gallery rows) by reducing each member's rows."""
    return np.stack([reduce(sims[:, glab == p]) for p in home], axis=1)


def best_of(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    best = np.argmax(s, axis=1)
    return best, s[np.arange(len(s)), best]


def centroids(emb: np.ndarray, glab: np.ndarray, home: list[str]) -> np.ndarray:
    return np.stack([l2_normalize(l2_normalize(emb[glab == p]).mean(axis=0)) for p in home])


def rule_scorers(plain: np.ndarray, flipped: np.ndarray, enrol: list[int], glab: np.ndarray, home: list[str],
                 cohort_idx: np.ndarray, cohort_ids: np.ndarray) -> dict[str, tuple[Scorer, bool]]:
    """Each rule's scorer and whether it reads flip-averaged faces."""
    from sklearn.cluster import KMeans

    avg = l2_normalize(plain + flipped)
    g, gf, ga = plain[enrol], flipped[enrol], avg[enrol]
    cent = centroids(g, glab, home)
    cent_avg = centroids(ga, glab, home)
    cent_both = centroids(np.concatenate([g, gf]), np.concatenate([glab, glab]), home)
    protos, plab = [], []
    for i, p in enumerate(home):
        x = g[glab == p]
        km = KMeans(2, n_init=5, random_state=0).fit(x)
        protos.append(cent[i])
        plab.append(p)
        for k in range(2):
            if np.sum(km.labels_ == k) >= 3:
                protos.append(l2_normalize(x[km.labels_ == k].mean(axis=0)))
                plab.append(p)
    protos_a, plab_a = np.stack(protos), np.array(plab)
    keep = np.ones(len(g), bool)
    for i, p in enumerate(home):
        rows = np.flatnonzero(glab == p)
        keep[rows[np.argmin(g[rows] @ cent[i])]] = False
    trimmed = centroids(g[keep], glab[keep], home)
    coh = plain[cohort_idx]
    zs = coh @ cent.T  # the cohort's scores against each member
    z_mu, z_sd = zs.mean(axis=0), zs.std(axis=0) + 1e-6
    _, inv = np.unique(cohort_ids, return_inverse=True)
    t_models = l2_normalize(np.stack([coh[inv == k].mean(axis=0) for k in range(inv.max() + 1)]))

    def tnorm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = x @ t_models.T
        return best_of((x @ cent.T - t.mean(axis=1, keepdims=True)) / (t.std(axis=1, keepdims=True) + 1e-6))

    return {
        "centroid, face only (before 2026-12-04)": (lambda x: best_of(x @ cent.T), False),
        "centroid, face + mirror image (shipped)": (lambda x: best_of(x @ cent_avg.T), True),
        "gallery + mirror images": (lambda x: best_of(x @ cent_both.T), False),
        "nearest enrolled photo": (lambda x: best_of(per_person(x @ g.T, glab, home, lambda s: s.max(axis=1))), False),
        "mean of 3 nearest photos": (lambda x: best_of(per_person(
            x @ g.T, glab, home, lambda s: np.sort(s, axis=1)[:, -3:].mean(axis=1))), False),
        "centroid + 2 k-means prototypes": (lambda x: best_of(per_person(
            x @ protos_a.T, plab_a, home, lambda s: s.max(axis=1))), False),
        "trimmed centroid (farthest photo out)": (lambda x: best_of(x @ trimmed.T), False),
        "Z-norm (per person, on the cohort)": (lambda x: best_of((x @ cent.T - z_mu) / z_sd), False),
        "T-norm (per face, on the cohort)": (tnorm, False),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.household_rules", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=8, help="households drawn per size and split (default 8)")
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "household")
    ap.add_argument("--name", default="")
    args = ap.parse_args(argv)
    lfw = need_shared("faces", "lfw-dev")
    started = time.monotonic()
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier
    from faceberry.preprocess import Preprocessing
    from faceberry.train.crops import CropMaker, default_cache_dir, list_people

    backbone, bundle_dir = args.work / "backbone", args.work / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        sys.exit(f"error: {bundle_dir} is absent; run `python -m bench.household` first (it builds the backbone "
                 "and the int8 bundle this compares rules on)")
    prep = Preprocessing.from_dict(json.loads((backbone / "config.json").read_text())["preprocessing"])
    maker = CropMaker(prep.input_size, cache_dir=default_cache_dir(), alignment=prep.alignment)
    clf = FaceClassifier(load_bundle(bundle_dir), num_threads=1)
    everyone = {p: f for p, f in list_people(lfw).items() if f}
    paths = [f for p in sorted(everyone) for f in everyone[p]]
    labels = np.array([p for p in sorted(everyone) for _ in everyone[p]])
    print(f"embedding {len(paths)} photos and their mirror images (int8, device code) …", file=sys.stderr)
    plain = np.zeros((len(paths), 128), np.float32)
    flipped = np.zeros_like(plain)
    ok = np.zeros(len(paths), bool)
    for i, path in enumerate(paths):
        crop, _ = maker.crop_file(path)
        if crop is not None:
            ok[i] = True
            plain[i] = clf.raw(crop)
            flipped[i] = clf.raw(mirrored(crop))
    plain, flipped = l2_normalize(plain), l2_normalize(flipped)
    averaged = l2_normalize(plain + flipped)

    # Per rule and size, per household: (member right?, its score) of each probe, each stranger's score.
    scored: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for _split, cohort_people, households in draw_households(labels, ok, args.splits, args.draws, 0):
        cohort_idx = np.concatenate([np.flatnonzero((labels == p) & ok)[:30] for p in cohort_people])
        cohort_ids = labels[cohort_idx]  # Z-norm's and T-norm's cohort
        for hh in households:
            glab = labels[hh.enrol]
            probes = np.array(hh.probes)
            strangers = np.flatnonzero(hh.strangers & ok)
            for rule, (score, flip) in rule_scorers(plain, flipped, hh.enrol, glab, hh.home, cohort_idx,
                                                    cohort_ids).items():
                faces = averaged if flip else plain
                best, s = score(faces[probes])
                scored.setdefault((rule, hh.size), []).append(
                    (np.array(hh.home)[best] == labels[probes], s, score(faces[strangers])[1]))

    rows = []
    for (rule, size), per_household in scored.items():
        pooled = np.concatenate([st for _, _, st in per_household])
        ts = np.quantile(pooled, 1 - np.geomspace(1e-5, 0.05, GRID))
        known = np.mean([[np.mean(r & (s >= t)) for t in ts] for r, s, _ in per_household], axis=0)
        strangers = np.mean([[np.mean(st >= t) for t in ts] for _, _, st in per_household], axis=0)
        order = np.argsort(strangers, kind="stable")
        rows.append({"rule": rule, "household": size, "households": len(per_household),
                     **{f"known_at_{r}": float(np.interp(r, strangers[order], known[order])) for r in RATES}})
    result: dict[str, Any] = {"machine": machine(), "seconds": round(time.monotonic() - started, 1),
                              "rates": RATES, "draws": args.draws, "splits": args.splits, "rows": rows}
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    by = {(r["rule"], r["household"]): r for r in rows}
    print(table(["rule", *(f"{n} people: known at {100 * r:g}%" for n in SIZES for r in RATES)],
                [[rule, *(f"{100 * by[(rule, n)][f'known_at_{r}']:.2f}%" for n in SIZES for r in RATES)]
                 for rule in rules]))
    path = write_result("household-rules" + (f"-{args.name}" if args.name else ""), result)
    print(f"{result['seconds']:.0f} s on {machine().get('cpu', '')}; wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
