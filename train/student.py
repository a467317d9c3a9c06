"""The distilled backbone's student (faceberry.train.distill): MobileNetV2 built, fitted to the teacher's embeddings and
centred. faceberry.train.distill gathers the faces and the teacher's targets and writes the backbone directory."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from faceberry.preprocess import Preprocessing, normalize
from faceberry.train.backbone_dir import cosine_rows
from faceberry.train.teacher import TEACHER_DIM


def build_student(input_size: int, alpha: float, weights: str, dim: int = TEACHER_DIM):
    """MobileNetV2 → global average pooling → Dense(dim): a plain (unnormalised) embedding.

    The L2 normalisation is left to the loss and to the device (FaceClassifier normalises every
    embedding), which keeps a simple, well-quantised output tensor for int8.
    """
    import keras

    from faceberry.train.model import build_backbone

    backbone = build_backbone(input_size, alpha, weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    # Pretrained: BatchNorm keeps its statistics (inference mode) while every weight trains. Keras'
    # MobileNetV2 BN momentum is 0.999, so in training mode the moving statistics would lag the
    # batch statistics for thousands of steps and the saved model would not be the one trained.
    x = backbone(inputs, training=False) if weights != "none" else backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(dim, name="embedding")(x)
    return keras.Model(inputs, outputs, name="faceberry_embedder")


def center_output(model, crops: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Fold the mean embedding of `crops` into the last layer's bias, so outputs are centred.

    The student's raw outputs share a common component (pooled ImageNet features are all
    positive), which squeezes every cosine towards 1 for faces it did not train on: thresholds
    land at 0.99+ and int8 cannot resolve them. Subtracting the mean over many faces spreads them.
    Returns the mean that was removed.
    """
    layer = model.get_layer("embedding")
    kernel, bias = layer.get_weights()
    mean = model.predict(normalize(crops, prep), batch_size=64, verbose=0).mean(axis=0)
    layer.set_weights([kernel, bias - mean])
    return mean


def fit_student(args: argparse.Namespace, prep: Preprocessing, views: np.ndarray, y_train: np.ndarray,
                x_val: np.ndarray, y_val: np.ndarray, say: Callable[[str], None]):
    """The student fitted on the views (the best epoch's weights, by held-out cosine), its history, the best
    epoch and when fitting started; and the function that embeds with it."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    model = build_student(args.input_size, args.alpha, args.weights)
    steps_per_epoch = int(np.ceil(len(views) / args.batch_size))
    total_steps = steps_per_epoch * args.epochs
    if args.steps:
        total_steps = min(total_steps, args.steps)
    epochs = int(np.ceil(total_steps / steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=max(total_steps, 1), alpha=0.05,
                                                      warmup_target=None)

    def cosine_loss(y_true, y_pred):
        return 1.0 - tf.reduce_sum(tf.math.l2_normalize(y_true, -1) * tf.math.l2_normalize(y_pred, -1), -1)

    def cosine(y_true, y_pred):
        return 1.0 - cosine_loss(y_true, y_pred)

    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=cosine_loss, metrics=[cosine])
    scale, offset = np.float32(prep.scale), np.float32(prep.offset)
    ds = (
        tf.data.Dataset.from_tensor_slices((views, y_train))
        .shuffle(len(views), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size)
        .map(lambda x, y: (tf.cast(x, tf.float32) * scale + offset, y), num_parallel_calls=1)
        .repeat()
        .prefetch(2)
    )
    history: dict[str, list] = {"epoch": [], "loss": [], "cosine": [], "val_cosine": [], "seconds": []}
    best: dict[str, Any] = {}
    fit_start = time.monotonic()
    limit = args.time_limit * 60.0

    def embed(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=64, verbose=0) if len(x) else np.zeros((0, TEACHER_DIM), np.float32)

    class Track(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            val_cos = float(np.mean(cosine_rows(embed(x_val), y_val))) if len(x_val) else None
            history["epoch"].append(epoch + 1)
            history["loss"].append(float(logs.get("loss", np.nan)))
            history["cosine"].append(float(logs.get("cosine", np.nan)))
            history["val_cosine"].append(val_cos)
            history["seconds"].append(round(time.monotonic() - fit_start, 1))
            key = val_cos if val_cos is not None else history["cosine"][-1]
            if best.get("key") is None or key > best["key"]:
                best.update(key=key, epoch=epoch + 1, weights=model.get_weights())
            say(f"epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f} cosine {history['cosine'][-1]:.4f} "
                f"held-out cosine {val_cos if val_cos is None else round(val_cos, 4)} "
                f"({history['seconds'][-1]:.0f} s)")
            if limit and time.monotonic() - fit_start > limit:
                say(f"time limit of {args.time_limit:g} min reached: stopping")
                self.model.stop_training = True

    # The first point of the curve: the untrained student against the teacher.
    first = float(np.mean(cosine_rows(embed(normalize(views[: min(len(views), 256)], prep)),
                                      y_train[: min(len(views), 256)])))
    history["initial_cosine"] = first
    history["initial_val_cosine"] = float(np.mean(cosine_rows(embed(x_val), y_val))) if len(x_val) else None
    say(f"training {epochs} epoch(s) × {steps_per_epoch} steps on {len(views)} views; untrained cosine {first:.4f}")
    last_epoch_steps = total_steps - steps_per_epoch * (epochs - 1)
    model.fit(ds, epochs=epochs, steps_per_epoch=steps_per_epoch if epochs > 1 else last_epoch_steps,
              callbacks=[Track()], verbose=0)
    if best.get("weights") is not None:
        model.set_weights(best["weights"])
    return model, embed, history, best.get("epoch"), fit_start
