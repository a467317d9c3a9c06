"""`python -m device eval`: how good is a bundle on a labelled folder of photos, and how fast?

The photos go through the device's own detect → align → classify path
(faceberry.device.recognition.pipeline.FacePipeline),
so the figures are the ones the Pi will live with, not those of a training-time shortcut.

Folder layout: `<photos>/<person>/<photo>` (any faceberry.contract.IMAGE_SUFFIXES). A folder whose name is one of the
bundle's people holds probes of that person; any other folder holds strangers (one person per folder), who should
come out as `unknown`. In a photo with several faces the subject (faceberry.contract.subject_face) is the probe; of
two or more faces of similar size, the one that agrees with the folder's other photos
(faceberry.contract.choose_subject,
the rule training and enroll use; embedding bundles only) — the folder's photos, never the gallery, pick it. A photo
that stays ambiguous is skipped and listed.

Definitions (both deliberately conservative):
- known_accuracy: known probes recognised as the right person and accepted, over ALL known probes
  (a photo whose face is not found counts as a miss).
- stranger_false_accept_rate: stranger probes accepted as anyone, over stranger probes whose face
  was found (a stranger the detector missed would flatter the rate, so it is left out).
- no_face_rate: probes with no face found, over all probes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.bundle import load_bundle
from faceberry.contract import (
    IMAGE_SUFFIXES,
    SEVERAL_FACES,
    UNKNOWN,
    accept_scores,
    choose_subject,
    list_images,
    subject_candidates,
    threshold_for_far,
)
from faceberry.device import cli
from faceberry.device.recognition.pipeline import FacePipeline
from faceberry.errors import UsageError
from faceberry.preprocess import ImageError, load_image

log = logging.getLogger(__name__)

HELP = "measure a bundle's accuracy and per-stage speed on a labelled folder of photos"
STAGES = ("decode", "detect", "align", "classify", "total")
NO_FACE = "(no face)"
TARGET_FARS = (0.01, 0.02, 0.05)
EVAL_SCHEMA = 1


class EvalError(UsageError, ValueError):
    """Photos or an output path eval cannot use; the message names the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the device's detect → align → classify path over PHOTOS/<person>/ photos and report "
        "per-person accuracy, the stranger false-accept rate, faces not found and per-stage latency "
        "(median, p95). Folders not named after one of the bundle's people are strangers."
    )
    parser.add_argument("--bundle", required=True, type=Path, metavar="DIR",
                        help="model bundle directory written by `python -m convert`")
    parser.add_argument("--photos", required=True, type=Path, metavar="DIR",
                        help="labelled photos: one sub-folder per person; other folder names count as strangers")
    parser.add_argument("--json", type=Path, metavar="FILE", default=None,
                        help="also write the full results (totals, per person, per probe, latency) as JSON here")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="interpreter threads for each model (default 1)")
    parser.add_argument("--min-face-size", type=int, default=40, metavar="PX",
                        help="ignore faces narrower than this many pixels, as the daemon does (default 40)")
    parser.add_argument("--quiet", action="store_true", help="print only the totals, not the per-person table")


def _photo_folders(photos: Path) -> dict[str, list[Path]]:
    folders: dict[str, list[Path]] = {}
    for sub in sorted(p for p in photos.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(sub)
        if files:
            folders[sub.name] = files
    return folders


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"median": None, "p95": None, "mean": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "median": round(float(np.median(arr)), 3),
        "p95": round(float(np.percentile(arr, 95)), 3),
        "mean": round(float(arr.mean()), 3),
        "n": len(values),
    }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def operating_points(probes: list[dict[str, Any]], target_fars: tuple[float, ...] = TARGET_FARS) -> list[dict]:
    """Known accuracy at the thresholds that let through at most each target share of strangers.

    Recomputed from each probe's best candidate and score, so it answers "what if the bundle's
    threshold were set for this false-accept rate" without running the models again.
    """
    found = [p for p in probes if p["faces"] > 0]
    strangers = [p for p in found if not p["known"]]
    stranger_scores = accept_scores([p["best"] for p in strangers], np.array([p["score"] for p in strangers]))
    n_strangers = len(strangers)
    known = [p for p in probes if p["known"]]
    if not n_strangers or not known:
        return []
    points = []
    for target in target_fars:
        threshold = threshold_for_far(stranger_scores, target)
        fa = int(np.sum(stranger_scores >= threshold))
        right = sum(1 for p in known if p["faces"] and p["best"] == p["truth"] and p["score"] >= threshold)
        points.append({
            "target_far": target,
            "threshold": round(threshold, 6),
            "stranger_false_accept_rate": fa / n_strangers,
            "known_accuracy": right / len(known),
        })
    return points


def evaluate(
    bundle_dir: Path, photos: Path, threads: int | None = 1, min_face_size: int = 40
) -> dict[str, Any]:
    """Evaluate; returns the JSON-ready result. Raises BundleError/ModelError/EvalError on bad input."""
    bundle = load_bundle(bundle_dir)
    if not photos.is_dir():
        raise EvalError(f"photo folder not found: {photos}; pass --photos DIR with one sub-folder per person")
    folders = _photo_folders(photos)
    if not folders:
        raise EvalError(f"{photos} has no <person>/ photos ({', '.join(IMAGE_SUFFIXES)}); put each person's photos in "
                         "a sub-folder")
    people = {label for label in bundle.labels if label != UNKNOWN}
    known_folders = [name for name in folders if name in people]
    stranger_folders = [name for name in folders if name not in people]
    if not known_folders:
        log.warning("no folder in %s is named after a person in the bundle (%s …): every photo counts as a stranger",
                    photos, ", ".join(sorted(people)[:3]))

    pipeline = FacePipeline(bundle, num_threads=threads, min_face_size=min_face_size)
    # The first invoke pays for delegate set-up and memory planning; keep it out of the timings.
    pipeline.process(np.zeros((240, 320, 3), dtype=np.uint8))
    pipeline.classifier.classify(np.zeros((pipeline.size, pipeline.size, 3), dtype=np.uint8))

    probes: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    ambiguous: list[dict[str, str]] = []
    # Photos of several faces of similar size, until every photo of their folder has been seen, and the
    # embeddings of each folder's unambiguous subjects that choose among their faces.
    pending: list[tuple[dict[str, Any], Path, list[Any], tuple[int, int]]] = []
    references: dict[str, list[np.ndarray]] = defaultdict(list)
    timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for folder, files in folders.items():
        known = folder in people
        for path in files:
            t0 = time.perf_counter()
            try:
                frame = load_image(path)
            except ImageError as exc:
                log.warning("skipped unreadable image: %s", exc)
                unreadable.append({"path": str(path), "reason": str(exc)})
                continue
            decode_ms = (time.perf_counter() - t0) * 1e3
            result = pipeline.process(frame)
            timings["decode"].append(decode_ms)
            timings["detect"].append(result.timings_ms["detect"])
            if result.recognitions:
                timings["align"].append(result.timings_ms["align"])
                timings["classify"].append(result.timings_ms["classify"])
            timings["total"].append(decode_ms + sum(result.timings_ms.values()))
            probe: dict[str, Any] = {
                "path": str(path.relative_to(photos)),
                "folder": folder,
                "known": known,
                "truth": folder if known else UNKNOWN,
                "faces": len(result.recognitions),
            }
            # The photo's subject, by the rule training and enroll use: of several faces of similar size, the
            # one that agrees with the folder's other photos (below); one that stays ambiguous is skipped and
            # listed, not scored on one of them.
            candidates, why = subject_candidates([r.face for r in result.recognitions], 0)
            if why == SEVERAL_FACES:
                h, w = frame.shape[:2]
                pending.append((probe, path, [next(r for r in result.recognitions if r.face is f)
                                              for f in candidates], (w, h)))
                continue
            if candidates:
                subject = next(r for r in result.recognitions if r.face is candidates[0])
                _fill(probe, subject)
                if subject.vector is not None:
                    references[folder].append(subject.vector)
            else:
                probe.update(predicted=NO_FACE, best=NO_FACE, score=0.0, face_width=0.0)
            probe["outcome"] = _outcome(probe)
            probes.append(probe)
    for probe, path, recs, (w, h) in pending:
        index, how = None, f"{SEVERAL_FACES} (the bundle is not an embedding bundle: no face is singled out)"
        if bundle.head.embeds:  # a face is told apart by the person's other photos
            centre = np.array([w / 2.0, h / 2.0])
            offsets = [float(np.linalg.norm((r.face.box[:2] + r.face.box[2:]) / 2.0 - centre) / np.hypot(w, h))
                       for r in recs]
            own = np.array(references[probe["folder"]]).reshape(-1, len(recs[0].vector))
            index, how = choose_subject(np.stack([r.vector for r in recs]), own, [r.face.width for r in recs],
                                        offsets)
        if index is None:
            ambiguous.append({"path": str(path), "reason": how})
            continue
        _fill(probe, recs[index])
        probe["outcome"] = _outcome(probe)
        probe["subject"] = how
        probes.append(probe)
    if not probes:
        raise EvalError(f"no readable photo in {photos}; check the files (see the warnings above)")
    result = _summarise(bundle, photos, probes, unreadable, timings, known_folders, stranger_folders,
                        threads, min_face_size)
    result["counts"]["several_faces"] = len(ambiguous)
    result["counts"]["several_faces_chosen"] = sum(1 for p in probes if "subject" in p)
    result["several_faces"] = ambiguous
    return result


def _fill(probe: dict[str, Any], subject: Any) -> None:
    pred = subject.prediction
    probe.update(predicted=pred.label, best=pred.best, score=round(float(pred.score), 6),
                 face_width=round(subject.face.width, 1))


def _outcome(probe: dict[str, Any]) -> str:
    """right | wrong | rejected | no_face for known people; rejected | false_accept | no_face for strangers."""
    if probe["faces"] == 0:
        return "no_face"
    if probe["predicted"] == UNKNOWN:
        return "rejected"
    if not probe["known"]:
        return "false_accept"
    return "right" if probe["predicted"] == probe["truth"] else "wrong"


def _summarise(bundle, photos, probes, unreadable, timings, known_folders, stranger_folders,
               threads, min_face_size) -> dict[str, Any]:
    per_person: dict[str, dict[str, Any]] = {}
    strangers: dict[str, dict[str, Any]] = {}
    confusion: dict[str, Counter] = defaultdict(Counter)
    for p in probes:
        confusion[p["folder"]][p["predicted"]] += 1
    for folder in known_folders:
        rows = [p for p in probes if p["folder"] == folder]
        c = Counter(p["outcome"] for p in rows)
        found = len(rows) - c["no_face"]
        closed = sum(1 for p in rows if p["best"] == folder)
        per_person[folder] = {
            "probes": len(rows), "right": c["right"], "wrong": c["wrong"], "rejected": c["rejected"],
            "no_face": c["no_face"], "accuracy": _ratio(c["right"], len(rows)),
            "closed_set_accuracy": _ratio(closed, found),
        }
    for folder in stranger_folders:
        rows = [p for p in probes if p["folder"] == folder]
        c = Counter(p["outcome"] for p in rows)
        found = len(rows) - c["no_face"]
        strangers[folder] = {
            "probes": len(rows), "false_accepts": c["false_accept"], "rejected": c["rejected"],
            "no_face": c["no_face"], "false_accept_rate": _ratio(c["false_accept"], found),
            # Whom a lookalike is taken for: one "this is not X" correction is aimed at that person.
            "taken_for": dict(Counter(p["predicted"] for p in rows if p["outcome"] == "false_accept").most_common()),
        }
    known = [p for p in probes if p["known"]]
    unknown = [p for p in probes if not p["known"]]
    kc = Counter(p["outcome"] for p in known)
    sc = Counter(p["outcome"] for p in unknown)
    known_found = len(known) - kc["no_face"]
    strangers_found = len(unknown) - sc["no_face"]
    no_face = kc["no_face"] + sc["no_face"]
    return {
        "schema": EVAL_SCHEMA,
        "bundle": str(bundle.root),
        "bundle_id": bundle.bundle_id,
        "classifier": {"kind": bundle.kind, "quantization": bundle.manifest["classifier"].get("quantization"),
                       "input_size": bundle.preprocessing.input_size, "accept_threshold": bundle.accept_threshold},
        "photos": str(photos),
        "threads": threads,
        "min_face_size": min_face_size,
        "known_accuracy": _ratio(kc["right"], len(known)),
        "known_accuracy_face_found": _ratio(kc["right"], known_found),
        "closed_set_accuracy": _ratio(sum(1 for p in known if p["best"] == p["truth"]), known_found),
        "stranger_false_accept_rate": _ratio(sc["false_accept"], strangers_found),
        "no_face_rate": no_face / len(probes),
        "counts": {
            "probes": len(probes), "known_probes": len(known), "stranger_probes": len(unknown),
            "right": kc["right"], "wrong": kc["wrong"], "known_rejected": kc["rejected"],
            "known_no_face": kc["no_face"], "false_accepts": sc["false_accept"],
            "strangers_rejected": sc["rejected"], "stranger_no_face": sc["no_face"],
            "no_face": no_face, "unreadable": len(unreadable),
        },
        "per_person": per_person,
        "strangers": strangers,
        "confusion": {row: dict(cols) for row, cols in confusion.items()},
        "confusions": confusions(probes),
        "operating_points": operating_points(probes),
        "latency_ms": {stage: _stats(values) for stage, values in timings.items()},
        "unreadable": unreadable,
        "probes": probes,
    }


def confusions(probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Enrolled people named as another enrolled person, most frequent first: [{truth, predicted, probes}]."""
    pairs = Counter((p["truth"], p["predicted"]) for p in probes if p.get("outcome") == "wrong")
    return [{"truth": t, "predicted": pred, "probes": n} for (t, pred), n in pairs.most_common()]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ms(stat: dict[str, Any]) -> str:
    return "—" if stat["median"] is None else f"{stat['median']:8.2f} {stat['p95']:8.2f} {stat['n']:6d}"


def format_report(result: dict[str, Any], quiet: bool = False) -> str:
    lines = [f"bundle {result['bundle_id']} ({result['classifier']['kind']}, "
             f"{result['classifier']['quantization']}, {result['classifier']['input_size']}px, "
             f"accept ≥ {result['classifier']['accept_threshold']:.3f})  photos {result['photos']}"]
    if not quiet:
        width = max([len(n) for n in [*result["per_person"], *result["strangers"]]] + [10])
        if result["per_person"]:
            lines.append(f"{'person':<{width}} {'probes':>6} {'right':>6} {'wrong':>6} {'unknown':>7} "
                         f"{'no face':>7} {'accuracy':>8}")
            for name, row in result["per_person"].items():
                lines.append(f"{name:<{width}} {row['probes']:6d} {row['right']:6d} {row['wrong']:6d} "
                             f"{row['rejected']:7d} {row['no_face']:7d} {_pct(row['accuracy']):>8}")
        if result["strangers"]:
            lines.append(f"{'strangers':<{width}} {'probes':>6} {'accepted':>8} {'unknown':>7} {'no face':>7} "
                         f"{'FAR':>7}  taken for")
            for name, row in result["strangers"].items():
                taken = ", ".join(f"{who} {n}" for who, n in row.get("taken_for", {}).items())
                lines.append(f"{name:<{width}} {row['probes']:6d} {row['false_accepts']:8d} {row['rejected']:7d} "
                             f"{row['no_face']:7d} {_pct(row['false_accept_rate']):>7}  {taken}".rstrip())
        for item in result.get("confusions", []):
            lines.append(f"confused: {item['truth']} named {item['predicted']} in {item['probes']} photo(s)")
    c = result["counts"]
    strangers_found = c["stranger_probes"] - c["stranger_no_face"]
    lines.append(
        f"known accuracy {_pct(result['known_accuracy'])} ({c['right']}/{c['known_probes']}; closed-set "
        f"{_pct(result['closed_set_accuracy'])})  stranger false accepts "
        f"{_pct(result['stranger_false_accept_rate'])} ({c['false_accepts']}/{strangers_found})"
        f"  no face {_pct(result['no_face_rate'])} ({c['no_face']}/{c['probes']})"
        + (f"  unreadable {c['unreadable']}" if c["unreadable"] else "")
        + (f"  several faces: chosen by the folder's other photos {c['several_faces_chosen']}"
           if c.get("several_faces_chosen") else "")
        + (f"  skipped (several faces, none singled out) {c['several_faces']}" if c.get("several_faces") else "")
    )
    shown = set()
    for point in result["operating_points"]:
        if point["threshold"] in shown:
            continue
        shown.add(point["threshold"])
        lines.append(f"  at threshold {point['threshold']:.4f}: known {_pct(point['known_accuracy'])}, "
                     f"strangers accepted {_pct(point['stranger_false_accept_rate'])} "
                     f"(target ≤ {_pct(point['target_far'])})")
    lines.append(f"latency (ms, {result['threads']} thread(s))   median      p95      n")
    for stage, stat in result["latency_ms"].items():
        lines.append(f"  {stage:<10} {_ms(stat)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise EvalError("--threads must be at least 1 ; pass --threads 1 or more")
    # A BundleError, ModelError or EvalError (bad input, exit 2) is printed by faceberry.device.cli.
    result = evaluate(args.bundle, args.photos, threads=args.threads, min_face_size=args.min_face_size)
    print(format_report(result, quiet=args.quiet))
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise EvalError(f"cannot write {args.json}: {exc.strerror} ; pass a writable --json path") from exc
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m faceberry.device.recognition.evaluate ARGS`, and eval from Python: `faceberry eval ARGS`
    (faceberry.device.cli)."""
    return cli.main(argv, prog="python -m device eval", at=("eval",))


if __name__ == "__main__":
    sys.exit(main())
