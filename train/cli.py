"""`faceberry train` (`python -m train`): its options, their checks, and the run (faceberry.device.cli holds the tree).

    python -m train --photos DIR --out RUN_DIR [options]        train a classifier
    python -m train --photos DIR --out RUN_DIR --backbone DIR   few-shot on a face-aware backbone
    python -m train backbone ...                                 build a face-aware backbone (faceberry.train.backbone)
    python -m train cohort ...                                   its stranger cohort (faceberry.train.cohort)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from faceberry.contract import IMAGE_SUFFIXES
from faceberry.device import cli
from faceberry.preprocess import DEFAULT_INPUT_SIZE

EPILOG = f"""\
Photos: DIR/<person>/*.jpg (or {' '.join(IMAGE_SUFFIXES[1:])}), one folder per person; HEIC/HEIF
need pillow-heif and AVIF Pillow 11.3+ (both in requirements-train.txt). Each photo must show that person's
face clearly. In a photo with several faces of similar size, the face that agrees with the person's other
photos is used (--backbone only); photos with no face, a face too small, no face singled out, an unreadable
file or one over 40 megapixels are skipped and listed in RUN_DIR/skipped.json with the reason (a summary is
printed). An empty person folder is ignored with a warning; a person with fewer than --min-photos usable
photos (a folder of files faceberry cannot read included) is an error. With --backbone and its stranger
cohort one person is enough ("is it me?"). A folder named `unknown`
(or --negatives DIR) holds other people's faces: part of them trains an `unknown` class, the rest, never
trained on, calibrate the accept threshold.

RUN_DIR gets: model.keras, labels.txt, config.json, crops.npz, report.json (per-person validation
accuracy, confusion matrix, threshold and false-accept rate), history.json and skipped.json; a fine-tune
run (no --backbone) also draws curves.png and confusion.png. Then: python -m convert --run RUN_DIR --out BUNDLE_DIR.

Two paths: with --backbone BACKBONE_DIR (recommended) nothing is trained, and the "model", "training" and
"augmentation" options are ignored except --val-fraction, --seed and --target-far; without it MobileNetV2
is fine-tuned and every option applies.

Subcommands: `python -m train backbone --help` builds a face-aware backbone for --backbone, and
`python -m train cohort --help` its stranger cohort.
"""


HELP = "workstation: train a face classifier from photos/<person>/ folders (a gallery on a backbone, or a " \
    "fine-tuned MobileNetV2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a face classifier from photos/<person>/ folders, on face crops made by the device's own "
                     "detector and alignment.")
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    io = p.add_argument_group("input and output")
    # Required, but checked in validate(): argparse would also demand them of `train backbone` and `train cohort`.
    io.add_argument("--photos", type=Path, help="folder with one sub-folder of photos per person (required)")
    io.add_argument("--out", type=Path, help="run directory to create, must be empty or absent (required)")
    io.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    io.add_argument("--negatives", type=Path, default=None,
                    help="folder of other people's faces (loose photos or one sub-folder per person) used to "
                    "teach `unknown` and to calibrate the threshold; adds to PHOTOS/unknown/ if both exist")
    io.add_argument("--backbone", type=Path, default=None,
                    help="a face-aware backbone directory from `python -m train backbone`: train a few-shot "
                    "gallery model on it instead of fine-tuning ImageNet MobileNetV2")
    io.add_argument("--cohort", type=Path, default=None,
                    help="with --backbone: the stranger cohort (.npz from `python -m train cohort`) that calibrates "
                    "`unknown` (default BACKBONE/cohort.npz)")

    crops = p.add_argument_group("face crops (both paths)")
    # None, not 128: with --backbone the backbone's own size is used, and only a size the user chose
    # and the backbone cannot take deserves a warning.
    crops.add_argument("--input-size", type=int, default=None,
                       help=f"side of the aligned face crop and network input, pixels (default {DEFAULT_INPUT_SIZE}; "
                       "with --backbone, the backbone's size)")
    crops.add_argument("--min-face-size", type=int, default=40,
                       help="faces narrower than this many pixels in the photo are too small to use (default 40)")
    crops.add_argument("--min-photos", type=int, default=5,
                       help="usable photos each person needs, at least 2 (default 5; 10 or more recommended)")
    crops.add_argument("--detector", type=Path, default=None,
                       help="BlazeFace .tflite (default: $FACEBERRY_DETECTOR or "
                       "models/face_detection_short_range.tflite)")
    crops.add_argument("--cache-dir", type=Path, default=None,
                       help="where face crops are cached between runs (default $XDG_CACHE_HOME/faceberry/crops "
                       "or ~/.cache/faceberry/crops)")
    crops.add_argument("--no-cache", action="store_true", help="do not read or write the crop cache")

    model = p.add_argument_group("model (fine-tune path only; ignored with --backbone)")
    model.add_argument("--weights", default="imagenet",
                       help="backbone initialisation: imagenet (Keras download, default), none (random), a "
                       "path to a no-top MobileNetV2 .weights.h5 with the same --alpha, or a face-aware start: the "
                       "directory of a backbone distilled by `python -m train backbone --arch mobilenetv2`")
    model.add_argument("--alpha", type=float, default=1.0,
                       help="MobileNetV2 width multiplier: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4 (default 1.0)")
    model.add_argument("--dropout", type=float, default=0.3, help="dropout before the softmax head (default 0.3)")

    fit = p.add_argument_group("training (fine-tune path only, except --val-fraction, --seed and --target-far)")
    fit.add_argument("--epochs", type=int, default=20,
                     help="maximum epochs for the head on the frozen backbone (phase 1, default 20)")
    fit.add_argument("--lr", type=float, default=1e-3, help="phase 1 learning rate (default 1e-3)")
    fit.add_argument("--fine-tune-epochs", type=int, default=10,
                     help="maximum epochs fine-tuning the top blocks (phase 2, default 10; 0 skips it)")
    fit.add_argument("--fine-tune-from", type=int, default=13,
                     help="unfreeze MobileNetV2 from block N (1–16) to the top in phase 2 (default 13)")
    fit.add_argument("--fine-tune-lr", type=float, default=1e-5,
                     help="phase 2 learning rate (default 1e-5; 1e-4 measurably knocks the model back at first)")
    fit.add_argument("--min-epoch-samples", type=int, default=256,
                     help="repeat a small training set (each copy augmented differently) so one epoch shows at "
                     "least this many faces (default 256)")
    fit.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    fit.add_argument("--patience", type=int, default=5,
                     help="stop a phase after this many epochs without a better validation loss (default 5; 0 off)")
    fit.add_argument("--val-fraction", type=float, default=0.2,
                     help="share of each person's crops held out for validation (default 0.2)")
    fit.add_argument("--negatives-train-fraction", type=float, default=0.5,
                     help="share of negative faces used to train `unknown`; the rest calibrate the threshold "
                     "(split by person when the negatives have sub-folders; default 0.5)")
    fit.add_argument("--seed", type=int, default=0,
                     help="random seed for the split, augmentation and weights (default 0)")
    fit.add_argument("--target-far", type=float, default=None,
                     help="share of strangers' faces the accept threshold may let through, 0–1 (default 0.005 "
                     "with --backbone, calibrated on its stranger cohort; 0.05 for the fine-tune)")

    aug = p.add_argument_group("augmentation, ImageDataGenerator style (fine-tune path only)")
    aug.add_argument("--rotation", type=float, default=40.0, help="maximum rotation, degrees (default 40)")
    aug.add_argument("--shift", type=float, default=0.2, help="maximum width/height shift, fraction (default 0.2)")
    aug.add_argument("--shear", type=float, default=0.2, help="maximum shear (default 0.2)")
    aug.add_argument("--zoom", type=float, default=0.2, help="maximum zoom in or out, fraction (default 0.2)")
    aug.add_argument("--brightness", type=float, default=0.2,
                     help="maximum brightness change, fraction (default 0.2; 0 off)")
    aug.add_argument("--contrast", type=float, default=0.2,
                     help="maximum contrast change, fraction (default 0.2; 0 off)")

    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only warnings and the summary")


def build_parser() -> argparse.ArgumentParser:
    """`python -m train`'s parser, as faceberry.device.cli's tree builds it."""
    return cli.build_parser(("train",), at=("train",), prog="python -m train")


def _input_size(args: argparse.Namespace) -> int | None:
    """--input-size as given, else the backbone's (read from its config.json), else the default."""
    if args.input_size is not None or args.backbone is None:
        return DEFAULT_INPUT_SIZE if args.input_size is None else args.input_size
    try:
        return int(json.loads((Path(args.backbone) / "config.json").read_text(encoding="utf-8"))["input_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a backbone directory: loading it says so, with the fix


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    missing = [flag for flag, value in (("--photos", args.photos), ("--out", args.out)) if value is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    args.input_size = _input_size(args)
    if args.input_size is not None and args.input_size < 32:
        p.error("--input-size must be 32 or more")
    if args.min_photos < 2:
        p.error("--min-photos must be at least 2 (one to train on, one to validate)")
    if not 0.0 < args.val_fraction < 1.0:
        p.error("--val-fraction must be between 0 and 1")
    if args.target_far is None and args.backbone is None:
        args.target_far = 0.05
    if args.target_far is not None and not 0.0 <= args.target_far <= 1.0:
        p.error("--target-far must be between 0 and 1")
    if not 0.0 <= args.negatives_train_fraction <= 1.0:
        p.error("--negatives-train-fraction must be between 0 and 1")
    if args.weights not in ("imagenet", "none") and not Path(args.weights).exists():
        p.error(f"--weights {args.weights}: no such file or directory; use imagenet, none, a .weights.h5 path or "
                "a distilled backbone's directory")


# Options only the fine-tune path reads: with --backbone a value the user set is named, not silently dropped.
FINE_TUNE_ONLY = ("weights", "alpha", "dropout", "epochs", "lr", "fine_tune_epochs", "fine_tune_from", "fine_tune_lr",
                  "min_epoch_samples", "batch_size", "patience", "negatives_train_fraction", "rotation", "shift",
                  "shear", "zoom", "brightness", "contrast")


def _warn_ignored(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    changed = [f"--{d.replace('_', '-')}" for d in FINE_TUNE_ONLY if getattr(args, d) != p.get_default(d)]
    if changed:
        logging.getLogger(__name__).warning("ignoring %s: only the fine-tune path (no --backbone) uses them",
                                            ", ".join(changed))


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """faceberry.device.cli's hook, after parsing (logging is set up): a bad value ends in the parser's usage error."""
    _validate(p, args)
    if args.backbone is not None:
        _warn_ignored(p, args)


def run(args: argparse.Namespace) -> int:
    if args.backbone is not None:
        from faceberry.train.fewshot import train_fewshot

        return train_fewshot(args)

    from faceberry.train.errors import TrainError
    from faceberry.train.trainer import train

    logging.getLogger(__name__).info(
        "fine-tuning ImageNet MobileNetV2; for far better accuracy, build a face backbone once "
        "(`python -m train backbone --arch dlib-resnet --out BACKBONE_DIR`) and pass --backbone BACKBONE_DIR"
    )
    try:
        report = train(args)
    # A file the run needs is not there: bad input, exit 2 (faceberry.device.cli prints it).
    except FileNotFoundError as exc:
        raise TrainError(str(exc)) from exc
    print_summary(report, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m train ARGS` from Python: `faceberry train ARGS` (faceberry.device.cli)."""
    return cli.main(argv, prog="python -m train", at=("train",))


def print_summary(report: dict, out: Path) -> None:
    th = report["threshold"]
    lines = [
        f"trained {len(report['labels'])} classes in {report['train_seconds']:.0f} s → {out}",
        f"validation accuracy {100 * (report['val_accuracy'] or 0):.1f}% (chance {100 * report['chance']:.1f}%)",
        f"accept threshold {th['accept']:.3f} for {100 * th['target_far']:.1f}% false accepts on {th['basis']}: "
        f"{100 * (th['far'] or 0):.1f}% false accepts, {100 * (th['known_accept_rate'] or 0):.1f}% of known faces "
        "accepted as the right person",
    ]
    for person, row in report["per_person"].items():
        lines.append(f"  {person:<28} {100 * row['accuracy']:5.1f}%  ({row['val_faces']} validation faces)")
    if report["skipped"]["count"]:
        reasons = ", ".join(f"{n} {r}" for r, n in report["skipped"]["by_reason"].items())
        lines.append(f"skipped {report['skipped']['count']} photo(s): {reasons} (see {out / 'skipped.json'})")
    lines.append(f"next: python -m convert --run {out} --out BUNDLE_DIR")
    print("\n".join(lines))
