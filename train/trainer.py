"""`python -m train --photos DIR --out RUN_DIR`: crops (faceberry.train.inputs) → two-phase fine-tuning → calibrated
run dir."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.preprocess import Preprocessing, normalize
from faceberry.train import run_files
from faceberry.train.calibrate import UNKNOWN, calibrate, decisions
from faceberry.train.crops import (
    split_per_person,
    summarize_skips,
)
from faceberry.train.errors import TrainError  # noqa: F401 - faceberry.train.fewshot imports it from here
from faceberry.train.inputs import (  # noqa: F401 - gathering lives in faceberry.train.inputs; these names stay importable here
    Files,
    Gathered,
    check_out_dir,
    collect_inputs,
    gather_crops,
    split_negatives,
)

log = logging.getLogger(__name__)


def _fit_phase(model, train_model, x, y, val, class_weight, epochs, lr, batch_size, patience, best, phase, history):
    """One training phase; keeps the best weights seen (by val accuracy, then loss) in `best`."""
    import keras

    train_model.compile(
        optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            # Lowest validation loss, not highest accuracy: on a few dozen validation faces the
            # accuracy jumps by whole faces from epoch to epoch, and picking its maximum flatters the
            # float model (the int8 check against it then looks worse than it is).
            key = (-logs.get("val_loss", logs.get("loss", 0.0)), logs.get("val_accuracy", logs.get("accuracy", 0.0)))
            if best.get("key") is None or key > best["key"]:
                best.update(key=key, weights=model.get_weights(), epoch=len(history["epoch"]) + 1, phase=phase)
            history["epoch"].append(len(history["epoch"]) + 1)
            history["phase"].append(phase)
            for k, v in logs.items():
                history.setdefault(k, []).append(float(v))

    callbacks: list[Any] = [KeepBest()]
    if val is not None and patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience))
    train_model.fit(
        x, y, validation_data=val, epochs=epochs, batch_size=batch_size, class_weight=class_weight,
        callbacks=callbacks, verbose=2 if sys.stderr.isatty() else 0, shuffle=True,
    )


def train(args) -> dict[str, Any]:
    """Run a full training; returns the report. Raises TrainError for bad input."""
    started = time.monotonic()
    photos, out = Path(args.photos), Path(args.out)
    people, neg_groups, warnings = collect_inputs(photos, Path(args.negatives) if args.negatives else None)
    check_out_dir(out, args.force)
    for w in warnings:
        log.warning("%s", w)

    gathered = gather_crops(args, photos, out, args.input_size, people, neg_groups)
    person_set, neg_set, counts, skipped = gathered.people, gathered.negatives, gathered.counts, gathered.skipped

    # Per-person split; negatives split by identity into the `unknown` class and held-out strangers.
    _, va_idx = split_per_person(person_set.labels, args.val_fraction, args.seed)
    crops = [person_set.crops]
    crop_labels = list(person_set.labels)
    split = np.array(["train"] * len(person_set), dtype=object)
    split[va_idx] = "val"
    paths = list(person_set.paths)
    n_neg_train = 0
    if neg_set is not None and len(neg_set):
        ntr, _nneg = split_negatives(neg_set.labels, args.negatives_train_fraction, args.seed)
        neg_split = np.array(["negative"] * len(neg_set), dtype=object)
        neg_split[ntr] = "train"
        n_neg_train = len(ntr)
        crops.append(neg_set.crops)
        crop_labels += [UNKNOWN] * len(neg_set)
        split = np.concatenate([split, neg_split])
        paths += neg_set.paths
    all_crops = np.concatenate(crops)
    labels = sorted(people) + ([UNKNOWN] if n_neg_train else [])
    label_index = {name: i for i, name in enumerate(labels)}
    np.savez_compressed(
        out / "crops.npz", crops=all_crops, labels=np.array(crop_labels, dtype=str), split=split.astype(str),
        paths=np.array(paths, dtype=str),
    )
    prep = Preprocessing(input_size=args.input_size)
    is_train, is_val, is_neg = split == "train", split == "val", split == "negative"
    y_all = np.array([label_index.get(lbl, -1) for lbl in crop_labels])
    x_train, y_train = normalize(all_crops[is_train], prep), y_all[is_train]
    # With a handful of photos an epoch is one or two steps; repeating the (augmented) set gives
    # each epoch enough steps for early stopping and the learning rate to mean something.
    repeats = max(1, int(np.ceil(args.min_epoch_samples / max(len(x_train), 1))))
    if repeats > 1:
        x_train, y_train = np.concatenate([x_train] * repeats), np.concatenate([y_train] * repeats)
    x_val, y_val = normalize(all_crops[is_val], prep), y_all[is_val]

    # TensorFlow is imported only now, after the cheap input checks have passed.
    import keras

    from faceberry.train.model import build_augmentation, build_classifier, set_backbone_trainable

    keras.utils.set_random_seed(args.seed)
    model, backbone = build_classifier(len(labels), args.input_size, args.alpha, args.weights, args.dropout)
    augment = build_augmentation(seed=args.seed, rotation_deg=args.rotation, shift=args.shift, shear=args.shear,
                                 zoom=args.zoom, brightness=args.brightness, contrast=args.contrast)
    inputs = keras.Input((args.input_size, args.input_size, 3))
    train_model = keras.Model(inputs, model(augment(inputs)))

    present = np.unique(y_train)
    weights_per_class = len(y_train) / (len(present) * np.bincount(y_train, minlength=len(labels)).clip(min=1))
    class_weight = {int(c): float(weights_per_class[c]) for c in range(len(labels))}
    val = (x_val, y_val) if len(x_val) else None
    history: dict[str, list] = {"epoch": [], "phase": []}
    best: dict[str, Any] = {}
    pretrained = args.weights != "none"
    set_backbone_trainable(backbone, None if pretrained else 0, freeze_bn=pretrained)
    _fit_phase(model, train_model, x_train, y_train, val, class_weight, args.epochs, args.lr, args.batch_size,
               args.patience, best, "head" if pretrained else "full", history)
    if pretrained and args.fine_tune_epochs > 0:
        n_layers = set_backbone_trainable(backbone, args.fine_tune_from)
        log.info("fine-tuning %d backbone layers from block_%d at lr %g",
                 n_layers, args.fine_tune_from, args.fine_tune_lr)
        _fit_phase(model, train_model, x_train, y_train, val, class_weight, args.fine_tune_epochs, args.fine_tune_lr,
                   args.batch_size, args.patience, best, "fine-tune", history)
    if best.get("weights") is not None:
        model.set_weights(best["weights"])
    set_backbone_trainable(backbone, None)
    model.save(out / "model.keras")

    # Evaluation and the unknown threshold, with the best weights.
    def predict(x):
        return model.predict(x, batch_size=64, verbose=0) if len(x) else np.zeros((0, len(labels)), np.float32)

    val_probs = predict(x_val)
    neg_probs = predict(normalize(all_crops[is_neg], prep))
    val_truth = [crop_labels[i] for i in np.flatnonzero(is_val)]
    threshold = calibrate(val_probs, val_truth, neg_probs, labels, args.target_far)
    report = build_report(labels, val_truth, val_probs, neg_probs, threshold, counts, skipped, best, warnings)
    report["train_seconds"] = round(time.monotonic() - started, 1)
    report["split"] = {"train": int(is_train.sum()), "val": int(is_val.sum()), "negative": int(is_neg.sum()),
                       "unknown_train": n_neg_train}
    (out / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    config = {
        "kind": "softmax",
        "preprocessing": prep.to_dict(),
        "labels": labels,
        "backbone": {"name": "MobileNetV2", "alpha": args.alpha, "weights": str(args.weights)},
        "detector": {"path": str(gathered.detector_path), "min_face_size": args.min_face_size},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
    }
    run_files.write_checked(out / run_files.CONFIG_FILE, config, run_files.RunConfig)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    run_files.write_checked(out / run_files.REPORT_FILE, report, run_files.RunReport)
    from faceberry.train.plots import plot_confusion, plot_curves

    plot_curves(history, out / "curves.png")
    plot_confusion(report["confusion"]["matrix"], report["confusion"]["labels"], out / "confusion.png")
    return report


def _mean_equal(a: list[str], b: list[str]) -> float | None:
    return float(np.mean([x == y for x, y in zip(a, b, strict=True)])) if b else None


def build_report(labels, val_truth, val_probs, neg_probs, threshold, counts, skipped, best, warnings) -> dict[str, Any]:
    predicted = [labels[i] for i in np.argmax(val_probs, axis=1)] if len(val_probs) else []
    decided = decisions(val_probs, labels, threshold["accept"])
    rows = sorted(set(val_truth) | set(labels))
    if UNKNOWN not in rows:
        rows.append(UNKNOWN)  # the column for faces rejected by the threshold
    index = {name: i for i, name in enumerate(rows)}
    matrix = np.zeros((len(rows), len(rows)), dtype=int)
    for truth, pred in zip(val_truth, decided, strict=True):
        matrix[index[truth], index[pred]] += 1
    per_person = {}
    for person in sorted(set(val_truth)):
        idx = [i for i, t in enumerate(val_truth) if t == person]
        per_person[person] = {
            "val_faces": len(idx),
            "accuracy": float(np.mean([predicted[i] == person for i in idx])),
            "accepted_right": float(np.mean([decided[i] == person for i in idx])),
            "usable_photos": counts.get(person),
        }
    neg_decided = decisions(neg_probs, labels, threshold["accept"])
    return {
        "kind": "softmax",
        "labels": labels,
        "val_accuracy": _mean_equal(predicted, val_truth),
        "val_accepted_right": _mean_equal(decided, val_truth),
        "chance": 1.0 / max(len([lbl for lbl in labels if lbl != UNKNOWN]), 1),
        "per_person": per_person,
        "threshold": threshold,
        "stranger_faces": len(neg_probs),
        "stranger_false_accepts": int(sum(d != UNKNOWN for d in neg_decided)),
        "confusion": {"labels": rows, "matrix": matrix.tolist(),
                      "note": "rows: true person, columns: decision at the accept threshold"},
        "best_epoch": {"epoch": best.get("epoch"), "phase": best.get("phase")},
        "skipped": {"count": len(skipped), "by_reason": summarize_skips(skipped), "file": "skipped.json"},
        "warnings": warnings,
        "cpu_count": os.cpu_count(),
    }
