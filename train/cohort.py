"""`python -m train cohort`: the stranger cohort of a backbone, stored beside it as embeddings only.

    python -m train cohort --backbone backbones/faces --lfw                 # Labeled Faces in the Wild, ~5,700 people
    python -m train cohort --backbone backbones/faces --photos FACES_DIR    # any <person>/*.jpg folder

Every face goes through the device's own detector and alignment and the backbone's embedder; only the
embeddings are kept (BACKBONE_DIR/cohort.npz, see device.cohort). `python -m train --backbone` then
calibrates the accept threshold on them, `python -m convert` carries them into the bundle and
`python -m device enroll` recalibrates on them when a person is added.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from device import cohort as cohort_mod
from device.contract import list_images
from device.preprocess import Preprocessing

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train cohort", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, type=Path,
                   help="the backbone directory (from `python -m train backbone`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--photos", type=Path, help="folder of other people's faces, one sub-folder per person")
    src.add_argument("--lfw", action="store_true",
                     help="Labeled Faces in the Wild through scikit-learn's fetcher (about 200 MB, downloaded once)")
    p.add_argument("--exclude", type=Path, default=None,
                   help="your photos folder: people with these folder names are left out of the cohort")
    p.add_argument("--max-per-person", type=int, default=5,
                   help="faces kept per cohort person (default 5: many people matter more than many photos)")
    p.add_argument("--max-faces", type=int, default=20000, help="faces kept in all (default 20000)")
    p.add_argument("--min-face-size", type=int, default=40, help="faces narrower than this are not used (default 40)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _lfw_images():
    from sklearn.datasets import fetch_lfw_people

    lfw = fetch_lfw_people(min_faces_per_person=0, color=True, resize=1.0, slice_=None, download_if_missing=True)
    for image, target in zip(lfw.images, lfw.target, strict=True):
        img = image if image.max() > 1.5 else image * 255.0
        yield str(lfw.target_names[target]), np.clip(img, 0, 255).astype(np.uint8)


def build_cohort(backbone: Path, photos: Path | None = None, lfw: bool = False, exclude: set[str] | None = None,
                 max_per_person: int = 5, max_faces: int = 20000, min_face_size: int = 40,
                 seed: int = 0) -> cohort_mod.Cohort:
    from train.backbone import load_embedder
    from train.crops import CropMaker, default_cache_dir, list_people

    model, bconfig = load_embedder(backbone)
    prep = Preprocessing.from_dict(bconfig["preprocessing"])
    maker = CropMaker(prep.input_size, cache_dir=default_cache_dir(), min_face_size=min_face_size,
                      alignment=prep.alignment)
    excluded = {cohort_mod.same_name(n) for n in (exclude or set())}
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    names: list[str] = []
    per: dict[str, int] = {}
    if lfw:
        items = ((name, None, image) for name, image in _lfw_images())
    else:
        people = {k: v for k, v in list_people(photos).items() if v}
        order = sorted(people)
        rng.shuffle(order)
        items = ((name, path, None) for name in order for path in people[name][: 3 * max_per_person])
    for name, path, image in items:
        if cohort_mod.same_name(name) in excluded or per.get(name, 0) >= max_per_person or len(crops) >= max_faces:
            continue
        if path is not None:
            crop, _ = maker.crop_file(path)
        else:
            crop, _ = maker.crop_image(image)
        if crop is None:
            continue
        crops.append(crop)
        names.append(name)
        per[name] = per.get(name, 0) + 1
        if len(crops) % 500 == 0:
            log.info("cohort: %d faces of %d people", len(crops), len(per))
    if len(set(names)) < 20:
        raise ValueError(f"only {len(set(names))} people with a usable face: a stranger cohort needs hundreds; "
                         "pass a bigger --photos folder or use --lfw")
    from device.contract import enrolled_views
    from train.fewshot import embed

    views = enrolled_views(bconfig.get("arch"))
    return cohort_mod.build(embed(model, np.stack(crops), prep, views), names, views)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    exclude = set()
    if args.exclude and args.exclude.is_dir():
        exclude = {d.name for d in args.exclude.iterdir() if d.is_dir()}
    if args.photos is not None and not args.photos.is_dir():
        print(f"error: --photos {args.photos} is not a folder; pass a folder of <person>/*.jpg", file=sys.stderr)
        return 2
    if args.photos is not None and not any(list_images(d) for d in args.photos.iterdir() if d.is_dir()):
        print(f"error: no <person>/ photo folders in {args.photos}", file=sys.stderr)
        return 2
    from train.backbone import BackboneError

    try:
        cohort = build_cohort(args.backbone, args.photos, args.lfw, exclude, args.max_per_person, args.max_faces,
                              args.min_face_size, args.seed)
    except (BackboneError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.backbone / cohort_mod.COHORT_FILE
    cohort.save(out)
    print(f"stranger cohort → {out}: {len(cohort)} faces of {cohort.people} people "
          f"({time.monotonic() - started:.0f} s); `python -m train --backbone {args.backbone}` calibrates on it")
    return 0
