"""`python -m train backbone --arch mobilenetv2`: make MobileNetV2 face-aware by distilling dlib's face embedder.

ImageNet features do not tell faces apart. This stage trains a MobileNetV2 student (ImageNet
init, the device's own aligned crops) to reproduce the normalised 128-d embedding of a teacher that
runs only on the workstation (faceberry.train.teacher: dlib's ResNet). No identity labels are needed: every
face, and K augmented views of it, is labelled by the teacher itself, and the student learns with a
cosine loss. The views are generated deterministically (seeded per face) so their teacher labels are
computed once and cached on disk.

BACKBONE_DIR gets:
    embedder.keras   the student: normalised float32 crop (faceberry.preprocess.normalize) → 128-d embedding,
                     centred on its training faces (compare by cosine)
    config.json      preprocessing, input size, alpha, teacher id and licence, data and training settings
    history.json     per epoch: loss (1 − cosine), cosine, held-out cosine, seconds (cosines are
                     against the teacher's embedding with its dataset mean removed, see below)
    report.json      student–teacher cosine on held-out faces (people never trained on, when the photos
                     are in per-person folders) and nearest-neighbour identification with either model
    people.json      which people/faces trained the student and which were held out
Then: python -m train --photos DIR --out RUN_DIR --backbone BACKBONE_DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from faceberry.contract import IMAGE_SUFFIXES
from faceberry.preprocess import ALIGN_TEMPLATE_NAME, DLIB_TEMPLATE_NAME, Preprocessing, normalize
from faceberry.train import run_files
from faceberry.train.backbone_dir import EMBEDDER_FILE, BackboneError, cosine_rows, prepare_out
from faceberry.train.crops import CropMaker, build_crop_set, default_cache_dir, list_photos
from faceberry.train.student import center_output, fit_student
from faceberry.train.teacher import TEACHER_DIM, TEACHER_ID, TEACHER_LICENCE, TeacherCache, label_crops

FLAT = ""  # group name of photos lying directly in --photos (no person folder)


# ---------------------------------------------------------------- views


def augment_view(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One augmented view of an aligned uint8 crop: what a door camera does to a face.

    Small rotations/shifts/zooms (alignment jitter), mirror, lighting, low resolution and blur,
    colour loss. Geometry is kept mild because the device aligns every face before the network.
    """
    s = crop.shape[0]
    out = crop
    if rng.random() < 0.5:
        out = out[:, ::-1]
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.06, 0.06, size=2) * s
    m = cv2.getRotationMatrix2D((s / 2, s / 2), angle, scale)
    m[:, 2] += shift
    out = cv2.warpAffine(np.ascontiguousarray(out), m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if rng.random() < 0.3:  # a small, far face upscaled by the aligner
        f = rng.uniform(0.3, 0.7)
        small = cv2.resize(out, (max(8, int(s * f)), max(8, int(s * f))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (s, s), interpolation=cv2.INTER_LINEAR)
    elif rng.random() < 0.2:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    x = out.astype(np.float32)
    if rng.random() < 0.1:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    contrast = rng.uniform(0.6, 1.4)
    brightness = rng.uniform(-40, 40)
    mean = x.mean()
    x = (x - mean) * contrast + mean + brightness
    if rng.random() < 0.3:  # low light: gamma and sensor noise
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(1.0, 2.0)
        x = x + rng.normal(0, rng.uniform(2, 8), size=x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def make_views(crops: np.ndarray, views: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(views (N×V, S, S, 3), face index per view). View 0 of each face is the clean crop.

    Each view's randomness is seeded by (seed, view number, the crop's own pixels), so the same face
    gives the same views in every run and the teacher cache hits.
    """
    out, owner = [], []
    for i, crop in enumerate(crops):
        face_seed = int(hashlib.sha1(np.ascontiguousarray(crop).tobytes()).hexdigest()[:12], 16)
        out.append(crop)
        owner.append(i)
        for k in range(1, views):
            rng = np.random.default_rng([seed, k, face_seed])
            out.append(augment_view(crop, rng))
            owner.append(i)
    size = crops.shape[1] if len(crops) else 0
    return (np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)), np.array(owner, dtype=int)


# ---------------------------------------------------------------- data


def collect_groups(photos: Path, exclude: set[str]) -> dict[str, list[Path]]:
    """{person folder or FLAT: photos}: loose photos plus one group per sub-folder."""
    if not photos.is_dir():
        raise BackboneError(f"photos folder not found: {photos}; pass --photos DIR with face photos")
    groups: dict[str, list[Path]] = {}
    loose = list_photos(photos)
    if loose:
        groups[FLAT] = loose
    for sub in sorted(p for p in photos.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name in exclude:
            continue
        files = list_photos(sub)
        if files:
            groups[sub.name] = files
    if not groups:
        raise BackboneError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) in {photos} or its sub-folders; add face photos")
    return groups


def split_heldout(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train idx, held-out idx, how). Whole people are held out when there are at least 4 named ones."""
    rng = np.random.default_rng(seed)
    labels_arr = np.array(labels)
    people = sorted({lbl for lbl in labels if lbl != FLAT})
    if len(people) >= 4 and fraction > 0:
        n = max(1, round(len(people) * fraction))
        held = set(rng.permutation(people)[:n].tolist())
        is_val = np.array([lbl in held for lbl in labels_arr], dtype=bool)
        how = f"{n} of {len(people)} people held out"
    else:
        is_val = np.zeros(len(labels), dtype=bool)
        n = round(len(labels) * fraction) if fraction > 0 else 0
        is_val[rng.permutation(len(labels))[:n]] = True
        how = f"{n} of {len(labels)} faces held out"
    return np.flatnonzero(~is_val), np.flatnonzero(is_val), how


def nn_identification(emb: np.ndarray, labels: list[str]) -> float | None:
    """Leave-one-out nearest-neighbour accuracy among faces (only faces whose person has ≥2)."""
    lab = np.array(labels)
    counts = {lbl: int((lab == lbl).sum()) for lbl in set(labels)}
    usable = np.array([lbl != FLAT and counts[lbl] >= 2 for lbl in lab])
    if usable.sum() < 2 or len({lbl for lbl in lab[usable]}) < 2:
        return None
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argmax(sims, axis=1)
    return float(np.mean(lab[nearest][usable] == lab[usable]))


class _Logger:
    def __init__(self, path: Path | None, quiet: bool) -> None:
        self.path, self.quiet = path, quiet

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")


# ---------------------------------------------------------------- main


def _faces(args: argparse.Namespace, out: Path, say: _Logger) -> tuple[Any, np.ndarray, list[str], set[str], CropMaker]:
    """The usable aligned faces of --photos (skipped ones listed in out/skipped.json), at most --max-faces."""
    exclude = set(args.exclude)
    if args.exclude_file:
        exclude |= {ln.strip() for ln in args.exclude_file.read_text(encoding="utf-8").splitlines() if ln.strip()}
    groups = collect_groups(Path(args.photos), exclude)
    if args.labels and FLAT in groups:
        raise BackboneError(f"--labels needs one sub-folder per person, but {args.photos} has loose photos")
    prepare_out(out, args.force)

    alignment = args.alignment or (DLIB_TEMPLATE_NAME if args.teacher == "rebuilt" else ALIGN_TEMPLATE_NAME)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    maker = CropMaker(args.input_size, args.detector, cache_dir, min_face_size=args.min_face_size,
                      alignment=alignment)
    crop_set = build_crop_set(args.photos, args.input_size, maker=maker, files=groups, progress=not args.quiet)
    (out / "skipped.json").write_text(json.dumps(crop_set.skipped, indent=1) + "\n", encoding="utf-8")
    if crop_set.skipped:
        say(f"skipped {len(crop_set.skipped)} photo(s) without one usable face (list in {out / 'skipped.json'})")
    crops, labels = crop_set.crops, list(crop_set.labels)
    if args.max_faces and len(crops) > args.max_faces:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(crops))[: args.max_faces])
        crops, labels = crops[keep], [labels[i] for i in keep]
    if len(crops) < 8:
        raise BackboneError(f"only {len(crops)} usable face(s) in {args.photos}; a backbone needs many (hundreds+)")
    return crop_set, crops, labels, exclude, maker


def _teacher_targets(args: argparse.Namespace, views: np.ndarray, val_crops: np.ndarray, cache_dir: Path,
                     say: _Logger) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(training targets, held-out targets, the teacher's mean embedding, seconds spent labelling)."""
    teacher_cache = TeacherCache(args.teacher_cache or cache_dir.parent / "teacher.npz")
    todo = np.concatenate([views, val_crops]) if len(val_crops) else views
    last = [0.0]

    def progress(done: int, total: int, secs: float) -> None:
        if done == total or time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            say(f"teacher: {done}/{total} new views labelled ({done / max(secs, 1e-6):.1f}/s)")

    say(f"teacher labels: {len(todo)} views ({len(teacher_cache)} cached entries in {teacher_cache.path})")
    t0 = time.monotonic()
    targets = label_crops(todo, teacher_cache, progress=progress, kind=args.teacher)
    teacher_seconds = time.monotonic() - t0
    # All dlib embeddings share a large common component (any two faces have cosine ≈ 0.9), so a
    # plain cosine loss would mostly teach that. The student learns the teacher's direction *after*
    # removing the mean embedding: the identity part, spread over the whole sphere, which also
    # leaves the int8 output's few levels to the differences between people.
    teacher_mean = targets[: len(views)].mean(axis=0)
    targets = targets - teacher_mean
    targets /= np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), 1e-12)
    return targets[: len(views)], targets[len(views):], teacher_mean, teacher_seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    out = Path(args.out)
    say = _Logger(args.log, args.quiet)
    crop_set, crops, labels, exclude, maker = _faces(args, out, say)

    tr_idx, va_idx, how = split_heldout(labels, args.val_people, args.seed)
    say(f"{len(crops)} faces ({len(set(labels) - {FLAT})} people folders); {how}")

    # Teacher labels for every view of the training faces and the clean held-out faces.
    views, _owner = make_views(crops[tr_idx], args.views, args.seed)
    val_crops = crops[va_idx]
    y_train, y_val, teacher_mean, teacher_seconds = _teacher_targets(args, views, val_crops, maker.cache_dir, say)

    prep = Preprocessing(input_size=args.input_size, alignment=maker.alignment)
    x_val = normalize(val_crops, prep)
    model, embed, history, best_epoch, fit_start = fit_student(args, prep, views, y_train, x_val, y_val, say)
    center_output(model, crops[tr_idx], prep)
    model.save(out / EMBEDDER_FILE)

    student_val = embed(x_val)
    val_cos = cosine_rows(student_val, y_val) if len(x_val) else np.zeros(0)
    val_labels = [labels[i] for i in va_idx]
    report: dict[str, Any] = {
        "heldout": how,
        "heldout_faces": len(va_idx),
        "student_teacher_cosine": {
            "mean": float(val_cos.mean()) if len(val_cos) else None,
            "median": float(np.median(val_cos)) if len(val_cos) else None,
            "p10": float(np.percentile(val_cos, 10)) if len(val_cos) else None,
            "untrained_mean": history["initial_val_cosine"],
        },
        "nn_identification_heldout": {
            "teacher": nn_identification(y_val, val_labels),
            "student": nn_identification(student_val, val_labels),
        },
        "best_epoch": best_epoch,
        "epochs_run": len(history["epoch"]),
        "train_faces": len(tr_idx),
        "train_views": len(views),
        "teacher_seconds": round(teacher_seconds, 1),
        "train_seconds": round(time.monotonic() - fit_start, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "skipped": len(crop_set.skipped),
        "cpu_count": os.cpu_count(),
    }
    config = {
        "kind": "backbone",
        "file": EMBEDDER_FILE,
        "embedding_dim": TEACHER_DIM,
        "normalised_output": False,
        "preprocessing": prep.to_dict(),
        "input_size": args.input_size,
        "alpha": args.alpha,
        "weights_init": str(args.weights),
        "teacher": {"id": TEACHER_ID, "licence": TEACHER_LICENCE, "normalised": True, "kind": args.teacher,
                    "mean": [round(float(v), 6) for v in teacher_mean]},
        "loss": "1 - cosine(student, normalise(teacher - teacher.mean))",
        "views": args.views,
        "detector": {"path": str(maker.detector_path), "min_face_size": args.min_face_size},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    people = {
        "train": sorted({labels[i] for i in tr_idx} - {FLAT}),
        "heldout": sorted(set(val_labels) - {FLAT}),
        "excluded": sorted(exclude),
    }
    run_files.write_checked(out / run_files.CONFIG_FILE, config, run_files.BackboneConfig)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "people.json").write_text(json.dumps(people, indent=1) + "\n", encoding="utf-8")
    return report

