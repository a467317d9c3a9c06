"""Training photos kept before and after the subject face is chosen by identity (issue 24).

Before: a photo with several faces of similar size (faceberry.contract.DOMINANCE) was skipped. After: the face that
agrees with the person's other photos is used (faceberry.contract.choose_subject,
faceberry.train.crops.resolve_subjects) and
only a photo that stays ambiguous is skipped. Run on ../shared's photo sets with dlib's ResNet backbone, exactly as
`python -m train --backbone` makes its crops:

    python -m train backbone --arch dlib-resnet --out /tmp/dlib
    python -m bench.subject_faces --backbone /tmp/dlib

Besides the counts, a consistency check that the added faces are their people's: every kept photo is scored
against the centroids of each person's *other* kept photos (leave-one-out); the share whose nearest centroid is
their own person is reported before and after (it must not fall), and for the chosen faces alone.
Writes bench/results/subject_faces.json and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import SHARED_DATA, table, write_result

SETS = {
    "lfw-dev": SHARED_DATA / "faces" / "lfw-dev",
    "five-celebrities/train": SHARED_DATA / "faces" / "five-celebrities" / "train",
    "five-celebrities/val": SHARED_DATA / "faces" / "five-celebrities" / "val",
}


def nearest_own(emb: np.ndarray, labels: list[str]) -> np.ndarray:
    """Per photo: whether its nearest leave-one-out centroid is its own person's (people with 2+ photos)."""
    from faceberry.contract import l2_normalize

    emb = l2_normalize(emb).astype(np.float64)
    lab = np.array(labels)
    people = sorted(set(labels))
    sums = np.stack([emb[lab == p].sum(axis=0) for p in people])
    index = {p: i for i, p in enumerate(people)}
    out = np.zeros(len(emb), bool)
    for k in range(len(emb)):
        own = index[labels[k]]
        cents = sums.copy()
        cents[own] -= emb[k]
        sims = l2_normalize(cents) @ emb[k]
        if np.sum(lab == labels[k]) < 2:
            sims[own] = -np.inf  # no other photo of theirs: cannot be right
        out[k] = int(np.argmax(sims)) == own
    return out


def run_set(name: str, folder: Path, model, prep, views: str, maker) -> dict[str, Any]:
    from faceberry.train.crops import build_crop_set, list_people, resolve_subjects
    from faceberry.train.fewshot import embed

    started = time.monotonic()
    people = {p: files for p, files in list_people(folder).items() if files}
    crop_set = build_crop_set(folder, prep.input_size, maker=maker, files=people, progress=False, choose_later=True)
    photos = sum(len(v) for v in people.values())
    before_n = len(crop_set)
    several = len(crop_set.ambiguous)
    before_labels = list(crop_set.labels)
    result = resolve_subjects(crop_set, lambda crops: embed(model, crops, prep, views))
    emb = embed(model, crop_set.crops, prep, views)
    right = nearest_own(emb, crop_set.labels)
    before_right = nearest_own(emb[:before_n], before_labels)
    chosen = right[before_n:]
    return {
        "set": name, "people": len(people), "photos": photos,
        "several_faces": several, "kept_before": before_n, "kept_after": len(crop_set),
        "chosen": result["chosen"], "still_ambiguous": result["refused"],
        "consistent_before": float(before_right.mean()) if before_n else None,
        "consistent_after": float(right.mean()) if len(right) else None,
        "consistent_chosen": float(chosen.mean()) if len(chosen) else None,
        "chosen_paths": crop_set.paths[before_n:],
        "skipped": [s for s in crop_set.skipped if s["reason"].startswith("several")],
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.subject_faces", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, type=Path, help="a dlib-resnet backbone (`python -m train backbone`)")
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS), help="which photo sets (default all)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/subject_faces.json)")
    args = p.parse_args(argv)

    from faceberry.contract import enrolled_views
    from faceberry.preprocess import Preprocessing
    from faceberry.train.backbone import load_embedder
    from faceberry.train.crops import CropMaker, default_cache_dir

    model, bconfig = load_embedder(args.backbone)
    prep = Preprocessing.from_dict(bconfig["preprocessing"])
    views = enrolled_views(bconfig.get("arch"))
    maker = CropMaker(prep.input_size, cache_dir=default_cache_dir(), alignment=prep.alignment)
    rows = []
    for name in args.sets:
        if not SETS[name].is_dir():
            print(f"skipping {name}: {SETS[name]} is absent (see ../shared/README.md)")
            continue
        rows.append(run_set(name, SETS[name], model, prep, views, maker))

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    print(table(["set", "photos", "several faces", "kept before", "kept after", "chosen", "still ambiguous",
                 "consistent before", "after", "chosen only"],
                [[r["set"], r["photos"], r["several_faces"], r["kept_before"], r["kept_after"], r["chosen"],
                  r["still_ambiguous"], pct(r["consistent_before"]), pct(r["consistent_after"]),
                  pct(r["consistent_chosen"])] for r in rows]))
    path = write_result("subject_faces", {"backbone": str(args.backbone), "arch": bconfig.get("arch"), "sets": rows},
                        args.out)
    print(f"→ {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
