"""`faceberry convert` (`python -m convert`): a training run → a verified model bundle for the Pi (faceberry.device.cli
holds
the tree)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from pathlib import Path

from faceberry.device import cli

log = logging.getLogger(__name__)

EPILOG = """\
BUNDLE_DIR gets classifier.tflite, face_detection_short_range.tflite, labels.txt, manifest.json (schema,
preprocessing, accept threshold, sha256 of every file, float-vs-converted agreement) and, for an embedding
run, gallery.npz. Copy the whole directory to the Pi and point the device config at it.

For a run without --backbone, int8 weights are bias-corrected first (the mean output shift rounding them
causes is taken out of each layer's bias, measured on training crops; about a minute on 2 cores).

The converted model is run through the device's own TFLite wrapper on the run's validation and stranger
faces and compared with the float Keras model, face by face; if it is more than --max-drop points less
accurate and the faces it loses are too many to be chance, no bundle is written.
"""


HELP = "workstation: quantise a training run to TFLite, check it against the float model and write a bundle"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Quantise a training run's model to TFLite, check it against the float model and write a bundle."
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--run", required=True, type=Path, help="training run directory from `python -m train`")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create (must be empty or absent)")
    p.add_argument("--quantization", choices=("int8", "float16", "float32"), default=None,
                   help="int8: full-integer, fastest on a Pi (default; when it fails the accuracy check, float16 "
                   "is built instead, and said so); float16: half the float size; float32: as trained")
    p.add_argument("--max-drop", type=float, default=2.0,
                   help="refuse the bundle if the converted model's validation accuracy is more than this many "
                   "percentage points below the float model's (default 2.0) and the faces only one model gets "
                   "right show the drop is not chance (exact McNemar test, 5%%)")
    p.add_argument("--min-agreement", type=float, default=95.0,
                   help="also refuse it if the share of validation faces given the same top-1 answer by both "
                   "models is below this percentage beyond chance (its 95%% Wilson interval wholly below; "
                   "default 95; 0 turns it off)")
    p.add_argument("--calibration-samples", type=int, default=200,
                   help="training crops the int8 activation ranges are measured on (default 200)")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="convert a softmax run's int8 without bias correction (by default the mean output shift "
                   "int8 weight rounding causes is corrected layer by layer on training faces first; on the card's "
                   "MobileNetV2 fine-tune it took top-1 agreement with float from 73%% to 95%% on validation faces)")
    p.add_argument("--keep-threshold", action="store_true",
                   help="keep the training run's accept threshold (and, for a backbone run, its float gallery) "
                   "instead of re-fitting them on the converted model")
    p.add_argument("--detector", type=Path, default=None,
                   help="BlazeFace .tflite to put in the bundle (default: $FACEBERRY_DETECTOR or "
                   "models/face_detection_short_range.tflite)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")


def build_parser() -> argparse.ArgumentParser:
    """`python -m convert`'s parser, as faceberry.device.cli's tree builds it."""
    return cli.build_parser(("convert",), at=("convert",), prog="python -m convert")


@contextlib.contextmanager
def heartbeat(what: str, every_s: float = 10.0):
    """A line every `every_s` seconds while a long, silent step runs (the TFLite converter and the float-vs-
    converted check take 20-45 s and say nothing), so a user knows it has not hung. Logged at INFO: -q hides it."""
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("%s … %.0f s", what, time.monotonic() - started)

    thread = threading.Thread(target=beat, name="convert-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    """`python -m convert ARGS` from Python: `faceberry convert ARGS` (faceberry.device.cli)."""
    return cli.main(argv, prog="python -m convert", at=("convert",))


def run(args: argparse.Namespace) -> int:
    from faceberry.convert.build import AccuracyDropError, convert_run

    def convert(quantization: str, tried: tuple[str, ...] = ()) -> dict:
        log.info("loading TensorFlow and %s, then converting to %s and checking it against the float model "
                 "(20-45 s for a face backbone)", args.run, quantization)
        with heartbeat(f"still converting to {quantization} and checking"):
            return convert_run(
                args.run, args.out, quantization=quantization, max_drop=args.max_drop,
                min_agreement=args.min_agreement, calibration_samples=args.calibration_samples,
                detector=args.detector, force=args.force, recalibrate=not args.keep_threshold, tried=tried,
                bias_correction=False if args.no_bias_correction else None,
            )

    chosen = args.quantization or "int8"
    why = ("asked for with --quantization" if args.quantization
           else "the default; it passed the check against the float model")
    # A ConvertError or ModelError (bad input, exit 2) is printed by faceberry.device.cli.
    try:
        manifest = convert(chosen)
    except AccuracyDropError as exc:
        if args.quantization is not None:
            raise
        # A user who did not ask for int8 still gets a bundle: float16 keeps the float accuracy at
        # twice the size and about the float speed on a Pi.
        print(f"warning: {exc.reason}; building float16 instead (pass --quantization int8 to refuse)",
              file=sys.stderr)
        chosen = "float16"
        why = f"int8 was refused: {exc.reason}"
        manifest = convert(chosen, tried=("int8",))
    args.quantization = chosen
    size_kb = (args.out / manifest["classifier"]["file"]).stat().st_size / 1024
    print(summary(manifest, args.out, size_kb, why))
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def summary(manifest: dict, out: Path, size_kb: float, why: str) -> str:
    """What convert prints: which quantization was written and why, and the figures the check rests on."""
    ag = manifest["metrics"]["agreement"]
    q = manifest["classifier"]["quantization"]
    bc = ag.get("bias_correction")
    recipe = f", bias-corrected on {bc['faces']} training faces" if bc else ""
    ci = ag.get("top1_agreement_95ci")
    interval = f" (95% interval {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%)" if ci else ""
    return (
        f"bundle {manifest['bundle_id']} → {out}\n"
        f"{q} classifier{recipe}, {size_kb:.0f} KiB — {why}\n"
        f"on {ag['faces']} validation faces: same top-1 answer as the float model on {_pct(ag['top1_agreement'])}"
        f"{interval}, accuracy float {_pct(ag['float_accuracy'])} / {q} {_pct(ag['converted_accuracy'])}; "
        f"decisions agree on {_pct(ag['decision_agreement'])} of {ag['faces_with_strangers']} faces\n"
        f"accept threshold {manifest['thresholds']['accept']:.3f} ({manifest['thresholds']['source']})"
    )
