"""float32 vs float16 vs int8 bundles of one training run: accuracy, agreement, size and speed.

    nice python -m bench.quantization                     # the run python -m bench.accuracy trains (reused)
    nice python -m bench.quantization --run RUN_DIR       # any training run

Each quantisation is built with `python -m convert --quantization Q` and measured with
`python -m device eval` on the accuracy protocol's probes (bench/protocol.py), so accuracy and
stranger FAR are through the device path with each bundle's own calibrated threshold. Also: top-1
agreement of each bundle's answers with the float32 bundle's on the same probes, the classifier's bare
invoke time (1 and 2 threads, on the run's own validation crops), and file sizes.

Writes bench/results/quantization.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy import LFW_DEV, SHARED_WEIGHTS, bundle_size, convert_run, device_eval, train_run
from bench.common import RESULTS, describe, fmt_ms, machine, pct, stats, table, write_result
from bench.protocol import make_split, materialise

QUANTIZATIONS = ("float32", "float16", "int8")


def invoke_ms(classifier_path: Path, crops: np.ndarray, prep, threads: int, repeat: int = 3) -> dict[str, Any]:
    from faceberry.preprocess import normalize
    from faceberry.runtime import TFLiteModel

    model = TFLiteModel(classifier_path, num_threads=threads)
    for crop in crops[:3]:
        model.run(normalize(crop[None], prep))
    times = []
    for crop in crops:
        model.run(normalize(crop[None], prep))
        for _ in range(repeat):
            t0 = time.perf_counter()
            model.interpreter.invoke()
            times.append((time.perf_counter() - t0) * 1e3)
    return stats(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=RESULTS / "accuracy",
                        help="bench/accuracy.py's work folder, whose run is reused (default %(default)s)")
    parser.add_argument("--run", type=Path, help="training run to convert (default: train or reuse WORK/run)")
    parser.add_argument("--quantizations", nargs="+", default=list(QUANTIZATIONS), choices=QUANTIZATIONS,
                        help="bundles to build (default: float32 float16 int8)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts for invoke timing")
    parser.add_argument("--crops", type=int, default=40, help="validation crops timed per bundle (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    parser.add_argument("--target-far", type=float, default=0.02, help="as bench/accuracy.py (default 0.02)")
    args = parser.parse_args(argv)
    if not LFW_DEV.is_dir():
        print(f"error: {LFW_DEV} is absent ; put the shared data beside the repo as ../shared", file=sys.stderr)
        return 2

    from faceberry.bundle import load_bundle

    info = machine()
    split = make_split(LFW_DEV, seed=args.seed)
    work = args.work.resolve()
    dirs = materialise(split, work / "split")
    run_dir = args.run.resolve() if args.run else work / "run"
    train_meta = None
    if args.run is None:
        ns = argparse.Namespace(weights=str(SHARED_WEIGHTS), seed=args.seed, target_far=args.target_far,
                                backbone=None, train_arg=[], retrain=False, split_fingerprint=split.fingerprint())
        train_meta = train_run(dirs, run_dir, ns)
    with np.load(run_dir / "crops.npz", allow_pickle=False) as data:
        crops, roles = data["crops"], data["split"]
    timing_crops = crops[roles == "val"][: args.crops] if (roles == "val").any() else crops[: args.crops]

    rows: dict[str, dict[str, Any]] = {}
    for q in args.quantizations:
        bundle_dir = work / f"bundle-{run_dir.name}-{q}"
        conv = convert_run(run_dir, bundle_dir, q)
        ev = device_eval(bundle_dir, dirs["eval"], work / f"eval-{bundle_dir.name}.json")
        bundle = load_bundle(bundle_dir)
        rows[q] = {
            "bundle": str(bundle_dir), "bundle_id": ev["bundle_id"], **conv,
            "accept_threshold": ev["classifier"]["accept_threshold"],
            "known_accuracy": ev["known_accuracy"], "stranger_false_accept_rate": ev["stranger_false_accept_rate"],
            "closed_set_accuracy": ev["closed_set_accuracy"], "operating_points": ev["operating_points"],
            "classify_ms_in_pipeline": ev["latency_ms"]["classify"],
            "classifier_bytes": bundle.classifier_path.stat().st_size, "bundle_size": bundle_size(bundle_dir),
            "invoke_ms": {str(t): invoke_ms(bundle.classifier_path, timing_crops, bundle.preprocessing, t)
                          for t in args.threads},
            "manifest_metrics": bundle.manifest.get("metrics", {}),
            "_predicted": {p["path"]: p["predicted"] for p in ev["probes"]},
            "_best": {p["path"]: p["best"] for p in ev["probes"]},
        }
    ref = rows.get("float32")
    for row in rows.values():
        if ref is not None:
            paths = list(ref["_best"])
            row["agreement_with_float32"] = {
                "decision": float(np.mean([row["_predicted"].get(p) == ref["_predicted"][p] for p in paths])),
                "top1": float(np.mean([row["_best"].get(p) == ref["_best"][p] for p in paths])),
            }
    for row in rows.values():
        del row["_predicted"], row["_best"]
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]

    print(f"\nfloat32 vs float16 vs int8 — {describe(info)}; run {run_dir}")
    at2 = {q: next((p for p in r["operating_points"] if p["target_far"] == 0.02), None) for q, r in rows.items()}
    print(table(
        ["bundle", "classifier size", "known acc.", "stranger FAR", "known @ ≤2% FAR", "top-1 = float32",
         "decision = float32", *[f"invoke ms {t} thr (med / p95)" for t in args.threads], "classify in pipeline"],
        [[q + (" (refused by convert)" if r.get("refused_at_default_margin") else ""),
          f"{r['classifier_bytes'] / 1e6:.2f} MB", pct(r["known_accuracy"]), pct(r["stranger_false_accept_rate"]),
          pct(at2[q]["known_accuracy"]) if at2[q] else "—",
          pct(r.get("agreement_with_float32", {}).get("top1")),
          pct(r.get("agreement_with_float32", {}).get("decision")),
          *[fmt_ms(r["invoke_ms"][str(t)]) for t in args.threads], fmt_ms(r["classify_ms_in_pipeline"])]
         for q, r in rows.items()]))
    path = write_result("quantization", {"machine": info, "run": str(run_dir), "train": train_meta,
                                         "split_fingerprint": split.fingerprint(), "bundles": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
