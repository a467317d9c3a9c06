"""What corrections and the stranger memory do to accuracy: `python -m bench.memory_effects --bundle BUNDLE`.

Every photo of lfw-dev goes through the device's own pipeline (BlazeFace, alignment, the bundle's int8
embedder, its gallery and accept threshold). The bundle's people are the household: their photos after
the first `--skip` (the ones a bundle's gallery was built from) are the known probes; everyone else is a
stranger.

Corrections (faceberry.contract.accept_with_negatives): for every stranger the bundle falsely accepts, the
user says "wrong" on the first falsely accepted photo (its embedding becomes a negative for the person it
was taken for), all such corrections together, as a household accumulates them. Measured on the photos
that were not corrected: strangers' photos still accepted as someone, and known probes still named
correctly, for several margins.

Stranger memory (faceberry.device.memory.strangers.StrangerMemory, threshold = the bundle's accept threshold): the
unknown
photos of strangers in a seeded random order, one at a time, as a door camera would see visits. Measured:
how often a stranger's photo gets the id their earlier photos got ("seen again" recognised), how often a
photo joins a cluster started by another person (false merge), and cluster purity.

Writes bench/results/memory_effects.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import SHARED_DATA, table, write_result
from faceberry.bundle import load_bundle
from faceberry.contract import UNKNOWN, accept, accept_with_negatives, best_match, list_images
from faceberry.device.config import MemoryConfig
from faceberry.device.memory.strangers import StrangerMemory
from faceberry.device.recognition.pipeline import FacePipeline
from faceberry.preprocess import load_image

MARGINS = (0.0, MemoryConfig().negative_margin, 0.05, 0.1)  # the daemon's default among them


def embed_all(pipe: FacePipeline, lfw: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(person, photo name, embedding) of the widest face of every photo that has one."""
    people, names, vecs = [], [], []
    for person in sorted(d for d in lfw.iterdir() if d.is_dir()):
        for photo in list_images(person):
            recs = pipe.process(load_image(photo)).recognitions
            if recs:
                rec = max(recs, key=lambda r: r.face.width)
                people.append(person.name)
                names.append(photo.name)
                vecs.append(rec.vector)
    return people, names, np.stack(vecs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an embedding bundle")
    ap.add_argument("--lfw", type=Path, default=SHARED_DATA / "faces" / "lfw-dev", help="<person>/*.jpg folders")
    ap.add_argument("--skip", type=int, default=10, help="each household person's first N photos are not probes")
    ap.add_argument("--few", type=int, default=5, help="also measure with only the first N strangers corrected")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.lfw.is_dir():
        sys.exit(f"error: {args.lfw} is absent; pass --lfw or put ../shared beside the repo")

    bundle = load_bundle(args.bundle)
    if bundle.kind != "embedding":
        sys.exit(f"error: {args.bundle} is a {bundle.kind} bundle; corrections and strangers need an embedding one")
    pipe = FacePipeline(bundle, num_threads=2)
    gallery, names_g = pipe.classifier.gallery, list(pipe.classifier.gallery_labels)
    threshold = float(pipe.classifier.threshold)
    people, _photos, emb = embed_all(pipe, args.lfw)
    people_arr = np.array(people)
    best, score = best_match(emb, gallery, names_g)
    household = set(names_g)
    rank = Counter()
    is_probe = np.zeros(len(people), bool)
    for i, p in enumerate(people):
        if p in household:
            is_probe[i] = rank[p] >= args.skip
            rank[p] += 1
    is_stranger = ~np.isin(people_arr, list(household))
    base = [accept(b, float(s), threshold) for b, s in zip(best, score, strict=True)]

    # Corrections: the first false accept of each stranger becomes a negative for whom it was taken for.
    corrected: dict[str, int] = {}
    for i in np.flatnonzero(is_stranger):
        if base[i] != UNKNOWN and people[i] not in corrected:
            corrected[people[i]] = int(i)
    rest = np.array([i for i in np.flatnonzero(is_stranger) if i not in set(corrected.values())], int)
    probes = np.flatnonzero(is_probe)

    def rates(chosen: dict[str, int], margin: float | None) -> dict[str, float]:
        negatives: dict[str, list[np.ndarray]] = {}
        for i in chosen.values():
            negatives.setdefault(base[i], []).append(emb[i])
        neg = {k: np.stack(v) for k, v in negatives.items()}

        def decide(i: int) -> str:
            if margin is None:
                return base[i]
            return accept_with_negatives(best[i], float(score[i]), threshold, emb[i], neg.get(best[i]), margin)
        same = rest[np.isin(people_arr[rest], list(chosen))]
        known_ok = float(np.mean([decide(i) == people[i] for i in probes])) if len(probes) else float("nan")
        stranger_acc = float(np.mean([decide(i) != UNKNOWN for i in rest])) if len(rest) else float("nan")
        same_acc = float(np.mean([decide(i) != UNKNOWN for i in same])) if len(same) else float("nan")
        return {"corrections": len(chosen), "known_correct": known_ok, "strangers_accepted": stranger_acc,
                "corrected_strangers_other_photos_accepted": same_acc}

    few = dict(list(corrected.items())[:args.few])
    corrections = {"none": rates(corrected, None)}
    for m in MARGINS:
        corrections[f"{len(few)} corrections, margin {m:g}"] = rates(few, m)
        corrections[f"{len(corrected)} corrections, margin {m:g}"] = rates(corrected, m)

    # Stranger memory, on the strangers' unknown photos in a random order.
    rng = np.random.default_rng(args.seed)
    order = rng.permutation([i for i in np.flatnonzero(is_stranger) if base[i] == UNKNOWN])
    memory = StrangerMemory(None, threshold, max_clusters=10_000, retention=1e12, clock=lambda: 0.0)
    first_person: dict[str, str] = {}
    ids_of: dict[str, set[str]] = {}
    again = again_same = merges = 0
    members: dict[str, list[str]] = {}
    for i in order:
        cluster, new = memory.observe(emb[i])
        sid, person = cluster.stranger_id, people[i]
        if new:
            first_person[sid] = person
        elif first_person[sid] != person:
            merges += 1
        if person in ids_of:
            again += 1
            again_same += sid in ids_of[person]
        ids_of.setdefault(person, set()).add(sid)
        members.setdefault(sid, []).append(person)
    purity = sum(Counter(m).most_common(1)[0][1] for m in members.values()) / max(1, len(order))
    strangers = {"photos": len(order), "people": len(ids_of), "clusters": len(memory),
                 "seen_again_same_id": again_same / again if again else float("nan"), "seen_again": again,
                 "false_merge": merges / len(order) if len(order) else float("nan"), "purity": purity,
                 "clusters_per_person": float(np.mean([len(v) for v in ids_of.values()])) if ids_of else 0.0}

    print(f"bundle {bundle.bundle_id}: {len(household)} people, threshold {threshold:.3f}; "
          f"{len(probes)} known probes, {int(is_stranger.sum())} stranger photos of "
          f"{len(set(people_arr[is_stranger]))} people; {len(corrected)} strangers corrected once")
    print(table(["corrections", "known named", "strangers' photos accepted", "corrected strangers' other photos"],
                [[k, f"{100 * v['known_correct']:.1f}%", f"{100 * v['strangers_accepted']:.2f}%",
                  f"{100 * v['corrected_strangers_other_photos_accepted']:.1f}%"] for k, v in corrections.items()]))
    print(table(["stranger memory", "value"], [[k, f"{v:.3f}" if isinstance(v, float) else v]
                                               for k, v in strangers.items()]))
    path = write_result("memory_effects", {
        "bundle": bundle.bundle_id, "threshold": threshold, "people": sorted(household), "probes": len(probes),
        "stranger_photos": int(is_stranger.sum()), "strangers_corrected": len(corrected),
        "corrections": corrections, "strangers": strangers, "seed": args.seed, "skip": args.skip,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
