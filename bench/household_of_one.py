"""A household of one through the user's own commands (issue 24, "is it me?"), with enough strangers to show 0.5%.

    nice -n 10 python -m bench.household_of_one [--draws 6]

Per seeded draw from lfw-dev (bench.protocol's Split, laid out by bench.protocol.materialise as symlinks): one
person with at least 20 photos (a different one each draw), 10 of their photos enrolled and the rest known
probes; the other 104 people split once per draw into cohort people (40%: every face of theirs builds the
stranger cohort) and stranger people (the rest: every photo of theirs is a stranger probe, ~1,200 in all), so a
stranger rate of 0.5% is five or six photos, not a fraction of one.

The commands a user runs, as subprocesses of this python (bench.accuracy.sh):
    python -m train cohort --backbone B --photos <cohort people>      every face: --photos keeps all it is given
    python -m train --photos <the person> --backbone B --cohort C --out RUN
    python -m convert --run RUN --out BUNDLE --quantization int8      (bench.accuracy.convert_run)
    python -m device eval --bundle BUNDLE --photos <probes> --json EVAL (bench.accuracy.device_eval)
B is dlib's ResNet backbone (`python -m train backbone --arch dlib-resnet`), copied once into --work because
`train cohort` writes its cohort beside the backbone; each draw's cohort is moved out to the draw's folder.

Per draw: the person, photos enrolled and probed, cohort people and faces, the threshold and its 90% interval
over the cohort's people (the bundle's manifest: convert calibrates it again on the int8 embedder), known probes
named right, strangers' photos accepted (count over those with a face) and the stranger most often accepted
(device eval's per-stranger `taken_for`); then the mean and the worst draw. Definitions are device eval's: known =
named right over all known probes (a face not found is a miss); strangers = accepted as the person over
strangers' photos with a face; photos with several faces none of which it can single out are left out and
counted.

Prints a table and writes bench/results/household_of_one[-NAME].json; the draws' runs and bundles stay in --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy import PY, convert_run, device_eval, sh
from bench.common import ROOT, machine, need_shared, pct, table, write_result
from bench.protocol import Split, materialise
from faceberry import cohort as cohort_mod
from faceberry.contract import list_images

ENROL = 10
MIN_PHOTOS = 20
COHORT_FRACTION = 0.4
SEED = 24
GOAL_KNOWN, GOAL_STRANGERS = 0.97, 0.005


def draw(source: Path, index: int, seed: int = SEED) -> Split:
    """Draw `index` (seeded): train = the person's ENROL enrolled photos, test = their other photos, negatives =
    the cohort people (every photo), strangers = everyone else (every photo). Paths are <person>/<file> relative
    to `source`. The person is a different one for each index until every eligible person has been drawn."""
    people = {d.name: [f"{d.name}/{f.name}" for f in list_images(d)] for d in sorted(source.iterdir()) if d.is_dir()}
    people = {p: files for p, files in people.items() if files}
    eligible = sorted(p for p, files in people.items() if len(files) >= MIN_PHOTOS)
    if not eligible:
        raise ValueError(f"{source}: nobody has {MIN_PHOTOS}+ photos to enrol {ENROL} and keep the rest as probes")
    person = str(np.random.default_rng(seed).permutation(eligible)[index % len(eligible)])
    rng = np.random.default_rng([seed, index])
    mine = [people[person][i] for i in rng.permutation(len(people[person]))]
    others = [str(p) for p in rng.permutation(sorted(set(people) - {person}))]
    n_cohort = round(len(others) * COHORT_FRACTION)
    split = Split(str(source), seed * 1000 + index, MIN_PHOTOS, ENROL, COHORT_FRACTION,
                  train={person: sorted(mine[:ENROL])}, test={person: sorted(mine[ENROL:])})
    split.negatives = {p: people[p] for p in sorted(others[:n_cohort])}
    split.strangers = {p: people[p] for p in sorted(others[n_cohort:])}
    return split


def backbone_copy(source: Path, work: Path) -> Path:
    """A copy of the backbone without a cohort (built with `train backbone --arch dlib-resnet` if `source` has
    none): `train cohort` writes beside it, and the backbone other benches use must keep theirs."""
    if not (source / "config.json").is_file():
        sh([PY, "-m", "train", "backbone", "--arch", "dlib-resnet", "--out", source, "--force"], "train backbone")
    target = work / "backbone"
    if not (target / "config.json").is_file():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(cohort_mod.COHORT_FILE), dirs_exist_ok=True)
    return target


def run_draw(split: Split, index: int, backbone: Path, work: Path) -> dict[str, Any]:
    """The user's commands on one draw; its row."""
    t0 = time.monotonic()
    folder = work / f"draw-{index}"
    dirs = materialise(split, folder / "photos")
    (backbone / cohort_mod.COHORT_FILE).unlink(missing_ok=True)
    sh([PY, "-m", "train", "cohort", "--backbone", backbone, "--photos", dirs["negatives"], "--log-level", "WARNING"],
       "train cohort")
    cohort_file = folder / "cohort.npz"
    (backbone / cohort_mod.COHORT_FILE).replace(cohort_file)
    cohort = cohort_mod.load(cohort_file)
    run, bundle = folder / "run", folder / "bundle"
    sh([PY, "-m", "train", "--photos", dirs["train"], "--backbone", backbone, "--cohort", cohort_file, "--out", run,
        "--force", "-q"], "training")
    conversion = convert_run(run, bundle, "int8")
    ev = device_eval(bundle, dirs["eval"], folder / "eval.json")
    report = json.loads((run / "report.json").read_text())
    (person,) = split.train
    c = ev["counts"]
    strangers_found = c["stranger_probes"] - c["stranger_no_face"]
    worst_name, worst = max(ev["strangers"].items(), key=lambda kv: (kv[1]["false_accepts"], kv[0]))
    th = report["threshold"]
    shipped = json.loads((bundle / "manifest.json").read_text())["thresholds"]
    return {
        "draw": index, "person": person, "fingerprint": split.fingerprint(),
        "enrolled_photos": len(split.train[person]),
        "gallery_photos": report["per_person"][person]["gallery_photos"],
        "known_photos": len(split.test[person]), "known_probes": c["known_probes"],
        # device eval leaves out photos with several faces it cannot single the subject out of (and counts them)
        "several_faces_skipped": c.get("several_faces", 0), "cohort_people_given": len(split.negatives),
        "cohort_photos_given": sum(map(len, split.negatives.values())),
        "cohort_people": cohort.people, "cohort_faces": len(cohort),
        # The bundle's threshold decides (convert calibrates it again on the int8 embedder); training's beside it.
        "threshold": shipped["accept"], "accept_interval": shipped.get("accept_interval"),
        "threshold_basis": shipped.get("basis"), "train_threshold": th["accept"],
        "quantization": ev["classifier"]["quantization"],
        "convert_refused": conversion.get("refused_at_default_margin"),
        "known": ev["known_accuracy"], "known_right": c["right"], "known_no_face": c["known_no_face"],
        "strangers": ev["stranger_false_accept_rate"], "false_accepts": c["false_accepts"],
        "stranger_photos": sum(map(len, split.strangers.values())), "strangers_found": strangers_found,
        "stranger_people": len(ev["strangers"]),
        "stranger_no_face": c["stranger_no_face"],
        "worst_stranger": {"name": worst_name, **{k: worst[k] for k in ("false_accepts", "probes", "no_face",
                                                                            "false_accept_rate", "taken_for")}},
        "strangers_accepted": {n: s["false_accepts"] for n, s in ev["strangers"].items() if s["false_accepts"]},
        "eval_json": str(folder / "eval.json"),
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.household_of_one", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=6, help="seeded draws, a different person each (default 6)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"seed of the draws (default {SEED})")
    ap.add_argument("--backbone", type=Path, default=ROOT / "bench" / "work" / "household" / "backbone",
                    help="dlib-resnet backbone directory, built there if absent (default: bench.household's)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "household_of_one")
    ap.add_argument("--name", default="", help="suffix for the result file: household_of_one-NAME.json")
    args = ap.parse_args(argv)
    lfw = need_shared("faces", "lfw-dev")
    started = time.monotonic()
    info = machine()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    backbone = backbone_copy(args.backbone.resolve(), work)
    rows = []
    for i in range(args.draws):
        split = draw(lfw, i, args.seed)
        print(f"draw {i + 1}/{args.draws}: {next(iter(split.train))} …", file=sys.stderr, flush=True)
        rows.append(run_draw(split, i, backbone, work))

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    summary = {"known_mean": mean("known"), "known_worst": min(r["known"] for r in rows),
               "strangers_mean": mean("strangers"), "strangers_worst": max(r["strangers"] for r in rows),
               "strangers_pooled": sum(r["false_accepts"] for r in rows) / sum(r["strangers_found"] for r in rows),
               "known_pooled": sum(r["known_right"] for r in rows) / sum(r["known_probes"] for r in rows),
               "false_accepts": sum(r["false_accepts"] for r in rows),
               "strangers_found": sum(r["strangers_found"] for r in rows)}
    summary["goal_met_mean"] = summary["known_mean"] >= GOAL_KNOWN and summary["strangers_mean"] <= GOAL_STRANGERS
    summary["goal_met_every_draw"] = all(r["known"] >= GOAL_KNOWN and r["strangers"] <= GOAL_STRANGERS for r in rows)
    seconds = round(time.monotonic() - started, 1)
    result = {"machine": info, "seconds": seconds,
              "protocol": {"draws": args.draws, "seed": args.seed, "enrolled": ENROL, "min_photos": MIN_PHOTOS,
                           "cohort_fraction": COHORT_FRACTION, "source": str(lfw), "backbone": str(args.backbone),
                           "goal": {"known": GOAL_KNOWN, "strangers": GOAL_STRANGERS}},
              "draws": rows, "summary": summary}
    path = write_result("household_of_one" + (f"-{args.name}" if args.name else ""), result)

    def interval(r: dict[str, Any]) -> str:
        iv = r["accept_interval"]
        return f"{r['threshold']:.3f}" + (f" ({iv[0]:.3f}–{iv[1]:.3f})" if iv else "")

    body = [[r["draw"], r["person"], f"{r['enrolled_photos']} / {r['known_probes']}",
             f"{r['cohort_people']} / {r['cohort_faces']}", interval(r),
             f"{pct(r['known'], 1)} ({r['known_right']}/{r['known_probes']})",
             f"{pct(r['strangers'], 2)} ({r['false_accepts']}/{r['strangers_found']})",
             (f"{r['worst_stranger']['name']} {r['worst_stranger']['false_accepts']}/{r['worst_stranger']['probes']}"
              if r["worst_stranger"]["false_accepts"] else "none"), f"{r['seconds']:.0f}"] for r in rows]
    body.append(["mean", "", "", "", "", f"{pct(summary['known_mean'], 1)} (pooled {pct(summary['known_pooled'], 1)})",
                 f"{pct(summary['strangers_mean'], 2)} "
                 f"(pooled {summary['false_accepts']}/{summary['strangers_found']})", "", ""])
    body.append(["worst draw", "", "", "", "", pct(summary["known_worst"], 1), pct(summary["strangers_worst"], 2),
                 "", ""])
    print(table(["draw", "person", "enrolled / probes", "cohort people / faces", "threshold (90% interval)",
                 "known named right", "strangers accepted", "stranger most accepted", "seconds"], body))
    met = "met" if summary["goal_met_mean"] else "not met"
    print(f"\ngoal known ≥ {pct(GOAL_KNOWN, 0)}, strangers ≤ {pct(GOAL_STRANGERS, 1)}: {met} on the mean "
          f"({pct(summary['known_mean'], 1)}, {pct(summary['strangers_mean'], 2)}); worst draw "
          f"{pct(summary['known_worst'], 1)} known, {pct(summary['strangers_worst'], 2)} strangers"
          f"{'' if summary['goal_met_every_draw'] else ' (not every draw meets it)'}")
    print(f"{seconds:.0f} s on {info['cpu']}; wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
