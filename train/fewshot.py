"""`python -m train --photos DIR --out RUN_DIR --backbone BACKBONE_DIR`: few-shot people on a face backbone.

Nothing is trained: each person's crops are embedded by the backbone (faceberry.train.backbone) and their
normalised mean becomes that person's entry in a gallery (validation figures come from a gallery of
the training split; the shipped gallery uses every usable photo). A face is that person when its
cosine similarity to the person's centroid is the highest and at least the accept threshold, which
is calibrated on strangers (faceberry.cohort.calibrate): the backbone's stranger cohort (BACKBONE/cohort.npz,
from `python -m train cohort`), the negative faces (PHOTOS/unknown/ or --negatives DIR) when given, and
every person's faces against the other people's centroids; at most --target-far (default 0.5%) of
strangers' photos are to be accepted, asked of the cohort with a margin for strangers it never saw.
Adding a person later needs no training at all (`python -m device enroll` on the Pi).

One person is enough ("is it me?"): the gallery has one entry and every impostor score comes from the cohort
(and the negatives, if any); without either it is refused with the fix. A photo with several faces of similar
size gives the face that agrees with the person's other photos (faceberry.train.crops.resolve_subjects).

RUN_DIR (kind "embedding"): model.keras (the embedder), gallery.npz, labels.txt, cohort.npz (when the backbone
has one), config.json, crops.npz, report.json, history.json, skipped.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from faceberry import cohort as cohort_mod
from faceberry.contract import ENROLLED_VIEWS, UNKNOWN, best_match, embed_enrolled, enrolled_views, gallery_from
from faceberry.preprocess import Preprocessing, normalize
from faceberry.train import run_files
from faceberry.train.backbone_dir import BackboneError, load_embedder, read_backbone_config
from faceberry.train.crops import split_per_person, summarize_skips
from faceberry.train.trainer import TrainError, check_out_dir, collect_inputs, gather_crops

log = logging.getLogger(__name__)


def embed(model, crops: np.ndarray, prep: Preprocessing, views: str = ENROLLED_VIEWS) -> np.ndarray:
    """Enrolled photos' embeddings, as faceberry.contract.enrolled_views says for the backbone."""
    if len(crops) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    return embed_enrolled(lambda x: model.predict(normalize(x, prep), batch_size=64, verbose=0), crops, views)


def fewshot(args) -> dict[str, Any]:
    started = time.monotonic()
    photos, out = Path(args.photos), Path(args.out)
    try:
        model, _ = load_embedder(args.backbone)
        bconfig = read_backbone_config(args.backbone)
    except BackboneError as exc:
        raise TrainError(str(exc)) from exc
    size = bconfig.input_size
    if args.input_size != size:
        log.warning("using the backbone's input size %d (not --input-size %d)", size, args.input_size)
    prep = bconfig.preprocessing.preprocessing()
    people_files, neg_groups, warnings = collect_inputs(photos, Path(args.negatives) if args.negatives else None,
                                                        allow_one=True)
    views = enrolled_views(bconfig.arch)
    cohort = load_cohort(args, int(model.output_shape[-1]), views)
    if len(people_files) == 1 and cohort is None and not neg_groups:
        # One person has no one to be told apart from: every impostor score must come from strangers.
        raise TrainError(
            f"only one person ({next(iter(people_files))}) in {photos} and no stranger cohort beside the backbone: "
            "recognising one person needs other people's faces to calibrate `unknown`; build the cohort with "
            f"`python -m train cohort --backbone {args.backbone} --photos FACES_DIR` (or --lfw), or pass --cohort "
            "FILE or --negatives DIR"
        )
    check_out_dir(out, args.force)
    for w in warnings:
        log.warning("%s", w)

    gathered = gather_crops(args, photos, out, size, people_files, neg_groups, alignment=prep.alignment,
                            embed=lambda crops: embed(model, crops, prep, views))
    pset, nset, counts, skipped = gathered.people, gathered.negatives, gathered.counts, gathered.skipped
    people = sorted(people_files)
    tr_idx, va_idx = split_per_person(pset.labels, args.val_fraction, args.seed)
    labels_arr = np.array(pset.labels)
    emb = embed(model, pset.crops, prep, views)
    gallery = gallery_from(emb[tr_idx], list(labels_arr[tr_idx]), people)
    neg_emb = embed(model, nset.crops, prep, views) if nset is not None and len(nset) else np.zeros((0, emb.shape[1]))
    target_far = cohort_mod.DEFAULT_TARGET_FAR if args.target_far is None else float(args.target_far)

    # The threshold rests on every impostor score there is (faceberry.cohort.calibrate): the stranger
    # cohort, the negative faces when given, and each person's faces against the other people's entries.
    def calibrate(gallery: np.ndarray, own_idx: np.ndarray) -> dict[str, Any]:
        return cohort_mod.calibrate(gallery, people, cohort, emb[own_idx], list(labels_arr[own_idx]), neg_emb,
                                    target_far)

    accept = calibrate(gallery, tr_idx)["accept"]

    val_truth = list(labels_arr[va_idx])
    val_best, val_scores = best_match(emb[va_idx], gallery, people)
    right = np.array([b == t for b, t in zip(val_best, val_truth, strict=True)], dtype=bool)
    accepted = val_scores >= accept
    per_person = {}
    for p in people:
        m = np.array([t == p for t in val_truth], dtype=bool)
        per_person[p] = {
            "val_faces": int(m.sum()),
            "accuracy": float(right[m].mean()) if m.any() else None,
            "accepted_right": float((right & accepted)[m].mean()) if m.any() else None,
            "usable_photos": counts[p],
            "gallery_photos": counts[p],
        }
    # The validation figures above use a gallery of the training crops only. The gallery that ships
    # uses every usable photo (more photos, steadier centroids), so its threshold is fitted again,
    # the same way, against that gallery.
    val_threshold = float(accept)
    gallery = gallery_from(emb, pset.labels, people)
    threshold = calibrate(gallery, np.arange(len(emb)))
    accept = threshold["accept"]
    neg_false_accepts = int(np.sum(best_match(neg_emb, gallery, people)[1] >= accept)) if len(neg_emb) else None
    report: dict[str, Any] = {
        "kind": "embedding",
        "labels": people,
        "val_accuracy": float(right.mean()) if len(right) else None,
        "val_accepted_right": float((right & accepted).mean()) if len(right) else None,
        "chance": 1.0 / len(people),
        "per_person": per_person,
        "threshold": {
            **threshold,
            "known_accept_rate": float((right & accepted).mean()) if len(right) else None,
            "misidentification_rate": float((~right & accepted).mean()) if len(right) else None,
            "validation_gallery_accept": val_threshold,
            "note": "known_accept_rate and misidentification_rate: validation faces against a gallery of the "
                    "training faces at validation_gallery_accept; accept and far: the shipped gallery (all faces)",
        },
        "stranger_faces": len(neg_emb),
        "stranger_false_accepts": neg_false_accepts,
        "backbone": {"dir": str(args.backbone), "arch": bconfig.arch, "teacher": (bconfig.teacher or {}).get("id")},
        "skipped": {"count": len(skipped), "by_reason": summarize_skips(skipped), "file": "skipped.json"},
        # Photos of several faces of similar size: the face that agrees with the person's other photos used
        # (chosen), or skipped with the reason (refused; in skipped.json).
        "several_faces": gathered.subjects,
        "warnings": warnings,
        "train_seconds": round(time.monotonic() - started, 1),
    }

    split = np.array(["train"] * len(pset), dtype=object)
    split[va_idx] = "val"
    all_crops = [pset.crops]
    crop_labels = list(pset.labels)
    paths = list(pset.paths)
    if nset is not None and len(nset):
        all_crops.append(nset.crops)
        crop_labels += [UNKNOWN] * len(nset)
        split = np.concatenate([split, np.array(["negative"] * len(nset), dtype=object)])
        paths += nset.paths
    np.savez_compressed(out / "crops.npz", crops=np.concatenate(all_crops), labels=np.array(crop_labels, dtype=str),
                        split=split.astype(str), paths=np.array(paths, dtype=str))
    if cohort is not None:
        cohort.save(out / cohort_mod.COHORT_FILE)
    np.savez(out / "gallery.npz", embeddings=gallery.astype(np.float32), labels=np.array(people, dtype=str))
    shutil.copyfile(Path(args.backbone) / bconfig.file, out / "model.keras")
    (out / "labels.txt").write_text("\n".join(people) + "\n", encoding="utf-8")
    config = {
        "kind": "embedding",
        "preprocessing": prep.to_dict(),
        "labels": people,
        "embedding_dim": int(gallery.shape[1]),
        "gallery": {"file": "gallery.npz", "method": "faceberry.contract.centroid of all usable photos",
                    "views": views},
        "cohort": {"file": cohort_mod.COHORT_FILE, "faces": len(cohort), "people": cohort.people} if cohort else None,
        "backbone": {"dir": str(Path(args.backbone).resolve()), "arch": bconfig.arch,
                     # the teacher's id and licence, not its 128 mean values
                     "teacher": {k: v for k, v in (bconfig.teacher or {}).items() if k != "mean"} or None,
                     "source": bconfig.source, "alpha": bconfig.alpha, "weights_init": bconfig.weights_init},
        "detector": {"path": str(gathered.detector_path), "min_face_size": args.min_face_size},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
    }
    run_files.write_checked(out / run_files.CONFIG_FILE, config, run_files.RunConfig)
    run_files.write_checked(out / run_files.REPORT_FILE, report, run_files.RunReport)
    (out / "history.json").write_text(json.dumps({"note": "few-shot gallery: no training epochs"}) + "\n",
                                      encoding="utf-8")
    return report


def load_cohort(args, dim: int, views: str) -> cohort_mod.Cohort | None:
    """--cohort, else BACKBONE/cohort.npz when there is one; None (and a warning in the report) otherwise."""
    path = Path(args.cohort) if getattr(args, "cohort", None) else Path(args.backbone) / cohort_mod.COHORT_FILE
    if not path.is_file():
        if getattr(args, "cohort", None):
            raise TrainError(f"--cohort {path}: no such file; build it with `python -m train cohort`")
        return None
    try:
        return cohort_mod.load(path, dim, views=views)
    except cohort_mod.CohortError as exc:
        raise TrainError(str(exc)) from exc


def train_fewshot(args) -> int:
    """Entry point from faceberry.train.cli when --backbone is given; a TrainError (exit 2) is printed by
    faceberry.device.cli."""
    report = fewshot(args)
    th = report["threshold"]
    n = len(report["labels"])
    lines = [
        f"gallery of {n} {'person' if n == 1 else 'people'} → {args.out} "
        f"({report['train_seconds']:.0f} s, no training)",
        f"validation: right person {100 * (report['val_accuracy'] or 0):.1f}% (chance {100 * report['chance']:.1f}%)",
        f"accept threshold (cosine) {th['accept']:.3f}, for at most {100 * th['target_far']:.2f}% of strangers' photos "
        f"named as one of your people: calibrated at {100 * th['calibrated_far']:.2f}% on {th['impostor_scores']} "
        f"impostor scores ({th['basis']}; {th['cohort_people']} cohort people)",
        f"  {100 * (th['known_accept_rate'] or 0):.1f}% of validation faces accepted as the right person",
    ]
    if th.get("accept_interval"):
        lo, hi = th["accept_interval"]
        lines.append(f"  threshold uncertainty: {lo:.3f}–{hi:.3f} (90% of resamples of the cohort's people; a cohort "
                     "of more people narrows it)")
    for person, row in report["per_person"].items():
        acc = row["accuracy"]
        lines.append(f"  {person:<28} {'   n/a' if acc is None else f'{100 * acc:5.1f}%'}  "
                     f"({row['val_faces']} validation faces; gallery of all {row['gallery_photos']})")
    several = report["several_faces"]
    if several["chosen"] or several["refused"]:
        lines.append(f"photos with several faces of similar size: the person's face chosen by their other photos in "
                     f"{several['chosen']}, {several['refused']} still ambiguous and skipped")
    if report["skipped"]["count"]:
        reasons = ", ".join(f"{n} {r}" for r, n in report["skipped"]["by_reason"].items())
        lines.append(f"skipped {report['skipped']['count']} photo(s): {reasons} "
                     f"(see {Path(args.out) / 'skipped.json'})")
    lines.append(f"next: python -m convert --run {args.out} --out BUNDLE_DIR")
    print("\n".join(lines))
    for warning in th["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
