"""The card's own path, end to end: ImageNet MobileNetV2 fine-tuned without the face backbone → a bundle.

    nice -n 10 python -m bench.card_path            # 22 people × 10 photos; trains once, then reuses the run
    nice -n 10 python -m bench.card_path --retrain  # train again

People: 22 of the protocol's known lfw-dev people (bench/protocol.py, ≥ 20 photos each, seed 0), 10
training photos each; their other photos (up to --probes each) and 2 photos of each held-out stranger are
the probes for `python -m device eval`. Training is the README's `python -m train --photos DIR` (the project
defaults: 128 px, augmentation, head then top blocks), with the shared ImageNet weights file.

On that one run, every quantisation recipe (RECIPES: bias-corrected int8, plain and augmented calibration,
per-tensor, a float head, logits, 16x8, dynamic range, float16, quantisation-aware distillation) is built with
the code `python -m convert` runs (faceberry.convert.build._quantize, the head's verify with the threshold
re-fitted, the guard _check_drop; each .tflite kept under WORK/tflite and reused) and measured against the float
Keras model on the validation faces: top-1 agreement, decisions where either model names someone, top-1 where
the float model accepts, accuracy, the guard's paired test, size, LiteRT ms per face in .venv-device
(interleaved rounds), and top-1 agreement on the probe photos' faces (cropped by the training pipeline: faces no
choice was made on). Then `python -m convert --run RUN --out BUNDLE` (defaults), and `python -m device eval` on
the probes of that bundle, a float16 one and an int8 one without bias correction, compared face by face with the
float16 bundle.

    nice -n 10 python -m bench.card_path --recipes-only   # the recipe table alone

Writes bench/results/card_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bench.accuracy import PY, device_eval, sh
from bench.common import RESULTS, SHARED_WEIGHTS, describe, machine, pct, table, write_result
from bench.protocol import LFW_DEV, make_split
from faceberry.convert.quantize import HEAD_OPS

# Recipes measured on the same run: (name, quantization, options). Options: calibration / calibration_samples /
# float_ops / bias_correction as convert_run takes them (here bias correction is off unless a recipe says so);
# per_channel=False, logits=True and distill={...} (distill_on_grid's arguments) are bench-only variants.
RECIPES: list[tuple[str, str, dict[str, Any]]] = [
    ("int8: bias-corrected on the 161 crops, plain calibration (convert's default)", "int8",
     {"bias_correction": True}),
    ("int8: bias-corrected, 1000 augmented calibration", "int8",
     {"bias_correction": True, "calibration": "augmented", "calibration_samples": 1000}),
    ("int8: bias-corrected, head (pooling, dense, softmax) in float", "int8",
     {"bias_correction": True, "float_ops": HEAD_OPS}),
    ("float16", "float16", {}),
    ("dynamic range: int8 weights, float activations", "dynamic", {}),
    ("16x8: int8 weights, int16 activations", "int16x8", {}),
    ("16x8, 1000 augmented calibration faces", "int16x8", {"calibration": "augmented", "calibration_samples": 1000}),
    ("int8: 161 plain crops (convert's default before bias correction)", "int8", {}),
    ("int8: per-tensor weights (per-channel off)", "int8", {"per_channel": False}),
    ("int8: 1000 augmented crops", "int8", {"calibration": "augmented", "calibration_samples": 1000}),
    ("int8: 4000 augmented crops", "int8", {"calibration": "augmented", "calibration_samples": 4000}),
    ("int8: 1000 augmented crops, head in float", "int8", {"calibration": "augmented", "calibration_samples": 1000,
                                                           "float_ops": HEAD_OPS}),
    ("int8: logits out (softmax removed), compared by argmax", "int8", {"logits": True}),
    ("int8: bias-corrected, then quantisation-aware distillation, 48 steps", "int8", {"distill": {"steps": 48}}),
    ("int8: bias-corrected, then quantisation-aware distillation, 96 steps with mixup", "int8",
     {"distill": {"steps": 96, "mixup": True}}),
]


def materialise(work: Path, people: int, photos: int, probes: int, seed: int) -> dict[str, Any]:
    split = make_split(LFW_DEV, seed=seed, train_per_person=photos)
    rng = np.random.default_rng(seed)
    known = sorted(rng.choice(sorted(split.train), size=min(people, len(split.train)), replace=False).tolist())
    train_dir, eval_dir = work / "photos", work / "eval"
    for d in (train_dir, eval_dir):
        if d.exists():
            for link in sorted(d.rglob("*"), reverse=True):
                link.unlink() if link.is_symlink() or link.is_file() else link.rmdir()
    chosen: dict[str, dict[str, list[str]]] = {"train": {}, "probes": {}, "strangers": {}}
    for person in known:
        chosen["train"][person] = split.train[person]
        chosen["probes"][person] = split.test[person][:probes]
    for person, files in split.strangers.items():
        chosen["strangers"][person] = files[:2]
    for role, root in (("train", train_dir), ("probes", eval_dir), ("strangers", eval_dir)):
        for person, files in chosen[role].items():
            (root / person).mkdir(parents=True, exist_ok=True)
            for rel in files:
                os.symlink((LFW_DEV / rel).resolve(), root / rel)
    return {"people": known, "train_photos": sum(map(len, chosen["train"].values())),
            "probe_photos": sum(map(len, chosen["probes"].values())),
            "stranger_people": len(chosen["strangers"]), "stranger_photos": sum(map(len, chosen["strangers"].values())),
            "train_dir": str(train_dir), "eval_dir": str(eval_dir), "fingerprint": split.fingerprint()}


def train(work: Path, data: dict[str, Any], seed: int, retrain: bool, extra: list[str]) -> dict[str, Any]:
    run = work / "run"
    cmd = [PY, "-m", "train", "--photos", data["train_dir"], "--out", run, "--weights", SHARED_WEIGHTS,
           "--seed", str(seed), "--force", "--quiet", *extra]
    key = {"cmd": [str(c) for c in cmd[3:]], "people": data["people"], "fingerprint": data["fingerprint"]}
    meta_path = work / "run.meta.json"
    if not retrain and meta_path.is_file() and (run / "model.keras").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            print(f"reusing the training run in {run} (--retrain to redo it)", file=sys.stderr)
            return meta
    seconds, _ = sh(cmd, "training")
    meta = {"key": key, "train_seconds": round(seconds, 1), "command": "python -m train " + " ".join(key["cmd"])}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=RESULTS / "card", help="work folder (default %(default)s)")
    parser.add_argument("--people", type=int, default=22, help="known people (default 22)")
    parser.add_argument("--photos", type=int, default=10, help="training photos per person (default 10)")
    parser.add_argument("--probes", type=int, default=6, help="probe photos per known person (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="people, split and training seed (default 0)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the run exists")
    parser.add_argument("--train-only", action="store_true", help="stop after training")
    parser.add_argument("--recipes-only", action="store_true",
                        help="measure the recipes only (no convert CLI, device eval or diagnostics)")
    parser.add_argument("--train-arg", action="append", default=[], help="extra `python -m train` argument")
    args = parser.parse_args(argv)
    if not LFW_DEV.is_dir():
        print(f"error: {LFW_DEV} is absent ; put the shared data beside the repo as ../shared", file=sys.stderr)
        return 2
    info = machine()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = materialise(work, args.people, args.photos, args.probes, args.seed)
    meta = train(work, data, args.seed, args.retrain, args.train_arg)
    if args.train_only:
        return 0
    return measure(work, data, meta, info, args.recipes_only)


def measure(work: Path, data: dict[str, Any], meta: dict[str, Any], info: dict[str, Any],
            recipes_only: bool = False) -> int:
    from faceberry.convert.build import convert_run

    run = work / "run"
    report = json.loads((run / "report.json").read_text())
    rows = [measure_recipe(work, run, name, quantization, options) for name, quantization, options in RECIPES]
    speed = litert_speed(work, [r for r in rows if r.get("tflite")])
    for row in rows:
        row["invoke_ms"] = speed.get(row.get("tflite", ""), {})
    if recipes_only:
        info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
        print(f"\nthe card's path — {describe(info)}; float validation accuracy {pct(report.get('val_accuracy'))}")
        print(recipe_table(rows))
        path = write_result("card_path_recipes", {"machine": info, "data": data, "train": meta, "recipes": rows})
        print(f"\nwrote {path}")
        return 0

    bundle = work / "bundle"
    seconds, refused = sh([PY, "-m", "convert", "--run", run, "--out", bundle, "--force"], "convert", may_fail=True)
    final: dict[str, Any] = {"convert_seconds": round(seconds, 1), "refused": refused}
    if refused is None:
        manifest = json.loads((bundle / "manifest.json").read_text())
        ev = device_eval(bundle, Path(data["eval_dir"]), work / "eval.json")
        final.update(
            quantization=manifest["classifier"]["quantization"], bundle_id=manifest["bundle_id"],
            agreement=manifest["metrics"]["agreement"], accept_threshold=manifest["thresholds"]["accept"],
            classifier_bytes=(bundle / manifest["classifier"]["file"]).stat().st_size,
            known_accuracy=ev["known_accuracy"], stranger_false_accept_rate=ev["stranger_false_accept_rate"],
            closed_set_accuracy=ev["closed_set_accuracy"],
        )
        # Beside the bundle convert wrote, on photos the run never saw: the float16 bundle (the float model's
        # answers) and the int8 without bias correction (refused by the guard; built with the guard off).
        final["others"] = {}
        for name, options in (("float16", {"quantization": "float16"}),
                              ("int8 without bias correction", {"quantization": "int8", "bias_correction": False})):
            other = work / f"bundle-{options['quantization']}{'-nobc' if 'bias_correction' in options else ''}"
            convert_run(run, other, max_drop=100.0, min_agreement=0.0, force=True, **options)
            final["others"][name] = device_eval(other, Path(data["eval_dir"]), work / f"eval-{other.name}.json")
        reference = final["others"]["float16"]
        final["on_probes"] = {name: probe_agreement(e, reference) for name, e in
                              (("written bundle", ev), *final["others"].items())}
        for name, e in final["others"].items():
            final["others"][name] = {k: e[k] for k in ("known_accuracy", "stranger_false_accept_rate",
                                                       "closed_set_accuracy", "bundle_id")}
    diagnostics = diagnose(run)
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]

    print(f"\nthe card's path, {len(data['people'])} people × {data['train_photos'] // len(data['people'])} photos "
          f"— {describe(info)}; float validation accuracy {pct(report.get('val_accuracy'))} "
          f"on {report['split']['val']} faces")
    print(recipe_table(rows))
    if refused is None:
        print(f"\n`python -m convert` (defaults) → {final['quantization']} bundle {final['bundle_id']}; device eval on "
              f"{data['probe_photos']} probes of the known people and {data['stranger_photos']} of "
              f"{data['stranger_people']} strangers: known {pct(final['known_accuracy'])}, strangers accepted "
              f"{pct(final['stranger_false_accept_rate'])}, closed-set {pct(final['closed_set_accuracy'])}")
        for name, o in final["others"].items():
            print(f"{name} bundle, same probes: known {pct(o['known_accuracy'])}, strangers accepted "
                  f"{pct(o['stranger_false_accept_rate'])}, closed-set {pct(o['closed_set_accuracy'])}")
        print(table(["against the float16 bundle, on the probes", "faces", "top-1 =", "decisions =",
                     "decisions = where either names"],
                    [[name, a["faces"], pct(a["top1"]), pct(a["decisions"]),
                      f"{a['agree_where_named']}/{a['named_by_either']} = {pct(a['decisions_where_named'])}"]
                     for name, a in final["on_probes"].items()]))
    else:
        print(f"\n`python -m convert` (defaults) refused: {refused}")
    print("\nwhere int8 moves the answers (top-1 agreement with the float Keras model on the validation faces):")
    print(table(["variant", "top-1 = float"], [[k, pct(v)] for k, v in diagnostics.items()]))
    path = write_result("card_path", {"machine": info, "data": data, "train": meta, "report": {
        k: report.get(k) for k in ("val_accuracy", "val_accepted_right", "chance", "split", "threshold",
                                   "train_seconds", "best_epoch")}, "recipes": rows, "convert_cli": final,
        "diagnostics": diagnostics})
    print(f"\nwrote {path}")
    return 0


def probe_agreement(ev: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Face by face on the probes both device evals found a face in: top-1 and decisions against `reference`."""
    ref = {p["path"]: p for p in reference["probes"] if p["faces"]}
    pairs = [(p, ref[p["path"]]) for p in ev["probes"] if p["faces"] and p["path"] in ref]
    named = [(p, r) for p, r in pairs if "unknown" not in (p["predicted"], r["predicted"])
             or p["predicted"] != r["predicted"]]
    agree = sum(p["predicted"] == r["predicted"] for p, r in named)
    return {"faces": len(pairs),
            "top1": float(np.mean([p["best"] == r["best"] for p, r in pairs])) if pairs else None,
            "decisions": float(np.mean([p["predicted"] == r["predicted"] for p, r in pairs])) if pairs else None,
            "named_by_either": len(named), "agree_where_named": agree,
            "decisions_where_named": agree / len(named) if named else None}


class _Check:
    """The run, its float model and the float outputs on the check faces, loaded once for every recipe."""

    _cache: ClassVar[dict[Path, _Check]] = {}

    def __init__(self, run_dir: Path) -> None:
        from faceberry.convert.build import _check_set, _load_keras, load_run

        self.run = load_run(run_dir)
        self.model = _load_keras(run_dir / "model.keras")
        self.train_x, self.check_x, self.truth, self.is_val = _check_set(self.run, run_dir)
        self.float_out = np.asarray(self.model.predict(self.check_x, batch_size=64, verbose=0), np.float32)

    def unseen(self, work: Path) -> np.ndarray:
        """The run's input crops of the probe photos (WORK/eval: the known people's other photos and the
        strangers'), made by the training crop pipeline, normalised; cached in WORK/unseen-crops.npz. The
        validation faces are 44: a recipe's agreement is also measured here, on faces no choice was made on."""
        if not hasattr(self, "unseen_x"):
            from faceberry.preprocess import normalize
            from train.crops import build_crop_set

            cache = work / "unseen-crops.npz"
            if not cache.is_file():
                crops = build_crop_set(work / "eval", int(self.model.input.shape[1]), progress=False).crops
                np.savez(cache, crops=crops)
            self.unseen_x = normalize(np.load(cache)["crops"], self.run.prep)
            self.unseen_float_top = (self.model.predict(self.unseen_x, batch_size=64, verbose=0).argmax(1)
                                     if len(self.unseen_x) else np.zeros(0, int))
        return self.unseen_x

    @classmethod
    def of(cls, run_dir: Path) -> _Check:
        if run_dir not in cls._cache:
            cls._cache[run_dir] = cls(run_dir)
        return cls._cache[run_dir]


def _logits_model(model):
    """The run's model with the softmax taken off its dense layer (same weights): it outputs logits."""
    import keras

    dense = model.get_layer("probabilities")
    logits = keras.layers.Dense(dense.units, name="logits")(model.get_layer("dropout").output)
    out = keras.Model(model.inputs, logits)
    out.get_layer("logits").set_weights(dense.get_weights())
    return out


def distill_on_grid(student, teacher, faces: np.ndarray, augment, steps: int = 48, batch: int = 32,
                    lr: float = 1e-5, temperature: float = 2.0, mixup: bool = False, seed: int = 0) -> dict[str, Any]:
    """Quantisation-aware fine-tuning by distillation (measured here, not shipped), in place, after bias_correct:
    every conv, depthwise and dense kernel runs forward on the per-channel int8 grid the converter will use and
    its update goes to a float shadow copy (straight-through estimator); the batch norms stay in inference mode,
    so each conv's fold factor is fixed and snapping the unfolded kernel per channel is snapping the folded one.
    Trained: the kernels, the batch norms' beta and the dense bias, to match the float `teacher`'s softmax
    (temperature `temperature`) on augmented, mirrored training faces (and mixtures of two with `mixup`) — no
    labels, the float model's answers are the target. Ends with the kernels on the grid."""
    import keras
    import tensorflow as tf

    from faceberry.convert.quantize import snap_kernel

    started = time.monotonic()
    backbone = next(layer for layer in student.layers if isinstance(layer, keras.Model))
    convs = [layer for layer in backbone.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    dense = [layer for layer in student.layers if isinstance(layer, keras.layers.Dense)]
    gridded = convs + dense

    def snap(layer, w: np.ndarray) -> np.ndarray:
        return snap_kernel(w, isinstance(layer, keras.layers.DepthwiseConv2D))

    kernels = [layer.kernel for layer in gridded]
    shadow = [k.numpy().copy() for k in kernels]
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    trained = [*kernels, *(layer.beta for layer in norms), *(layer.bias for layer in dense if layer.use_bias)]
    optimizer = keras.optimizers.Adam(lr)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        x = np.asarray(augment(faces[rng.choice(len(faces), min(batch, len(faces)), replace=False)]))
        x = np.where((rng.random(len(x)) < 0.5)[:, None, None, None], x[:, :, ::-1], x).astype(np.float32)
        if mixup:
            share = rng.uniform(0, 1, (len(x), 1, 1, 1)).astype(np.float32)
            x = share * x + (1 - share) * x[rng.permutation(len(x))]
        target = tf.nn.log_softmax(tf.math.log(teacher(x, training=False) + 1e-8) / temperature)
        for k, w, layer in zip(kernels, shadow, gridded, strict=True):
            k.assign(snap(layer, w))
        with tf.GradientTape() as tape:
            out = tf.nn.log_softmax(tf.math.log(student(x, training=False) + 1e-8) / temperature)
            loss = tf.reduce_mean(tf.reduce_sum(tf.exp(target) * (target - out), axis=1)) * temperature ** 2
        on_grid = [k.numpy() for k in kernels]
        optimizer.apply(tape.gradient(loss, trained), trained)
        shadow = [w + (k.numpy() - g) for w, k, g in zip(shadow, kernels, on_grid, strict=True)]
        losses.append(float(loss))
    for k, w, layer in zip(kernels, shadow, gridded, strict=True):
        k.assign(snap(layer, w))
    return {"steps": steps, "faces": steps * min(batch, len(faces)), "lr": lr, "temperature": temperature,
            "mixup": mixup, "loss_first": round(float(np.mean(losses[:5])), 5),
            "loss_last": round(float(np.mean(losses[-5:])), 5), "seconds": round(time.monotonic() - started, 1)}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def measure_recipe(work: Path, run_dir: Path, name: str, quantization: str, options: dict[str, Any]) -> dict[str, Any]:
    """Convert the run with one recipe (the code convert_run runs: _quantize, the head's verify with the
    threshold re-fitted on the converted outputs, the guard _check_drop) and measure it against the float
    model on the check faces. The .tflite is kept under WORK/tflite and reused when the run has not changed."""
    import copy
    import hashlib

    from faceberry.contract import UNKNOWN
    from faceberry.convert.build import ConvertError, _check_drop, _quantize
    from faceberry.convert.quantize import convert_model, weight_scales
    from faceberry.convert.verify import run_tflite, wilson_interval
    from faceberry.heads import Verification, softmax_decisions
    from faceberry.train.calibrate import calibrate

    c = _Check.of(run_dir)
    run = c.run
    key = hashlib.sha256(json.dumps([name, quantization, {k: str(v) for k, v in options.items()},
                                     (run_dir / "model.keras").stat().st_mtime]).encode()).hexdigest()[:12]
    path = work / "tflite" / f"{key}.tflite"
    recipe_path = path.with_suffix(".json")
    t0 = time.perf_counter()
    if path.is_file() and recipe_path.is_file():
        recipe = json.loads(recipe_path.read_text())
    elif options.get("per_channel") is False or options.get("logits") or options.get("distill"):
        # The bench-only variants: the converter called here, on the plain calibration faces.
        from faceberry.convert.build import _augmentation, _load_keras
        from faceberry.convert.quantize import bias_correct, representative_samples

        representative = representative_samples(c.train_x, 200)
        recipe = {"calibration": {"source": "plain", "samples": len(representative),
                                  "training_crops": len(c.train_x)}, "float_ops": []}
        model = _logits_model(c.model) if options.get("logits") else c.model
        if options.get("distill"):
            model = _load_keras(run_dir / "model.keras")  # a copy: c.model stays the float reference
            recipe["bias_correction"] = bias_correct(model, representative)
            recipe["distillation"] = distill_on_grid(model, c.model, c.train_x, _augmentation(run),
                                                     **options["distill"])
        flat = convert_model(model, quantization, representative, per_channel=options.get("per_channel", True))
        recipe["weight_scales"] = weight_scales(flat)
    else:
        convert_options = {k: options.get(k) for k in ("calibration", "calibration_samples", "float_ops")}
        convert_options["bias_correction"] = bool(options.get("bias_correction"))
        flat, recipe = _quantize(c.model, run, run_dir, c.train_x, quantization, **convert_options)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(flat)
        recipe_path.write_text(json.dumps(recipe))
    convert_seconds = time.perf_counter() - t0
    q_out = run_tflite(path, c.check_x)
    if options.get("logits"):
        q_out = _softmax(q_out)  # the probabilities the float softmax would give from the int8 logits
    verified = run.head.verify(Verification(
        float_out=c.float_out, converted_out=q_out, truth=c.truth, is_val=c.is_val, labels=run.labels,
        threshold=float(run.report.threshold.accept), target_far=float(run.report.threshold.target_far),
        reference=run.reference, refit=calibrate))
    agreement = verified.agreement
    agreement.update(quantization=quantization, **recipe)
    row: dict[str, Any] = {"recipe": name, "quantization": quantization,
                           "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
                           "tflite": str(path), "classifier_bytes": path.stat().st_size,
                           "convert_seconds": round(convert_seconds, 1)}
    guarded = copy.deepcopy(agreement)
    try:
        _check_drop(guarded, quantization, 2.0, 95.0)
        row["written"] = True
    except ConvertError as exc:
        row["written"], row["refusal"] = False, str(exc)
    row["agreement"] = guarded

    # The device acts on decisions (a name, or unknown below the threshold), never on the top-1 of a face it
    # rejects: where do the two models' decisions differ, and on which faces does top-1 move?
    labels = run.labels
    f_dec = np.array(softmax_decisions(c.float_out, labels, float(run.report.threshold.accept)))
    q_dec = np.array(softmax_decisions(q_out, labels, float(verified.threshold)))
    named = (f_dec != UNKNOWN) | (q_dec != UNKNOWN)
    f_top, q_top = c.float_out.argmax(1), q_out.argmax(1)
    val = c.is_val
    f_accepts = val & (f_dec != UNKNOWN)
    srt = np.sort(c.float_out, axis=1)
    margin = srt[:, -1] - srt[:, -2]
    q_srt = np.sort(q_out, axis=1)
    n_named, agree_named = int(named.sum()), int((f_dec == q_dec)[named].sum())
    row["decisions"] = {
        "threshold_float": float(run.report.threshold.accept), "threshold_converted": float(verified.threshold),
        "faces": len(f_dec), "named_by_either": n_named, "agree_where_named": agree_named,
        "agreement_where_named": agree_named / n_named if n_named else None,
        "agreement_where_named_95ci": list(wilson_interval(agree_named, n_named)),
        "float_named": int((f_dec != UNKNOWN).sum()), "converted_named": int((q_dec != UNKNOWN).sum()),
        "float_accepts_val": int(f_accepts.sum()),
        "top1_where_float_accepts": float(np.mean(f_top[f_accepts] == q_top[f_accepts])) if f_accepts.any() else None,
        "float_accept_accuracy": float(np.mean(f_dec[val] == np.array(c.truth)[val])),
        "converted_accept_accuracy": float(np.mean(q_dec[val] == np.array(c.truth)[val])),
        "top1_ties_in_converted_output": int(np.sum(q_srt[:, -1] == q_srt[:, -2])),
        "float_margin_median_where_top1_moved": (float(np.median(margin[val & (f_top != q_top)]))
                                                 if (val & (f_top != q_top)).any() else None),
        "float_margin_median_where_top1_kept": (float(np.median(margin[val & (f_top == q_top)]))
                                                if (val & (f_top == q_top)).any() else None),
    }
    unseen = c.unseen(work)
    if len(unseen):
        same = run_tflite(path, unseen).argmax(1) == c.unseen_float_top
        row["unseen"] = {"faces": len(unseen), "top1_same": int(same.sum()), "top1_agreement": float(same.mean()),
                         "top1_95ci": list(wilson_interval(int(same.sum()), len(unseen)))}
    d = row["decisions"]
    print(f"{name}: {'written' if row['written'] else 'refused'}; top-1 = float {pct(guarded.get('top1_agreement'))}"
          f"{'' if 'unseen' not in row else ' (unseen faces: ' + pct(row['unseen']['top1_agreement']) + ')'}, "
          f"decisions where either names {agree_named}/{n_named}, top-1 where float accepts "
          f"{pct(d['top1_where_float_accepts'])} of {d['float_accepts_val']}", file=sys.stderr, flush=True)
    return row


TIMING = """
import json, sys, time
import numpy as np
from faceberry.runtime import TFLiteModel
paths, x, threads, rounds = json.loads(sys.argv[1]), np.load(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
models = {(p, t): TFLiteModel(p, num_threads=t) for p in paths for t in threads}
times = {f"{p}|{t}": [] for p in paths for t in threads}
for m in models.values():
    for xi in x[:3]:
        m.run(xi[None])
for _ in range(rounds):  # interleaved, so load on the shared machine falls on every model alike
    for (p, t), m in models.items():
        for xi in x:
            t0 = time.perf_counter()
            m.run(xi[None])  # the device's call: quantise the input, invoke, dequantise the output
            times[f"{p}|{t}"].append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"backend": next(iter(models.values())).backend, "times": times}))
"""


def litert_speed(work: Path, rows: list[dict[str, Any]], threads: tuple[int, ...] = (1, 2), faces: int = 20,
                 rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Bare invoke time of every recipe's .tflite in the Pi's environment (.venv-device: ai-edge-litert), 1 and
    2 threads, on validation faces; every model loaded once and timed in interleaved rounds."""
    from bench.common import ROOT, stats

    python = ROOT / ".venv-device" / "bin" / "python"
    if not python.is_file():
        print(f"{python} is absent: no LiteRT timing", file=sys.stderr)
        return {}
    c = _Check.of(work / "run")
    x_path = work / "timing-inputs.npy"
    np.save(x_path, c.check_x[c.is_val][:faces])
    paths = sorted({r["tflite"] for r in rows})
    proc = subprocess.run([str(python), "-c", TIMING, json.dumps(paths), str(x_path), json.dumps(list(threads)),
                           str(rounds)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"LiteRT timing failed: {proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict[str, dict[str, Any]] = {}
    for key, values in result["times"].items():
        p, t = key.rsplit("|", 1)
        out.setdefault(p, {"backend": result["backend"]})[t] = stats(values)
    return out


def diagnose(run_dir: Path) -> dict[str, float]:
    """Which part of int8 moves the answers: the float model with int8-rounded weights (in Keras), and the
    network from block 6 on kept in float."""
    import tempfile

    import keras
    import tensorflow as tf
    from tensorflow.lite.python import convert as tflite_convert

    from faceberry.convert.build import _load_keras, load_run
    from faceberry.convert.quantize import representative_samples, snap_kernel
    from faceberry.convert.verify import run_tflite
    from faceberry.preprocess import normalize

    run = load_run(run_dir)
    model = _load_keras(run_dir / "model.keras")
    x_train = normalize(run.crops[run.split == "train"], run.prep)
    x_val = normalize(run.crops[run.split == "val"], run.prep)
    top = model.predict(x_val, verbose=0).argmax(1)
    rep = representative_samples(x_train, 200)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="card-diag-") as tmp:
        saved = Path(tmp) / "saved"
        model.export(str(saved), format="tf_saved_model", verbose=False)

        def agree(flatbuffer: bytes) -> float:
            path = Path(tmp) / "m.tflite"
            path.write_bytes(flatbuffer)
            return float(np.mean(run_tflite(path, x_val).argmax(1) == top))

        # (Dynamic range and 16x8 are recipes in RECIPES, measured like the others.)
        c = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = lambda: ([x[None]] for x in rep)
        c._experimental_calibrate_only = True
        calibrated = c.convert()
        interpreter = tf.lite.Interpreter(model_content=calibrated)
        names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
        late = [f"block_{b}_" for b in range(6, 17)] + ["Conv_1", "out_relu"]
        nodes = [names[i] for op in interpreter._get_ops_details() for i in op["outputs"]
                 if any(k in names[i] for k in late)]
        out["int8 up to block 5, float from block 6 on"] = agree(tflite_convert.mlir_quantize(
            calibrated, fully_quantize=True, input_data_type=tf.int8, output_data_type=tf.float32,
            denylisted_nodes=nodes, denylisted_ops=list(HEAD_OPS)))

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            weights = layer.get_weights()
            depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
            layer.set_weights([snap_kernel(weights[0], depthwise), *weights[1:]])
    out["float model with int8-rounded weights (Keras, per channel)"] = float(
        np.mean(model.predict(x_val, verbose=0).argmax(1) == top))
    return out


def recipe_table(rows: list[dict[str, Any]]) -> str:
    def ms(row: dict[str, Any], threads: str) -> str:
        stat = (row.get("invoke_ms") or {}).get(threads)
        return f"{stat['median']:.1f}" if stat else "—"

    def named(row: dict[str, Any]) -> str:
        d = row["decisions"]
        lo, hi = d["agreement_where_named_95ci"]
        return (f"{d['agree_where_named']}/{d['named_by_either']} = {pct(d['agreement_where_named'])} "
                f"({100 * lo:.0f}–{100 * hi:.0f}%)")

    return table(
        ["recipe", "calibration; float ops; per-channel weights", "guard today", "top-1 = float (95% CI)",
         "decisions = float, all faces", "decisions = float where either names (95% CI)",
         "top-1 = float where float accepts", "accuracy float / converted", "accepted right float / converted",
         "lost / gained (McNemar p)", "top-1 = float on the unseen probes", "size", "LiteRT ms 1 / 2 thr"],
        [[r["recipe"], _recipe(r["agreement"]), "written" if r["written"] else "refused",
          _agree(r["agreement"]), pct(r["agreement"].get("decision_agreement")), named(r),
          f"{pct(r['decisions']['top1_where_float_accepts'])} of {r['decisions']['float_accepts_val']}",
          f"{pct(r['agreement'].get('float_accuracy'))} / {pct(r['agreement'].get('converted_accuracy'))}",
          f"{pct(r['decisions']['float_accept_accuracy'])} / {pct(r['decisions']['converted_accept_accuracy'])}",
          f"{_discordant(r['agreement'])} ({_p(r['agreement'])})", _unseen(r), f"{r['classifier_bytes'] / 1e6:.2f} MB",
          f"{ms(r, '1')} / {ms(r, '2')}"] for r in rows])


def _unseen(row: dict[str, Any]) -> str:
    u = row.get("unseen")
    if not u:
        return "—"
    lo, hi = u["top1_95ci"]
    return f"{u['top1_same']}/{u['faces']} = {pct(u['top1_agreement'])} ({100 * lo:.0f}–{100 * hi:.0f}%)"


def _recipe(agreement: dict[str, Any]) -> str:
    cal = agreement.get("calibration")
    if not isinstance(cal, dict) or "source" not in cal:
        return "—"
    scales = agreement.get("weight_scales") or {}
    return (f"{cal['samples']} {cal['source']}; float: {'/'.join(agreement.get('float_ops') or []) or 'none'}; "
            f"per-channel weights {scales.get('per_channel', 0)}/{sum(scales.values())}")


def _agree(agreement: dict[str, Any]) -> str:
    ci = agreement.get("top1_agreement_95ci")
    ci_text = f" ({100 * ci[0]:.0f}–{100 * ci[1]:.0f}%)" if ci else ""
    return pct(agreement.get("top1_agreement")) + ci_text


def _discordant(agreement: dict[str, Any]) -> str:
    test = agreement.get("paired_test") or {}
    return "—" if not test else f"{test['float_only_right']} / {test['converted_only_right']}"


def _p(agreement: dict[str, Any]) -> str:
    test = agreement.get("paired_test") or {}
    return "—" if test.get("p_value") is None else f"{test['p_value']:.3g}"


if __name__ == "__main__":
    sys.exit(main())
