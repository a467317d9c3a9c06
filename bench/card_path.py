"""The card's own path, end to end: ImageNet MobileNetV2 fine-tuned without the face backbone → a bundle.

    nice -n 10 python -m bench.card_path            # 22 people × 10 photos; trains once, then reuses the run
    nice -n 10 python -m bench.card_path --retrain  # train again

People: 22 of the protocol's known lfw-dev people (bench/protocol.py, ≥ 20 photos each, seed 0), 10
training photos each; their other photos (up to --probes each) and 2 photos of each held-out stranger are
the probes for `python -m device eval`. Training is the README's `python -m train --photos DIR` (the project
defaults: 128 px, augmentation, head then top blocks), with the shared ImageNet weights file.

On that one run, every quantisation recipe is built by faceberry.convert.build.convert_run (the code `python -m
convert` runs) and measured on the run's validation faces against the float Keras model: top-1 and decision
agreement, accuracy, the guard's paired test (faceberry.convert.verify.paired_drop) and whether convert would write
it. Then `python -m convert --run RUN --out BUNDLE` (defaults) and `python -m device eval` on the probes.

Writes bench/results/card_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy import PY, device_eval, sh
from bench.common import RESULTS, SHARED_WEIGHTS, describe, machine, pct, table, write_result
from bench.protocol import LFW_DEV, make_split
from faceberry.convert.quantize import HEAD_OPS

# Recipes measured on the same run: (name, quantization, convert_run options).
RECIPES: list[tuple[str, str, dict[str, Any]]] = [
    ("float16", "float16", {}),
    ("int8: 200 plain crops, all int8 (convert's default)", "int8", {}),
    ("int8: 1000 augmented crops, all int8", "int8", {"calibration": "augmented", "calibration_samples": 1000}),
    ("int8: 200 plain crops, head in float", "int8", {"float_ops": HEAD_OPS}),
    ("int8: 1000 augmented crops, head in float", "int8", {"calibration": "augmented", "calibration_samples": 1000,
                                                           "float_ops": HEAD_OPS}),
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
    return measure(work, data, meta, info)


def measure(work: Path, data: dict[str, Any], meta: dict[str, Any], info: dict[str, Any]) -> int:
    from faceberry.convert.build import ConvertError, convert_run

    run = work / "run"
    report = json.loads((run / "report.json").read_text())
    rows: list[dict[str, Any]] = []
    for name, quantization, options in RECIPES:
        out = work / f"bundle-{len(rows)}"
        t0 = time.perf_counter()
        row: dict[str, Any] = {"recipe": name, "quantization": quantization, "options": options}
        try:
            manifest = convert_run(run, out, quantization=quantization, force=True, **options)
            row["written"] = True
            agreement = manifest["metrics"]["agreement"]
            row["classifier_bytes"] = (out / manifest["classifier"]["file"]).stat().st_size
        except ConvertError as exc:
            row["written"], row["refusal"] = False, str(exc)
            agreement = getattr(exc, "agreement", {}) or {}
        row["convert_seconds"] = round(time.perf_counter() - t0, 1)
        row["agreement"] = agreement
        rows.append(row)
        print(f"{name}: {'written' if row['written'] else 'refused'} "
              f"top-1 agreement {pct(agreement.get('top1_agreement'))}", file=sys.stderr, flush=True)

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
        # The int8 bundle convert refused, built with the guard off: what the device would do with it on
        # photos the run never saw, beside the bundle convert wrote.
        forced = work / "bundle-int8-unguarded"
        convert_run(run, forced, quantization="int8", max_drop=100.0, min_agreement=0.0, force=True)
        ev8 = device_eval(forced, Path(data["eval_dir"]), work / "eval-int8.json")
        best = {p["path"]: p["best"] for p in ev["probes"] if p["faces"]}
        found = [p for p in ev8["probes"] if p["path"] in best and p["faces"]]
        final["unguarded_int8"] = {
            "known_accuracy": ev8["known_accuracy"], "stranger_false_accept_rate": ev8["stranger_false_accept_rate"],
            "closed_set_accuracy": ev8["closed_set_accuracy"], "probe_faces": len(found),
            "top1_agreement_on_probes": (float(np.mean([p["best"] == best[p["path"]] for p in found]))
                                         if found else None),
        }
    diagnostics = diagnose(run)
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]

    print(f"\nthe card's path, {len(data['people'])} people × {data['train_photos'] // len(data['people'])} photos "
          f"— {describe(info)}; float validation accuracy {pct(report.get('val_accuracy'))} "
          f"on {report['split']['val']} faces")
    print(table(
        ["recipe", "int8 recipe", "written", "top-1 = float (95% CI)", "decisions = float",
         "accuracy float / converted", "faces float-only right / converted-only right", "p (McNemar)", "size"],
        [[r["recipe"], _recipe(r["agreement"]), "yes" if r["written"] else "refused",
          _agree(r["agreement"]), pct(r["agreement"].get("decision_agreement")),
          f"{pct(r['agreement'].get('float_accuracy'))} / {pct(r['agreement'].get('converted_accuracy'))}",
          _discordant(r["agreement"]), _p(r["agreement"]),
          f"{r['classifier_bytes'] / 1e6:.2f} MB" if r.get("classifier_bytes") else "—"] for r in rows]))
    if refused is None:
        print(f"\n`python -m convert` (defaults) → {final['quantization']} bundle {final['bundle_id']}; device eval on "
              f"{data['probe_photos']} probes of the known people and {data['stranger_photos']} of "
              f"{data['stranger_people']} strangers: known {pct(final['known_accuracy'])}, strangers accepted "
              f"{pct(final['stranger_false_accept_rate'])}, closed-set {pct(final['closed_set_accuracy'])}")
        u = final["unguarded_int8"]
        print(f"the refused int8 (guard off), same probes: known {pct(u['known_accuracy'])}, strangers accepted "
              f"{pct(u['stranger_false_accept_rate'])}, closed-set {pct(u['closed_set_accuracy'])}; its top-1 "
              f"agrees with the written bundle's on {pct(u['top1_agreement_on_probes'])} of {u['probe_faces']} faces")
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


def diagnose(run_dir: Path) -> dict[str, float]:
    """Which part of int8 moves the answers: weights alone (in Keras, and TFLite's dynamic range), 16-bit
    activations with int8 weights, and the network from block 6 on kept in float."""
    import tempfile

    import keras
    import tensorflow as tf
    from tensorflow.lite.python import convert as tflite_convert

    from faceberry.convert.build import _load_keras, load_run
    from faceberry.convert.quantize import representative_samples
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

        def converter(calibrated: bool):
            c = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            if calibrated:
                c.representative_dataset = lambda: ([x[None]] for x in rep)
            return c

        out["int8 weights only (TFLite dynamic range, activations float)"] = agree(converter(False).convert())
        c = converter(True)
        c.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        out["int8 weights, int16 activations (16x8)"] = agree(c.convert())
        c = converter(True)
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

    def snap(w: np.ndarray, axis: int) -> np.ndarray:  # symmetric int8 per channel, as TFLite quantises
        moved = np.moveaxis(w, axis, -1)
        scale = np.abs(moved).reshape(-1, moved.shape[-1]).max(0) / 127
        scale = np.where(scale > 0, scale, 1)
        return np.moveaxis(np.round(moved / scale) * scale, -1, axis).astype(w.dtype)

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            weights = layer.get_weights()
            axis = 2 if isinstance(layer, keras.layers.DepthwiseConv2D) else weights[0].ndim - 1
            layer.set_weights([snap(weights[0], axis), *weights[1:]])
    out["float model with int8-rounded weights (Keras, per channel)"] = float(
        np.mean(model.predict(x_val, verbose=0).argmax(1) == top))
    return out


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
