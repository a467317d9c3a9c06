"""A distilled backbone on the few-shot protocol, in float, next to its teacher on the same crops.

    nice python -m bench.backbone_eval --backbone BACKBONE_DIR [--name NAME]

Protocol (bench/protocol.py): lfw-dev people with ≥ 20 photos, 10 photos each → per-person centroid,
the rest as probes; training negatives calibrate a cosine threshold at --target-far, held-out
strangers measure the false-accept rate. Everything here is float (Keras) on the device's aligned
crops; the int8 bundle through `device eval` is bench/accuracy.py --backbone. Reported:
  - student–teacher cosine on the protocol's faces, split by whether the backbone trained on that
    person (people.json), in the teacher's mean-removed space the student was trained in;
  - known accuracy (right person and accepted) and stranger FAR for: the teacher (dlib on our crops),
    the student with centroids, and the student with a logistic-regression head on its embeddings
    (the "classifier head on top" alternative), each at the threshold calibrated on the negatives.

Writes bench/results/backbone[-NAME].json. Needs dlib (requirements-backbone.txt) for the teacher.
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

from bench.common import RESULTS, machine, write_result
from bench.protocol import LFW_DEV, make_split
from faceberry.contract import l2_normalize, threshold_for_far


def score(train_x, train_y, test_x, test_y, neg_x, str_x, target: float, head: str = "centroid") -> dict[str, Any]:
    people = sorted(set(train_y))
    if head == "centroid":
        gal = l2_normalize(np.stack([l2_normalize(train_x[np.array(train_y) == p]).mean(0) for p in people]))

        def best(x):
            sims = l2_normalize(x) @ gal.T
            i = sims.argmax(1)
            return np.array(people)[i], sims[np.arange(len(x)), i]
    else:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=10.0, max_iter=2000).fit(l2_normalize(train_x), train_y)

        def best(x):
            p = clf.predict_proba(l2_normalize(x))
            i = p.argmax(1)
            return clf.classes_[i], p[np.arange(len(x)), i]
    _, neg_s = best(neg_x)
    th = threshold_for_far(neg_s, target)
    pred, s = best(test_x)
    _, str_s = best(str_x)
    right = pred == np.array(test_y)
    return {
        "threshold": th,
        "known_accuracy": float(np.mean(right & (s >= th))),
        "closed_set_accuracy": float(np.mean(right)),
        "stranger_far": float(np.mean(str_s >= th)),
        "negatives_far": float(np.mean(neg_s >= th)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", type=Path, required=True)
    ap.add_argument("--name", default="")
    ap.add_argument("--target-far", type=float, default=0.02)
    ap.add_argument("--cache-dir", type=Path, default=None, help="crop cache (default ~/.cache/faceberry/crops)")
    ap.add_argument("--teacher-cache", type=Path, default=RESULTS / "cache" / "teacher-protocol.npz")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from faceberry.preprocess import Preprocessing, normalize
    from faceberry.train.backbone import load_embedder
    from faceberry.train.crops import build_crop_set
    from faceberry.train.teacher import TeacherCache, label_crops

    t0 = time.monotonic()
    model, cfg = load_embedder(args.backbone)
    size = int(cfg["input_size"])
    prep = Preprocessing.from_dict(cfg["preprocessing"])
    seen = set(json.loads((args.backbone / "people.json").read_text()).get("train", []))
    # A rebuilt dlib network (--arch dlib-resnet) is its own teacher: nothing was distilled.
    distilled = "teacher" in cfg
    split = make_split(LFW_DEV, seed=args.seed)
    files, role_of = {}, {}
    for role in ("train", "test", "negatives", "strangers"):
        for person, rels in getattr(split, role).items():
            key = f"{role}/{person}"
            files[key] = [LFW_DEV / r for r in rels]
            role_of[key] = (role, person)
    from faceberry.train.crops import CropMaker, default_cache_dir

    maker = CropMaker(size, cache_dir=args.cache_dir or default_cache_dir(), alignment=prep.alignment)
    cs = build_crop_set(LFW_DEV, size, files=files, maker=maker, progress=False)
    roles = np.array([role_of[k][0] for k in cs.labels])
    persons = [role_of[k][1] for k in cs.labels]
    student = model.predict(normalize(cs.crops, prep), batch_size=64, verbose=0)
    teacher = (label_crops(cs.crops, TeacherCache(args.teacher_cache), kind=cfg["teacher"].get("kind", "dlib"))
               if distilled else l2_normalize(student))
    mean = np.array(cfg["teacher"]["mean"] if distilled else np.zeros(student.shape[1]), dtype=np.float32)
    cos = np.sum(l2_normalize(student) * l2_normalize(teacher - mean), axis=1)
    was_seen = np.array([p in seen for p in persons])

    def pick(x, role):
        m = roles == role
        return x[m], [p for p, k in zip(persons, m, strict=True) if k]

    out: dict[str, Any] = {"backbone": str(args.backbone), "backbone_config": {
        k: cfg.get(k) for k in ("input_size", "alpha", "views", "weights_init")},
        "backbone_report": json.loads((args.backbone / "report.json").read_text()),
        "protocol": {**split.summary(), "fingerprint": split.fingerprint(), "target_far": args.target_far},
        "faces": len(cs), "skipped": len(cs.skipped),
        "student_teacher_cosine": {
            "unseen_people": float(cos[~was_seen].mean()) if (~was_seen).any() else None,
            "unseen_faces": int((~was_seen).sum()),
            "seen_people": float(cos[was_seen].mean()) if was_seen.any() else None,
            "seen_faces": int(was_seen.sum()),
        },
        "known_people_seen_by_backbone": sorted(set(split.train) & seen),
        "strangers_seen_by_backbone": sorted(set(split.strangers) & seen),
        "systems": {}}
    who = "student" if distilled else f"{cfg.get('arch', 'backbone')}"
    systems = [(f"{who} float (centroid)", student, "centroid"),
               (f"{who} float + logistic-regression head", student, "logreg")]
    if distilled:
        systems.insert(0, ("teacher dlib on our crops (centroid)", l2_normalize(teacher), "centroid"))
    for name, emb, head in systems:
        tr_x, tr_y = pick(emb, "train")
        te_x, te_y = pick(emb, "test")
        ng_x, _ = pick(emb, "negatives")
        st_x, _ = pick(emb, "strangers")
        out["systems"][name] = score(tr_x, tr_y, te_x, te_y, ng_x, st_x, args.target_far, head)
    out["machine"] = machine()
    out["seconds"] = round(time.monotonic() - t0, 1)
    path = write_result(f"backbone-{args.name}" if args.name else "backbone", out)
    print(json.dumps({k: out[k] for k in ("student_teacher_cosine", "systems")}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
