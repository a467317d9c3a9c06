"""RUN_DIR → verified BUNDLE_DIR: convert, check against the float model, write files and manifest.

Nothing is written to BUNDLE_DIR unless the converted model passes the check: the bundle is
assembled in a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.bundle import write_manifest
from faceberry.contract import FACE_ONLY, UNKNOWN, embed_enrolled
from faceberry.errors import UsageError
from faceberry.heads import HEADS, BundleDraft, Head, HeadError, Verification
from faceberry.models import DETECTOR_FILENAME, DETECTOR_SHA256, default_detector_path
from faceberry.preprocess import Preprocessing, normalize
from faceberry.train import run_files

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.tflite"
LABELS_FILE = "labels.txt"


# The share (%) of validation faces the converted model must answer as the float model does (top-1 person);
# refused only when the faces show it is below this beyond chance (95% Wilson interval wholly below).
MIN_AGREEMENT = 95.0
# Faces the int8 activation ranges are measured on, by calibration source: training crops alone (the
# default), or training crops then augmented copies of them.
CALIBRATION_SAMPLES = {"augmented": 1000, "plain": 200}
# Training faces the int8 weight rounding's mean output shift is measured on (faceberry.convert.quantize.bias_correct):
# every crop up to 200, the plain calibration set. On the card's fine-tune (161 crops) int8's top-1 agreement with
# float went from 72.7% to 95.5% on its validation faces and from 73.0% to 92.4% on 185 other photos (96 crops:
# 95.5% and 89.2%; bench/card_path.py).
BIAS_CORRECTION_FACES = 200


# Modes whose activation ranges are measured on calibration faces, and modes with int8 weights.
CALIBRATED = ("int8", "int16x8")
INT8_WEIGHTS = ("int8", "int16x8", "dynamic")


class ConvertError(UsageError):
    """A run or bundle problem; the message names it and the fix."""


class AccuracyDropError(ConvertError):
    """The converted model loses too much accuracy against the float one (a lighter quantization may not).

    `reason` is the message without the suggestions (for a caller that falls back by itself);
    `agreement` the figures the refusal rests on."""

    def __init__(self, message: str, agreement: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = message.split("; no bundle written", 1)[0]
        self.agreement = agreement or {}


@dataclass
class Run:
    root: Path
    head: Head  # the run's classifier kind (faceberry.heads), from its config.json
    config: run_files.RunConfig
    report: run_files.RunReport
    labels: list[str]
    prep: Preprocessing
    crops: np.ndarray
    crop_labels: list[str]
    split: np.ndarray
    reference: tuple[np.ndarray, list[str]] | None = None  # what the head needs besides the model (a gallery)

    @property
    def kind(self) -> str:
        return self.head.kind

    @property
    def gallery(self) -> np.ndarray | None:
        return self.reference[0] if self.reference else None

    @property
    def gallery_labels(self) -> list[str] | None:
        return self.reference[1] if self.reference else None


def load_run(root: Path) -> Run:
    if not root.is_dir():
        raise ConvertError(
            f"run directory not found: {root}; train one with `python -m train --photos DIR --out {root}`"
        )
    needed = ["model.keras", "labels.txt", "config.json", "crops.npz", "report.json"]
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise ConvertError(f"{root} is not a complete training run (missing {', '.join(missing)}); train it again")
    try:
        config = run_files.read(root / run_files.CONFIG_FILE, run_files.RunConfig)
        report = run_files.read(root / run_files.REPORT_FILE, run_files.RunReport)
    except run_files.RunFileError as exc:
        raise ConvertError(str(exc)) from None
    prep = config.preprocessing.preprocessing()
    labels = [ln.strip() for ln in (root / "labels.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    with np.load(root / "crops.npz", allow_pickle=False) as data:
        crops, crop_labels, split = data["crops"], [str(v) for v in data["labels"]], data["split"].astype(str)
    run = Run(root, HEADS[config.kind], config, report, labels, prep, crops, crop_labels, split)
    try:
        run.reference = run.head.run_reference(root)
    except HeadError as exc:
        raise ConvertError(str(exc)) from exc
    return run


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"bundle directory {out} is not empty; choose another --out or pass --force to replace it")


def _load_keras(path: Path):
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except ValueError as exc:
        if "safe_mode" not in str(exc) and "Lambda" not in str(exc):
            raise
        # A run we wrote ourselves (e.g. an embedder with an L2-normalising Lambda): trusted input.
        return keras.models.load_model(path, compile=False, safe_mode=False)


def _check_set(run: Run, run_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The run's training faces (normalised, for calibration) and the faces the converted model is checked on:
    (train_x, check_x, their true labels with negatives as UNKNOWN, which of them are validation faces)."""
    is_train = run.split == "train"
    check_mask = (run.split == "val") | (run.split == "negative")
    if not check_mask.any():
        raise ConvertError(
            f"{run_dir / 'crops.npz'} has no validation faces to check the converted model on; train again"
        )
    train_x = normalize(run.crops[is_train], run.prep)
    check_x = normalize(run.crops[check_mask], run.prep)
    check_labels = np.array(run.crop_labels)[check_mask]
    truth = [lbl if s == "val" else UNKNOWN for lbl, s in zip(check_labels, run.split[check_mask], strict=True)]
    is_val = run.split[check_mask] == "val"
    return train_x, check_x, truth, is_val


def _quantize(model: Any, run: Run, run_dir: Path, train_x: np.ndarray, quantization: str, calibration: str | None,
              calibration_samples: int | None, float_ops: Sequence[str] | None,
              bias_correction: bool | None = None) -> tuple[bytes, dict[str, Any]]:
    """The TFLite flatbuffer and, for int8, the recipe that made it (calibration, float ops, bias correction,
    weight scales)."""
    from faceberry.convert.quantize import bias_correct, convert_model, representative_samples, weight_scales

    recipe: dict[str, Any] = {}
    representative = None
    source = model
    if quantization in CALIBRATED:
        calibration, float_ops = _int8_recipe(calibration, float_ops)
        if calibration_samples is None:
            calibration_samples = CALIBRATION_SAMPLES[calibration]
        augment = _augmentation(run) if calibration == "augmented" else None
        representative = representative_samples(train_x, calibration_samples, augment=augment)
        recipe = {"calibration": {"source": calibration, "samples": len(representative),
                                  "training_crops": len(train_x)},
                  "float_ops": list(float_ops)}
        if bias_correction is None:
            # On for a classifier's int8 (the card's fine-tune, whose classes lie a few hundredths apart), off for
            # an embedder: the face backbones keep their answers without it and were not measured with it.
            bias_correction = quantization == "int8" and not run.head.embeds
        if bias_correction:
            # A second copy: the float model stays the reference the converted one is checked against.
            source = _load_keras(run_dir / "model.keras")
            log.info("correcting the int8 weight rounding's mean shift layer by layer on %d training faces "
                     "(bias correction) …", min(len(train_x), BIAS_CORRECTION_FACES))
            recipe["bias_correction"] = bias_correct(source, representative_samples(train_x, BIAS_CORRECTION_FACES))
        else:
            recipe["bias_correction"] = None
    log.info("converting %s to %s TFLite%s …", run_dir / "model.keras", quantization,
             f" ({recipe['calibration']['samples']} {calibration} calibration faces"
             f"{', ' + '/'.join(float_ops) + ' in float' if float_ops else ''})" if recipe else "")
    flatbuffer = convert_model(source, quantization, representative, float_ops=recipe.get("float_ops", ()))
    if quantization in INT8_WEIGHTS:
        recipe["weight_scales"] = weight_scales(flatbuffer)
    return flatbuffer, recipe


def convert_run(
    run_dir: Path,
    out: Path,
    quantization: str = "int8",
    max_drop: float = 2.0,
    min_agreement: float | None = MIN_AGREEMENT,
    calibration_samples: int | None = None,
    detector: Path | None = None,
    force: bool = False,
    recalibrate: bool = True,
    calibration: str | None = None,
    float_ops: Sequence[str] | None = None,
    tried: Sequence[str] = (),
    bias_correction: bool | None = None,
) -> dict[str, Any]:
    """Build and verify the bundle; returns its manifest. Raises ConvertError when it does not pass.

    int8 options (measured in bench/card_path.py; defaults in _int8_recipe): `calibration` "plain" (up to
    `calibration_samples` training crops, default 200) or "augmented" (the run's training crops and
    augmented copies of them, `calibration_samples` in all, default 1000); `float_ops`, TFLite builtin ops
    kept in float (faceberry.convert.quantize.HEAD_OPS); `bias_correction` (default: on for a softmax run's int8,
    off otherwise) corrects the mean shift int8 weight rounding causes, layer by layer, before converting.
    `tried`: modes refused earlier in this conversion, for the message.
    """
    from faceberry.convert.verify import run_tflite
    from faceberry.train.calibrate import calibrate

    run = load_run(run_dir)
    check_out_dir(out, force)
    detector = detector or default_detector_path()
    if not detector.is_file():
        raise ConvertError(f"face detector not found: {detector}; run `python -m models fetch`")

    train_x, check_x, truth, is_val = _check_set(run, run_dir)
    model = _load_keras(run_dir / "model.keras")
    flatbuffer, recipe = _quantize(model, run, run_dir, train_x, quantization, calibration, calibration_samples,
                                   float_ops, bias_correction)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / CLASSIFIER_FILE).write_bytes(flatbuffer)
        float_out = np.asarray(model.predict(check_x, batch_size=64, verbose=0), dtype=np.float32)
        q_out = run_tflite(staging / CLASSIFIER_FILE, check_x)
        target_far = float(run.report.threshold.target_far)
        # The head checks the converted model against the float one (and a softmax head re-fits the threshold
        # on the converted outputs with the run's own procedure).
        verified = run.head.verify(Verification(
            float_out=float_out, converted_out=q_out, truth=truth, is_val=is_val, labels=run.labels,
            threshold=float(run.report.threshold.accept), target_far=target_far, reference=run.reference,
            refit=calibrate if recalibrate else None))
        agreement, threshold, thresholds_note = verified.agreement, verified.threshold, verified.note
        agreement["quantization"] = quantization
        agreement.update(recipe)
        _check_drop(agreement, quantization, max_drop, min_agreement, tried)

        shutil.copyfile(detector, staging / DETECTOR_FILENAME)
        (staging / LABELS_FILE).write_text("\n".join(run.labels) + "\n", encoding="utf-8")
        files = [CLASSIFIER_FILE, DETECTOR_FILENAME, LABELS_FILE]
        manifest: dict[str, Any] = {
            "classifier": {"file": CLASSIFIER_FILE, "kind": run.kind, "quantization": quantization},
            "detector": {"file": DETECTOR_FILENAME, "expected_sha256": DETECTOR_SHA256},
            "labels": {"file": LABELS_FILE, "count": len(run.labels)},
            "preprocessing": run.prep.to_dict(),
            "thresholds": {"accept": threshold, "target_far": target_far, "source": thresholds_note},
            "metrics": {
                "agreement": agreement,
                "training": run.report.model_dump(mode="json", include={"val_accuracy", "chance", "train_seconds",
                                                                         "split"}, exclude_unset=True),
                "training_threshold": run.report.threshold.model_dump(mode="json", exclude_unset=True),
            },
            "source": {"run": str(run_dir.resolve()),
                       "backbone": run.config.backbone.model_dump(mode="json", exclude_unset=True)
                       if run.config.backbone else None},
        }
        # How the run embedded its people (faceberry.contract.enrolled_views of its backbone): the device
        # gallery is remade the same way, and the bundle says so (FaceClassifier's second look).
        views = run.config.gallery.views if run.config.gallery else FACE_ONLY

        def embed(crops: np.ndarray, views: str) -> np.ndarray:  # as device enroll embeds a person's photos
            return embed_enrolled(lambda x: run_tflite(staging / CLASSIFIER_FILE, normalize(x, run.prep)), crops, views)

        draft = BundleDraft(staging=staging, run_dir=run_dir, views=views, manifest=manifest,
                            files=files, recalibrate=recalibrate, embed=embed, crops=run.crops,
                            crop_labels=run.crop_labels, split=run.split, labels=run.labels,
                            reference=run.reference, target_far=target_far, threshold=threshold,
                            warn=lambda warning: log.warning("%s", warning))
        try:
            manifest["thresholds"] = run.head.finish(draft)
        except HeadError as exc:
            raise ConvertError(str(exc)) from exc
        manifest = write_manifest(staging, manifest, files)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _int8_recipe(calibration: str | None, float_ops: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """The int8 recipe: the caller's choice, else training crops as they are and every op in int8.

    Augmented calibration faces (1,000 or 4,000), a float head (faceberry.convert.quantize.HEAD_OPS), 16-bit
    activations and dynamic range were measured on the card's fine-tune (22 people × 10 photos,
    bench/card_path.py, docs/BENCHMARKS.md) and changed nothing: its int8 answers differ from float on 12 of 44
    faces with each, because the int8 *weights* alone (per channel, float activations) already move them. What
    moves them back is bias correction (convert_run's `bias_correction`, on for a softmax run); these stay options."""
    if calibration is None:
        calibration = "plain"
    if calibration not in ("augmented", "plain"):
        raise ValueError(f"unknown calibration {calibration!r}")
    return calibration, tuple(float_ops or ())


def _augmentation(run: Run):
    """The run's own training augmentation (faceberry.train.model.build_augmentation with its flags), applied."""
    from faceberry.train.model import build_augmentation

    args = run.config.args
    names = ("rotation", "shift", "shear", "zoom", "brightness", "contrast")
    layer = build_augmentation(seed=int(args.get("seed", 0)),
                               **{"rotation_deg" if k == "rotation" else k: float(args[k]) for k in names if k in args})
    return lambda x: layer(x, training=True)


# A drop is refused only when the faces say it is real: the one-sided exact McNemar test on the faces only
# one of the two models gets right must reject "no difference" at this level (5%).
SIGNIFICANCE = 0.05
# Lighter to heavier: what to suggest after a refusal (never the mode just tried).
_MODES = ("int8", "float16", "float32")


def _next_modes(quantization: str, tried: Sequence[str]) -> list[str]:
    done = {quantization, *tried}
    after = _MODES[_MODES.index(quantization) + 1:] if quantization in _MODES else ()
    return [q for q in after if q not in done]


def _refusal(reason: str, quantization: str, tried: Sequence[str], knob: str) -> str:
    tips = ["train with more photos per person"]
    tips += [f"try --quantization {q}" for q in _next_modes(quantization, tried)[:1]]
    tips.append(knob)
    earlier = f" ({' and '.join(tried)} refused before it)" if tried else ""
    return f"{reason}{earlier}; no bundle written — {', '.join(tips[:-1])} or {tips[-1]}"


def _check_drop(agreement: dict[str, Any], quantization: str, max_drop: float, min_agreement: float | None,
                tried: Sequence[str] = (), alpha: float = SIGNIFICANCE) -> None:
    """Refuse a converted model whose answers are worse than the float model's, beyond chance.

    Both models answer every validation face; the accuracy drop counts only where they differ (a face only
    one of them gets right), and is refused when it is larger than `max_drop` points AND the exact McNemar
    test on those faces says it is not chance at `alpha`. With 43 faces one face is 2.3 points, and one face
    lost is no evidence (p = 0.5). --min-agreement is refused when the 95% Wilson interval of the top-1
    agreement lies wholly below it. `tried`: modes refused earlier in this conversion (never suggested).
    """
    from faceberry.convert.verify import mcnemar_p, wilson_interval

    f_acc, q_acc = agreement.get("float_accuracy"), agreement.get("converted_accuracy")
    paired = agreement.pop("paired", None)  # kept as paired_test below
    if f_acc is not None and q_acc is not None:
        drop = 100.0 * (f_acc - q_acc)
        agreement["accuracy_drop_points"] = round(drop, 2)
        significant = True  # without per-face counts (an old caller) only the size can be judged
        detail = ""
        if paired:
            lost, gained, n = paired["float_only_right"], paired["converted_only_right"], paired["faces"]
            p = mcnemar_p(lost, gained)
            significant = p < alpha
            agreement["paired_test"] = {
                "test": "exact one-sided McNemar on the faces only one model gets right",
                "faces": n, "float_only_right": lost, "converted_only_right": gained,
                "p_value": round(p, 6), "alpha": alpha, "significant": significant,
            }
            detail = f"; {lost} of {n} faces lost and {gained} gained, p = {p:.2g}"
        if drop > max_drop and significant:
            raise AccuracyDropError(_refusal(
                f"{quantization} model is {drop:.1f} points less accurate than float on validation faces "
                f"({100 * q_acc:.1f}% vs {100 * f_acc:.1f}%, allowed {max_drop:g}{detail})",
                quantization, tried, "raise --max-drop"), agreement)
        if drop > max_drop:
            log.info("%s is %.1f points below float on validation faces%s: within chance at %g, kept",
                     quantization, drop, detail, alpha)
    agree = agreement.get("top1_agreement")
    n = agreement.get("faces")
    if agree is not None and n:
        lo, hi = wilson_interval(round(agree * n), n)
        agreement["top1_agreement_95ci"] = [round(lo, 4), round(hi, 4)]
        if min_agreement is not None and 100.0 * hi < min_agreement:
            raise AccuracyDropError(_refusal(
                f"{quantization} model agrees with float on only {100 * agree:.1f}% of {n} validation faces "
                f"(95% interval {100 * lo:.1f}–{100 * hi:.1f}%, required {min_agreement:g}%)",
                quantization, tried, "lower --min-agreement"), agreement)
    elif min_agreement is not None and agree is not None and 100.0 * agree < min_agreement:
        raise AccuracyDropError(_refusal(
            f"{quantization} model agrees with float on only {100 * agree:.1f}% of validation faces "
            f"(required {min_agreement:g}%)", quantization, tried, "lower --min-agreement"), agreement)
