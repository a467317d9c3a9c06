"""Input gathering shared by both training paths (fine-tune and few-shot on a backbone): the photo and
negative folders read, the run directory prepared, every photo turned into an aligned crop (faceberry.train.crops)
and the too-few-photos check made. faceberry.train.trainer (fine-tuning) and faceberry.train.fewshot (galleries) start
here.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceberry.contract import IMAGE_SUFFIXES
from faceberry.preprocess import ALIGN_TEMPLATE_NAME
from faceberry.train.calibrate import UNKNOWN
from faceberry.train.crops import (
    CropMaker,
    CropSet,
    build_crop_set,
    default_cache_dir,
    list_people,
    list_photos,
    resolve_subjects,
    summarize_skips,
)
from faceberry.train.errors import TrainError

log = logging.getLogger(__name__)


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise TrainError(f"output directory {out} is not empty; choose another --out or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _negative_files(folder: Path) -> dict[str, list[Path]]:
    """{group: photos} of a negatives folder: one group per sub-folder (a person), plus loose files."""
    groups: dict[str, list[Path]] = {}
    loose = list_photos(folder)
    if loose:
        groups[""] = loose
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_photos(sub)
        if files:
            groups[sub.name] = files
    return groups


Files = dict[str, list[Path]]


def collect_inputs(photos: Path, negatives: Path | None, allow_one: bool = False) -> tuple[Files, Files, list[str]]:
    """(people, negative groups, warnings). `photos/unknown/` counts as negatives. One person alone is
    refused unless `allow_one` (a gallery calibrated on a stranger cohort needs no second person)."""
    if not photos.is_dir():
        raise TrainError(f"photos folder not found: {photos}; pass --photos DIR holding one sub-folder per person")
    people = list_people(photos)
    warnings = []
    neg_groups: dict[str, list[Path]] = {}
    if UNKNOWN in people:
        people.pop(UNKNOWN)
        neg_groups.update({f"unknown/{k}" if k else "unknown": v for k, v in _negative_files(photos / UNKNOWN).items()})
    if negatives is not None:
        if not negatives.is_dir():
            raise TrainError(f"--negatives folder not found: {negatives}; pass a folder of other people's face photos")
        neg_groups.update({f"negatives/{k}" if k else "negatives": v for k, v in _negative_files(negatives).items()})
    for name in [n for n, files in people.items() if not files]:
        others = _other_files(photos / name)
        if others:
            # Files that are no photo faceberry reads (a .gif, a video, a RAW file): the person is not dropped
            # in silence, and training does not go on without them.
            raise TrainError(
                f"{photos / name} has {len(others)} file(s) but no photo faceberry reads ({_kinds(others)}); "
                f"convert them to JPEG (accepted: {', '.join(IMAGE_SUFFIXES)}), or remove the folder"
            )
        warnings.append(f"{photos / name} has no photos ({', '.join(IMAGE_SUFFIXES)}): ignored")
        people.pop(name)
    if not people:
        raise TrainError(f"no person folders with photos in {photos}; put photos in {photos}/<person>/*.jpg")
    if len(people) < 2 and not neg_groups and not allow_one:
        raise TrainError(
            f"only one person ({next(iter(people))}) in {photos}: a classifier needs two or more people, or "
            f"other people's faces in {photos}/unknown/ or --negatives DIR; or recognise one person with a face "
            "backbone and its stranger cohort (--backbone BACKBONE_DIR)"
        )
    return people, neg_groups, warnings


def _other_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _kinds(files: list[Path]) -> str:
    counts: dict[str, int] = {}
    for f in files:
        kind = f.suffix.lower() or "no suffix"
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def split_negatives(groups: list[str], fraction_train: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Negatives split by group (person) where there are several groups, so the threshold is
    calibrated on strangers the model never saw; by photo when there is one loose folder."""
    groups_arr = np.array(groups)
    names = sorted(set(groups))
    rng = np.random.default_rng(seed + 1)
    if len(names) >= 4:
        order = rng.permutation(names)
        n_train = round(len(names) * fraction_train)
        train_names = set(order[:n_train].tolist())
        is_train = np.array([g in train_names for g in groups_arr], dtype=bool)
    else:
        is_train = np.zeros(len(groups), dtype=bool)
        idx = rng.permutation(len(groups))
        is_train[idx[: round(len(groups) * fraction_train)]] = True
    return np.flatnonzero(is_train), np.flatnonzero(~is_train)


@dataclass
class Gathered:
    people: CropSet
    negatives: CropSet | None
    counts: dict[str, int]  # usable photos per person
    skipped: list[dict[str, str]]
    detector_path: Path
    # Photos of several faces: {"chosen": n, "refused": n} (faceberry.train.crops.resolve_subjects).
    subjects: dict[str, int]


def gather_crops(
    args, photos: Path, out: Path, size: int, people: Files, neg_groups: Files,
    alignment: str = ALIGN_TEMPLATE_NAME, embed=None,
) -> Gathered:
    """Crops for the people and the negatives, the skip report in out/skipped.json, and the
    too-few-photos check: the first half of every training run (softmax or few-shot).

    A photo with several faces of similar size gets the face that agrees with the person's other photos
    (faceberry.train.crops.resolve_subjects) where `embed` (crops → the backbone's embeddings) is given."""
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    maker = CropMaker(size, args.detector, cache_dir, min_face_size=args.min_face_size, alignment=alignment)
    person_set = build_crop_set(photos, size, maker=maker, files=people, progress=not args.quiet, choose_later=True)
    subjects = resolve_subjects(person_set, embed)
    if subjects["chosen"]:
        log.info("%d photo(s) with several faces of similar size: the face that agrees with the person's other "
                 "photos was used", subjects["chosen"])
    neg_set = None
    if neg_groups:
        neg_set = build_crop_set(photos, size, maker=maker, files=neg_groups, progress=not args.quiet)
    skipped = person_set.skipped + (neg_set.skipped if neg_set else [])
    (out / "skipped.json").write_text(json.dumps(skipped, indent=1) + "\n", encoding="utf-8")
    if skipped:
        log.warning("skipped %d photo(s): %s — the list is in %s", len(skipped),
                    ", ".join(f"{n} {r}" for r, n in summarize_skips(skipped).items()), out / "skipped.json")

    counts = {p: person_set.labels.count(p) for p in people}
    too_few = {p: n for p, n in counts.items() if n < args.min_photos}
    if too_few:
        def why(p: str) -> str:
            reasons = Counter(s["reason"] for s in skipped if s["label"] == p)
            return f" [{'; '.join(f'{n} {r}' for r, n in reasons.most_common())}]" if reasons else ""

        detail = ", ".join(f"{p}: {n} of {len(people[p])}{why(p)}" for p, n in sorted(too_few.items()))
        raise TrainError(
            f"too few usable photos (need at least {args.min_photos} per person with one clear face; {detail}); "
            f"add photos or lower --min-photos (see {out / 'skipped.json'} for the ones skipped)"
        )
    return Gathered(person_set, neg_set, counts, skipped, maker.detector_path, subjects)

