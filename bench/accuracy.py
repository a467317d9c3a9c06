"""Few-shot accuracy side by side: faceberry's bundle vs face_recognition (dlib), same split.

    nice python -m bench.accuracy                          # train, convert int8, eval, and the peer
    nice python -m bench.accuracy --bundle-from BUNDLE_DIR # evaluate a bundle built elsewhere
    nice python -m bench.accuracy --bundle-from RUN_DIR    # convert a run (e.g. --backbone) and evaluate
    nice python -m bench.accuracy --backbone BACKBONE_DIR  # train few-shot on a face-aware backbone

Protocol (bench/protocol.py): lfw-dev people with ≥ 20 photos, 10 photos each for training, the rest as
probes; the other people are split by person into training negatives and held-out strangers.
faceberry is trained with the real CLIs — `python -m train` (with the shared ImageNet weights file),
`python -m convert` — and measured with `python -m device eval --json`, i.e. through the device's own
detect → align → classify path. The peer, face_recognition 1.3 (HOG + 128-d dlib encodings, run in
.venv-bench), is scored on the same photos: nearest training encoding at its default tolerance 0.6,
per-person mean encoding at 0.45, and per-person mean at a distance calibrated on the same training
negatives for the same target false-accept rate as faceberry's threshold.

Definitions are device eval's: known accuracy = right person AND accepted, over all known probes (a face
not found is a miss); stranger FAR = strangers accepted as anyone, over strangers whose face was found.
"At x% FAR" rows set each system's threshold on the test strangers themselves (an oracle, for comparing
the features rather than the calibration).

Writes bench/results/accuracy[-NAME].json; the run and bundles stay under --work for reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS,
    ROOT,
    SHARED_WEIGHTS,
    describe,
    machine,
    pct,
    peer_python,
    run_peer,
    table,
    write_result,
)
from bench.protocol import LFW_DEV, Split, make_split, materialise
from faceberry.classifier import UNKNOWN
from faceberry.device.recognition.evaluate import TARGET_FARS, operating_points

PY = sys.executable
PEER_CACHE = RESULTS / "cache" / "peer-encodings.json"


def sh(cmd: list[str], what: str, may_fail: bool = False) -> tuple[float, str | None]:
    """Run a faceberry CLI; returns its wall time in seconds and, if it failed and may_fail, its last
    stderr line (otherwise a failure ends the benchmark with that CLI's error)."""
    print(f"$ {' '.join(str(c) for c in cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, check=False, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.startswith("error:")),
                    f"exit {proc.returncode}")
        if may_fail:
            return seconds, last
        sys.exit(f"error: {what} failed (exit {proc.returncode}) ; see its message above")
    return seconds, None


def train_run(split_dirs: dict[str, Path], run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    meta_path = run_dir.parent / f"{run_dir.name}.meta.json"
    cmd = [PY, "-m", "train", "--photos", split_dirs["train"], "--negatives", split_dirs["negatives"],
           "--out", run_dir, "--weights", args.weights, "--seed", str(args.seed),
           "--target-far", str(args.target_far), "--force", "--quiet"]
    if args.backbone:
        cmd += ["--backbone", args.backbone]
    cmd += args.train_arg
    key = {"cmd": [str(c) for c in cmd[3:]], "fingerprint": args.split_fingerprint}
    if not args.retrain and meta_path.is_file() and (run_dir / "model.keras").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            print(f"reusing the training run in {run_dir} (same split and flags; --retrain to redo it)",
                  file=sys.stderr)
            return meta
    seconds, _ = sh(cmd, "training")
    meta = {"key": key, "train_seconds": round(seconds, 1), "command": "python -m train " + " ".join(key["cmd"])}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def convert_run(run_dir: Path, bundle_dir: Path, quantization: str, max_drop: float | None = None) -> dict[str, Any]:
    """python -m convert with its own accuracy guard; if the guard refuses the bundle, say so and convert
    again with the guard off, so the refused model is still measured (and the refusal reported)."""
    cmd = [PY, "-m", "convert", "--run", run_dir, "--out", bundle_dir, "--quantization", quantization,
           "--force", "--quiet"]
    if max_drop is not None:
        cmd += ["--max-drop", str(max_drop)]
    seconds, refused = sh(cmd, f"conversion to {quantization}", may_fail=max_drop is None)
    out: dict[str, Any] = {"convert_seconds": round(seconds, 1), "max_drop": max_drop}
    if refused:
        print(f"note: convert refused the {quantization} bundle ({refused}); measuring it anyway with "
              "--max-drop 100 --min-agreement 0", file=sys.stderr)
        seconds, _ = sh([*cmd, "--max-drop", "100", "--min-agreement", "0"], f"conversion to {quantization}")
        out.update(convert_seconds=round(seconds, 1), refused_at_default_margin=refused, max_drop=100.0)
    return out


def device_eval(bundle_dir: Path, photos: Path, out: Path, threads: int = 1) -> dict[str, Any]:
    sh([PY, "-m", "device", "eval", "--bundle", bundle_dir, "--photos", photos, "--json", out,
        "--threads", str(threads), "--quiet"], "device eval")
    return json.loads(out.read_text())


def bundle_size(bundle_dir: Path) -> dict[str, int]:
    files = {p.name: p.stat().st_size for p in sorted(bundle_dir.iterdir()) if p.is_file()}
    return {"total_bytes": sum(files.values()), **files}


# ---- the peer -----------------------------------------------------------------------------------------

def peer_encodings(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """face_recognition encodings of the largest face in each photo, cached by path, size and mtime."""
    cache: dict[str, Any] = {}
    if PEER_CACHE.is_file():
        cache = json.loads(PEER_CACHE.read_text())
    def key(p: Path) -> str:
        st = p.stat()
        return f"{p}|{st.st_size}|{int(st.st_mtime)}"
    missing = sorted({str(p) for p in paths if key(p) not in cache})
    if missing:
        print(f"face_recognition: encoding {len(missing)} photos (cached for next time)…", file=sys.stderr, flush=True)
        listing = RESULTS / "cache" / "peer-todo.json"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps(missing))
        result = run_peer(["encode", "--list", str(listing)])
        for path, enc in result["photos"].items():
            cache[key(Path(path))] = enc
        cache["_versions"] = {"face_recognition": result.get("face_recognition"), "dlib": result.get("dlib")}
        PEER_CACHE.write_text(json.dumps(cache))
    out = {str(p): cache[key(p)] for p in paths}
    out["_versions"] = cache.get("_versions", {})
    return out


def _score_probes(encodings: dict, people_refs: tuple[np.ndarray, list[str]], probe_sets: list[tuple[str, Path, bool]],
                  tolerance: float) -> list[dict[str, Any]]:
    refs, ref_labels = people_refs
    probes = []
    for truth, path, known in probe_sets:
        enc = encodings[str(path)]["encoding"]
        probe = {"path": str(path), "known": known, "truth": truth if known else UNKNOWN,
                 "faces": encodings[str(path)]["faces"]}
        if enc is None:
            probe.update(faces=0, best="(no face)", score=0.0, predicted="(no face)")
        else:
            dist = np.linalg.norm(refs - np.asarray(enc), axis=1)
            i = int(np.argmin(dist))
            # higher-is-better score so faceberry.device.recognition.evaluate.operating_points applies unchanged
            probe.update(best=ref_labels[i], score=-float(dist[i]),
                         predicted=ref_labels[i] if dist[i] <= tolerance else UNKNOWN)
        probes.append(probe)
    return probes


def summarise_probes(probes: list[dict[str, Any]]) -> dict[str, Any]:
    known = [p for p in probes if p["known"]]
    found_strangers = [p for p in probes if not p["known"] and p["faces"]]
    right = sum(1 for p in known if p["predicted"] == p["truth"])
    fa = sum(1 for p in found_strangers if p["predicted"] != UNKNOWN)
    found_known = [p for p in known if p["faces"]]
    return {
        "known_accuracy": right / len(known) if known else None,
        "stranger_false_accept_rate": fa / len(found_strangers) if found_strangers else None,
        "no_face_rate": sum(1 for p in probes if not p["faces"]) / len(probes),
        "closed_set_accuracy": (sum(1 for p in found_known if p["best"] == p["truth"]) / len(found_known)
                                if found_known else None),
        "counts": {"known_probes": len(known), "right": right, "strangers_with_face": len(found_strangers),
                   "false_accepts": fa},
    }


def far_curve(probes: list[dict[str, Any]], points: int = 60) -> list[list[float]]:
    """(stranger FAR, known accuracy) as the threshold sweeps over every stranger score: the ROC-like
    curve the docs plot. Same definitions as device eval."""
    known = [p for p in probes if p["known"]]
    strangers = [p for p in probes if not p["known"] and p["faces"]]
    if not known or not strangers:
        return []
    s_scores = np.array([p["score"] for p in strangers if p["best"] != UNKNOWN])
    right_scores = np.array([p["score"] for p in known if p["faces"] and p["best"] == p["truth"]])
    if not len(s_scores):
        return [[0.0, float(len(right_scores)) / len(known)]]
    # Stranger-score quantiles, plus just above the best stranger: the most a zero-FAR threshold allows.
    top = np.nextafter(s_scores.max(), np.inf)
    thresholds = np.unique(np.concatenate([np.quantile(s_scores, np.linspace(0, 1, points)), [top]]))
    curve = []
    for t in thresholds:
        curve.append([float(np.sum(s_scores >= t)) / len(strangers), float(np.sum(right_scores >= t)) / len(known)])
    return sorted(curve)


def calibrate_distance(neg_distances: np.ndarray, target_far: float) -> float:
    """The largest distance tolerance that accepts at most target_far of the negatives."""
    d = np.sort(neg_distances)
    allowed = int(np.floor(target_far * len(d)))
    return float(np.nextafter(d[allowed], -np.inf)) if allowed < len(d) else float("inf")


def peer_scores(split: Split, target_far: float) -> dict[str, Any]:
    source = Path(split.source)
    train = [(person, source / rel) for person, files in split.train.items() for rel in files]
    negatives = [source / rel for files in split.negatives.values() for rel in files]
    probe_sets = ([(person, source / rel, True) for person, files in split.test.items() for rel in files]
                  + [(person, source / rel, False) for person, files in split.strangers.items() for rel in files])
    t0 = time.perf_counter()
    enc = peer_encodings([p for _, p in train] + negatives + [p for _, p, _ in probe_sets])
    seconds = time.perf_counter() - t0
    train_ok = [(person, np.asarray(enc[str(p)]["encoding"])) for person, p in train if enc[str(p)]["encoding"]]
    all_refs = (np.stack([e for _, e in train_ok]), [person for person, _ in train_ok])
    people = sorted({person for person, _ in train_ok})
    means = np.stack([np.mean([e for q, e in train_ok if q == person], axis=0) for person in people])
    neg = np.stack([np.asarray(enc[str(p)]["encoding"]) for p in negatives if enc[str(p)]["encoding"]])
    neg_dist = np.min(np.linalg.norm(means[None] - neg[:, None], axis=2), axis=1)
    calibrated = calibrate_distance(neg_dist, target_far)
    methods = {
        "nearest@0.6 (face_recognition default)": (all_refs, 0.6),
        "mean@0.45": ((means, people), 0.45),
        f"mean@{calibrated:.3f} (calibrated on negatives for {pct(target_far)} FAR)": ((means, people), calibrated),
    }
    out: dict[str, Any] = {"versions": enc.get("_versions", {}), "train_photos_encoded": len(train_ok),
                           "train_photos": len(train), "calibrated_tolerance": calibrated,
                           "encode_seconds_this_run": round(seconds, 1), "methods": {}}
    for name, (refs, tol) in methods.items():
        probes = _score_probes(enc, refs, probe_sets, tol)
        summary = summarise_probes(probes)
        points = operating_points(probes)
        for point in points:
            point["distance"] = -point.pop("threshold")
        out["methods"][name] = {"tolerance": tol, **summary, "operating_points": points,
                                "far_curve": far_curve(probes) if tol == 0.6 or name.startswith("mean@0.45") else []}
    return out


# ---- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=RESULTS / "accuracy",
                        help="folder for the split, the training run and the bundles (default %(default)s)")
    parser.add_argument("--name", default="", help="suffix for the result file: accuracy-NAME.json")
    parser.add_argument("--bundle-from", type=Path, metavar="RUN_OR_BUNDLE",
                        help="skip training: evaluate this bundle, or convert this training run and evaluate it")
    parser.add_argument("--backbone", type=Path, metavar="DIR",
                        help="train few-shot on this face-aware backbone (python -m train --backbone DIR)")
    parser.add_argument("--weights", default=str(SHARED_WEIGHTS),
                        help="--weights for python -m train (default: the shared ImageNet MobileNetV2 file)")
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m train, repeatable (e.g. --train-arg=--epochs=5)")
    parser.add_argument("--quantization", default="int8", choices=("int8", "float16", "float32"),
                        help="bundle to build and evaluate (default int8)")
    parser.add_argument("--max-drop", type=float, default=None,
                        help="convert's --max-drop (default: convert's own; a refused bundle is then rebuilt with the "
                        "guard off, measured, and the refusal reported)")
    parser.add_argument("--target-far", type=float, default=0.02,
                        help="false-accept rate both systems' thresholds are calibrated for on the training "
                        "negatives (default 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    parser.add_argument("--retrain", action="store_true", help="train again even if --work holds a matching run")
    parser.add_argument("--no-peer", action="store_true", help="skip face_recognition")
    parser.add_argument("--peer-only", action="store_true", help="only score face_recognition on the split")
    args = parser.parse_args(argv)

    if not LFW_DEV.is_dir():
        print(f"error: {LFW_DEV} is absent ; put the shared data beside the repo as ../shared", file=sys.stderr)
        return 2
    info = machine()
    split = make_split(LFW_DEV, seed=args.seed)
    args.split_fingerprint = split.fingerprint()
    work = args.work.resolve()
    dirs = materialise(split, work / "split")
    result: dict[str, Any] = {"machine": info, "protocol": {**split.summary(), "fingerprint": split.fingerprint(),
                                                             "seed": args.seed, "target_far": args.target_far,
                                                             "split_json": str(work / "split" / "split.json")}}
    ours = None
    if not args.peer_only:
        ours = {"quantization": args.quantization}
        source = args.bundle_from.resolve() if args.bundle_from else None
        if source is not None and (source / "manifest.json").is_file():
            bundle_dir = source
            ours["bundle_from"] = str(source)
        else:
            if source is not None:
                if not (source / "model.keras").is_file():
                    print(f"error: {source} is neither a bundle (manifest.json) nor a training run (model.keras) ; "
                          "pass a directory written by python -m convert or python -m train", file=sys.stderr)
                    return 2
                run_dir = source
                ours["run_from"] = str(source)
            else:
                run_dir = work / ("run-backbone" if args.backbone else "run")
                meta = train_run(dirs, run_dir, args)
                ours.update(train_seconds=meta["train_seconds"], train_command=meta["command"])
            bundle_dir = work / f"bundle-{run_dir.name}-{args.quantization}"
            ours.update(convert_run(run_dir, bundle_dir, args.quantization, args.max_drop))
            report = run_dir / "report.json"
            if report.is_file():
                ours["train_report_threshold"] = json.loads(report.read_text()).get("threshold")
        ev = device_eval(bundle_dir, dirs["eval"], work / f"eval-{bundle_dir.name}.json")
        missing = sorted(set(split.train) - set(ev["per_person"]))
        if missing:
            print(f"warning: the bundle does not know {len(missing)} of the protocol's people "
                  f"({', '.join(missing[:3])} …): their probes count as strangers", file=sys.stderr)
        ours.update({
            "bundle": str(bundle_dir), "bundle_id": ev["bundle_id"], "classifier": ev["classifier"],
            "bundle_size": bundle_size(bundle_dir),
            **{k: ev[k] for k in ("known_accuracy", "stranger_false_accept_rate", "no_face_rate",
                                  "closed_set_accuracy", "counts", "operating_points", "latency_ms")},
            "per_person_accuracy": {p: r["accuracy"] for p, r in ev["per_person"].items()},
            "eval_json": str(work / f"eval-{bundle_dir.name}.json"),
            "far_curve": far_curve(ev["probes"]),
        })
        result["faceberry"] = ours
    peer = None
    if not args.no_peer:
        if peer_python() is None:
            print("note: face_recognition is not installed (bash bench/setup_peer.sh); skipping the peer",
                  file=sys.stderr)
        else:
            peer = peer_scores(split, args.target_far)
            result["face_recognition"] = peer
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]

    s = split.summary()
    print(f"\nfew-shot accuracy — {describe(info)}")
    print(f"lfw-dev: {s['known_people']} known people × 10 training photos, {s['test_photos']} known probes; "
          f"{s['stranger_people']} held-out strangers ({s['stranger_photos']} photos); {s['negative_people']} "
          f"other people ({s['negative_photos']} photos) as training negatives; split {split.fingerprint()}")
    rows = []
    if ours:
        c = ours["classifier"]
        refused = " (refused by convert's guard)" if ours.get("refused_at_default_margin") else ""
        rows.append([f"faceberry {c['kind']} {c['quantization']} {c['input_size']}px @ {c['accept_threshold']:.3f}"
                     + refused,
                     pct(ours["known_accuracy"]), pct(ours["stranger_false_accept_rate"]), pct(ours["no_face_rate"]),
                     pct(ours["closed_set_accuracy"]),
                     f"{ours['train_seconds']:.0f} s" if "train_seconds" in ours else "—"])
    if peer:
        for name, m in peer["methods"].items():
            rows.append([f"face_recognition {name}", pct(m["known_accuracy"]), pct(m["stranger_false_accept_rate"]),
                         pct(m["no_face_rate"]), pct(m["closed_set_accuracy"]), "—"])
    print(table(["system", "known accuracy", "stranger FAR", "no face", "closed-set", "training time"], rows))
    oracle_rows = []
    for target in TARGET_FARS:
        row = [pct(target)]
        for points in ([ours["operating_points"]] if ours else []) + (
                [peer["methods"][next(iter(peer["methods"]))]["operating_points"],
                 peer["methods"][list(peer["methods"])[1]]["operating_points"]] if peer else []):
            point = next((p for p in points if p["target_far"] == target), None)
            row.append(f"{pct(point['known_accuracy'])} ({pct(point['stranger_false_accept_rate'])})" if point else "—")
        oracle_rows.append(row)
    headers = ["threshold set for FAR ≤"] + (["faceberry known (FAR)"] if ours else []) + (
        ["face_recognition nearest", "face_recognition mean"] if peer else [])
    print("\nknown accuracy with each system's threshold set on the test strangers:")
    print(table(headers, oracle_rows))
    name = f"accuracy-{args.name}" if args.name else "accuracy"
    path = write_result(name, result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
