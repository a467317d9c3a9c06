"""The few-shot accuracy protocol (issues 3, 5, 6), as one deterministic split anyone can rebuild.

lfw-dev people with at least 20 photos are the known people: 10 photos each for training, the rest
are probes. Everyone else is a stranger; they are split BY PERSON into `negatives` (given to training
to learn `unknown` and calibrate the threshold) and `strangers` (never seen in training; the false
accepts are counted on them). Photos are shuffled per person with a fixed seed, so the split depends
only on the file names and the seed.

    python -m bench.protocol --dest /tmp/split      # materialise it (symlinks) and print a summary

Layout under DEST (symlinks into ../shared, or copies with --copy):
    train/<person>/        10 photos of each known person      → python -m train --photos
    negatives/<person>/    photos of the negative strangers    → python -m train --negatives
    test/<person>/         the known people's other photos
    strangers/<person>/    photos of the held-out strangers
    eval/<name>            links to every test/ and strangers/ folder → python -m device eval --photos
    split.json             the whole split (relative paths), for other tools (e.g. the peer)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.common import SHARED_DATA
from faceberry.contract import list_images

LFW_DEV = SHARED_DATA / "faces" / "lfw-dev"


@dataclass
class Split:
    source: str
    seed: int
    min_photos: int
    train_per_person: int
    negatives_fraction: float
    train: dict[str, list[str]] = field(default_factory=dict)  # person → photo paths relative to source
    test: dict[str, list[str]] = field(default_factory=dict)
    negatives: dict[str, list[str]] = field(default_factory=dict)
    strangers: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {
            "known_people": len(self.train),
            "train_photos": sum(map(len, self.train.values())),
            "test_photos": sum(map(len, self.test.values())),
            "negative_people": len(self.negatives),
            "negative_photos": sum(map(len, self.negatives.values())),
            "stranger_people": len(self.strangers),
            "stranger_photos": sum(map(len, self.strangers.values())),
        }

    def fingerprint(self) -> str:
        """Short hash of the split's content: two runs with the same fingerprint used the same photos."""
        body = json.dumps({k: getattr(self, k) for k in ("train", "test", "negatives", "strangers")}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary(), "fingerprint": self.fingerprint()}


def _photos(folder: Path) -> list[str]:
    return [p.name for p in list_images(folder)]


def make_split(source: Path = LFW_DEV, seed: int = 0, min_photos: int = 20, train_per_person: int = 10,
               negatives_fraction: float = 0.5) -> Split:
    """The protocol's split of `source` (<person>/*.jpg); deterministic for a given folder and seed."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is absent; put the shared data beside the repo as ../shared")
    rng = np.random.default_rng(seed)
    split = Split(str(source), seed, min_photos, train_per_person, negatives_fraction)
    people = sorted(p.name for p in source.iterdir() if p.is_dir())
    others = []
    for person in people:
        files = _photos(source / person)
        if len(files) >= min_photos:
            order = rng.permutation(len(files))
            chosen = [f"{person}/{files[i]}" for i in order]
            split.train[person] = sorted(chosen[:train_per_person])
            split.test[person] = sorted(chosen[train_per_person:])
        elif files:
            others.append((person, [f"{person}/{f}" for f in files]))
    order = rng.permutation(len(others))
    n_neg = round(len(others) * negatives_fraction)
    for rank, i in enumerate(order):
        person, files = others[i]
        (split.negatives if rank < n_neg else split.strangers)[person] = files
    split.negatives = dict(sorted(split.negatives.items()))
    split.strangers = dict(sorted(split.strangers.items()))
    return split


def materialise(split: Split, dest: Path, copy: bool = False) -> dict[str, Path]:
    """Write the split as folders of symlinks (or copies) under dest; returns the folders by role."""
    source = Path(split.source)
    if dest.exists():
        shutil.rmtree(dest)
    roles = {}
    for role in ("train", "negatives", "test", "strangers"):
        root = dest / role
        for person, files in getattr(split, role).items():
            (root / person).mkdir(parents=True, exist_ok=True)
            for rel in files:
                target = root / rel
                if copy:
                    shutil.copy2(source / rel, target)
                else:
                    os.symlink((source / rel).resolve(), target)
        root.mkdir(parents=True, exist_ok=True)
        roles[role] = root
    eval_dir = dest / "eval"
    eval_dir.mkdir()
    for role in ("test", "strangers"):
        for person in getattr(split, role):
            os.symlink(Path("..") / role / person, eval_dir / person, target_is_directory=True)
    roles["eval"] = eval_dir
    (dest / "split.json").write_text(json.dumps(split.to_dict(), indent=1) + "\n", encoding="utf-8")
    return roles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, required=True, help="folder to (re)create with the split")
    parser.add_argument("--source", type=Path, default=LFW_DEV, help="<person>/*.jpg folder (default lfw-dev)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--min-photos", type=int, default=20, help="photos a person needs to be known (default 20)")
    parser.add_argument("--train-per-person", type=int, default=10, help="training photos per person (default 10)")
    parser.add_argument("--negatives-fraction", type=float, default=0.5,
                        help="share of the other people given to training as negatives (default 0.5)")
    parser.add_argument("--copy", action="store_true", help="copy the photos instead of symlinking them")
    args = parser.parse_args(argv)
    try:
        split = make_split(args.source, args.seed, args.min_photos, args.train_per_person, args.negatives_fraction)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    materialise(split, args.dest, copy=args.copy)
    print(json.dumps({"dest": str(args.dest), "fingerprint": split.fingerprint(), **split.summary()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
