"""Re-derive faceberry.preprocess.DLIB_TEMPLATE ("dlib-chip-v1"), and check which alignment suits dlib's ResNet.

    nice python -m bench.align_template                          # derive the template, compare with the constant
    nice python -m bench.align_template --check BACKBONE_DIR     # ... and the protocol accuracy per alignment

Derivation: for every 3rd lfw-dev photo (sorted paths; 250×250 only) where BlazeFace
(faceberry.detector.FaceDetector, models/face_detection_short_range.tflite) finds exactly one face and dlib's
HOG detector finds exactly one, dlib's 5-point shape (face_recognition_models' pose predictor) gives the
face chip dlib's embedder was trained on: dlib.get_face_chip(image, shape, 150, padding 0.25). Running
get_face_chip on a "coordinate image" (R = x, G = y, B = 0) gives, per chip pixel, the image pixel it was
sampled from; a least-squares affine fit over the chip pixels whose source lies inside the image
(2 < x < W-3, 2 < y < H-3) is inverted to carry BlazeFace's 6 keypoints into chip coordinates, divided by
150. The template is the mean over faces of keypoints 0..3 (eyes, nose tip, mouth centre).

--check BACKBONE_DIR (a `python -m train backbone --arch dlib-resnet` directory) then embeds the few-shot
protocol's photos (bench/protocol.py) with the float Keras port on chips aligned in four ways and scores
each with bench.backbone_eval.score (per-person centroids, threshold calibrated on the training
negatives at --target-far, strangers held out):
  - T4: similarity fit of BlazeFace keypoints 0..3 to DLIB_TEMPLATE (what the device does);
  - T3: eyes + mouth only (keypoints 0, 1, 3);
  - T6: all 6 BlazeFace keypoints to the derived 6-point mean (ears included);
  - dlib: dlib's own chip (5-point shape predicted in BlazeFace's box, get_face_chip 150, 0.25).
The face is the one the real tools pick: for probes and strangers device eval's (the largest ≥ 40 px), for
training photos and negatives `python -m train`'s (skipped when several faces are about the same size).
Every variant sees the same faces; a photo left out is left out of all four (the JSON counts them).

Writes bench/results/align-template.json. Needs dlib and face_recognition_models (requirements-train.txt).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, table, write_result
from bench.protocol import LFW_DEV, make_split

CHIP = 150
PADDING = 0.25
POINTS = ("right eye", "left eye", "nose tip", "mouth centre", "right ear", "left ear")


def chip_to_image_affine(shape, dlib, size: tuple[int, int]) -> np.ndarray:
    """2×3 affine taking chip pixel (X, Y) to the image pixel get_face_chip sampled it from."""
    h, w = size
    coord = np.zeros((h, w, 3), np.uint8)
    coord[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    coord[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    chip = np.asarray(dlib.get_face_chip(coord, shape, CHIP, PADDING)).astype(np.float64)
    src_x, src_y = chip[..., 0], chip[..., 1]
    yy, xx = np.mgrid[0:CHIP, 0:CHIP]
    ok = (src_x > 2) & (src_x < w - 3) & (src_y > 2) & (src_y < h - 3)
    a = np.stack([xx[ok], yy[ok], np.ones(ok.sum())], axis=1)
    sol, *_ = np.linalg.lstsq(a, np.stack([src_x[ok], src_y[ok]], axis=1), rcond=None)
    return sol.T  # 2×3


def image_to_chip(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    full = np.vstack([affine, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    pts = np.asarray(points, dtype=np.float64)
    return pts @ inv[:, :2].T + inv[:, 2]


def derive(detector, dlib, predictor, step: int, upsample: int) -> dict[str, Any]:
    from faceberry.contract import list_images
    from faceberry.preprocess import load_image

    hog = dlib.get_frontal_face_detector()
    paths = list_images(LFW_DEV, recursive=True)[::step]
    kept, counts = [], {"photos": len(paths), "not_250": 0, "blazeface_not_one": 0, "hog_not_one": 0}
    for path in paths:
        img = load_image(path)
        if img.shape[:2] != (250, 250):
            counts["not_250"] += 1
            continue
        faces = detector.detect(img)
        if len(faces) != 1:
            counts["blazeface_not_one"] += 1
            continue
        rects = hog(img, upsample)
        if len(rects) != 1:
            counts["hog_not_one"] += 1
            continue
        shape = predictor(img, rects[0])
        affine = chip_to_image_affine(shape, dlib, img.shape[:2])
        kept.append(image_to_chip(faces[0].keypoints, affine) / CHIP)
    pts = np.stack(kept)  # faces × 6 × 2
    counts["faces"] = len(kept)
    return {"counts": counts, "mean": pts.mean(0), "median": np.median(pts, 0), "std": pts.std(0)}


def pick_face(detector, img: np.ndarray, probe: bool):
    """The face the real tools would use, or None: for a probe, device eval's rule (the largest face of at
    least 40 px); for a training or negative photo, `python -m train`'s (faceberry.train.crops.CropMaker: the widest
    face of at least 40 px, skipped unless clearly the largest)."""
    from faceberry.train.crops import DOMINANCE

    big = [f for f in detector.detect(img) if f.width >= 40]
    if not big:
        return None
    if probe:
        return max(big, key=lambda f: f.width * f.height)
    big.sort(key=lambda f: -f.width)
    if len(big) > 1 and big[0].width < DOMINANCE * big[1].width:
        return None
    return big[0]


def check(backbone: Path, detector, dlib, predictor, template6: np.ndarray, target_far: float,
          seed: int) -> dict[str, Any]:
    import cv2

    from bench.backbone_eval import score
    from faceberry.preprocess import DLIB_TEMPLATE, load_image, normalize, similarity_transform
    from faceberry.train.backbone import load_embedder

    model, cfg = load_embedder(backbone)
    from faceberry.preprocess import Preprocessing

    prep = Preprocessing.from_dict(cfg["preprocessing"])
    size = int(cfg["input_size"])
    variants = {
        "T4: DLIB_TEMPLATE, keypoints 0-3 (device)": ((0, 1, 2, 3), DLIB_TEMPLATE),
        "T3: eyes + mouth (keypoints 0, 1, 3)": ((0, 1, 3), DLIB_TEMPLATE[[0, 1, 3]]),
        "T6: all 6 keypoints (derived 6-point mean)": ((0, 1, 2, 3, 4, 5), template6),
    }
    dlib_name = "dlib's own chip (5-point shape in BlazeFace's box)"
    split = make_split(LFW_DEV, seed=seed)
    crops: dict[str, list[np.ndarray]] = {name: [] for name in [*variants, dlib_name]}
    roles, persons, missing = [], [], {"train": 0, "test": 0, "negatives": 0, "strangers": 0}
    for role in ("train", "test", "negatives", "strangers"):
        for person, rels in getattr(split, role).items():
            for rel in rels:
                img = load_image(LFW_DEV / rel)
                face = pick_face(detector, img, probe=role in ("test", "strangers"))
                if face is None:
                    missing[role] += 1
                    continue
                kp = face.keypoints.astype(np.float64)
                for name, (idx, tmpl) in variants.items():
                    m = similarity_transform(kp[list(idx)], np.asarray(tmpl) * size)
                    crops[name].append(cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR,
                                                      borderMode=cv2.BORDER_REPLICATE))
                x0, y0, x1, y1 = (round(float(v)) for v in face.box)
                shape = predictor(img, dlib.rectangle(x0, y0, x1, y1))
                crops[dlib_name].append(np.asarray(dlib.get_face_chip(img, shape, CHIP, PADDING)))
                roles.append(role)
                persons.append(person)
    roles_a = np.array(roles)
    out: dict[str, Any] = {"faces": len(roles), "photos_left_out": missing, "systems": {}}
    for name, cs in crops.items():
        emb = model.predict(normalize(np.stack(cs), prep), batch_size=64, verbose=0)

        def pick(role, emb=emb):
            m = roles_a == role
            return emb[m], [p for p, k in zip(persons, m, strict=True) if k]

        tr_x, tr_y = pick("train")
        te_x, te_y = pick("test")
        out["systems"][name] = score(tr_x, tr_y, te_x, te_y, pick("negatives")[0], pick("strangers")[0], target_far)
    out["protocol"] = {**split.summary(), "fingerprint": split.fingerprint(), "target_far": target_far}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", type=int, default=3, help="use every STEP-th lfw-dev photo (default 3)")
    ap.add_argument("--upsample", type=int, default=1, help="dlib HOG upsampling (default 1, as face_recognition)")
    ap.add_argument("--check", type=Path, metavar="BACKBONE_DIR",
                    help="also score the float dlib-resnet port on the protocol with each alignment")
    ap.add_argument("--target-far", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not LFW_DEV.is_dir():
        print(f"error: {LFW_DEV} is absent ; put the shared data beside the repo as ../shared", file=sys.stderr)
        return 2
    try:
        import dlib
        import face_recognition_models
    except ImportError as exc:
        print(f"error: {exc} ; pip install -r requirements-train.txt", file=sys.stderr)
        return 2
    from faceberry.detector import FaceDetector
    from faceberry.models import default_detector_path
    from faceberry.preprocess import DLIB_TEMPLATE

    t0 = time.monotonic()
    info = machine()
    detector = FaceDetector(default_detector_path())
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    d = derive(detector, dlib, predictor, args.step, args.upsample)
    mean4 = d["mean"][:4]
    diff = float(np.abs(np.round(mean4, 4) - DLIB_TEMPLATE).max())
    print(f"{d['counts']['faces']} faces from {d['counts']['photos']} photos ({d['counts']})")
    print(table(["point", "mean x", "mean y", "median x", "median y", "std x", "std y"],
                [[POINTS[i], *(f"{v:.4f}" for v in (*d["mean"][i], *d["median"][i], *d["std"][i]))]
                 for i in range(6)]))
    print(f"template (mean of points 0..3): {np.round(mean4, 4).tolist()}")
    print(f"max |derived - faceberry.preprocess.DLIB_TEMPLATE| = {diff:.4f}")
    result: dict[str, Any] = {
        "counts": d["counts"], "step": args.step, "hog_upsample": args.upsample,
        "points": list(POINTS),
        "mean": np.round(d["mean"], 4).tolist(), "median": np.round(d["median"], 4).tolist(),
        "std": np.round(d["std"], 4).tolist(),
        "template": np.round(mean4, 4).tolist(), "device_template": DLIB_TEMPLATE.tolist(),
        "max_abs_diff_vs_device_template": round(diff, 4),
    }
    if args.check:
        c = check(args.check, detector, dlib, predictor, d["mean"], args.target_far, args.seed)
        result["check"] = {"backbone": str(args.check), **c}
        print(f"\nfloat dlib-resnet port, {c['faces']} faces (photos left out: {c['photos_left_out']}), "
              f"threshold calibrated on the negatives for {100 * args.target_far:g}% FAR:")
        print(table(["alignment", "known accuracy", "stranger FAR", "closed-set"],
                    [[n, f"{100 * s['known_accuracy']:.2f}%", f"{100 * s['stranger_far']:.2f}%",
                      f"{100 * s['closed_set_accuracy']:.2f}%"] for n, s in c["systems"].items()]))
    result["machine"] = info
    result["seconds"] = round(time.monotonic() - t0, 1)
    path = write_result("align-template", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
