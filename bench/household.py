"""The household protocol (issue 14): few people, no negatives folder, strangers = everyone else.

    python -m bench.household [--draws 8] [--name NAME]

What a family gets at its door. lfw-dev's people are split (seeded) into a cohort part, which only
builds the stranger cohort (`python -m train cohort`), and an evaluation part, which the cohort
never saw. From the evaluation part, households of 2, 4 and 8 people are drawn several times, 10
photos each enrolled; their other photos are the known probes and every other evaluation person's
photos are strangers.

Everything runs through the device's own code: BlazeFace + alignment (train.crops, as training and
the daemon make crops), the int8 embedder of a converted bundle (device.classifier), the gallery rule
(device.contract.centroid), the threshold (device.cohort.calibrate with the real cohort file, as
convert and enroll call it), the accept rule (device.contract.accept) and, per visit, the tracker's
rule (device.contract.visit_decision) over sequences of 5 different photos of one person.

Also on degraded variants of the probe photos a door camera produces (small faces, motion blur, low
JPEG quality, dark and noisy, infrared-like greyscale, off-angle): the gallery and threshold stay the
clean ones, as they would at the door.

Prints a table and writes bench/results/household[-NAME].json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import ROOT, machine, need_shared, table, write_result
from device import cohort as cohort_mod
from device.contract import UNKNOWN, accept, best_match, gallery_from, visit_decision

SIZES = (2, 4, 8)
ENROLL = 10
VISIT_FRAMES = 5
COHORT_PEOPLE = 50


def _run(args: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode:
        sys.exit(f"error: {' '.join(args[:3])} failed; see {log}")


def degrade(image: np.ndarray, variant: str, rng: np.random.Generator) -> np.ndarray:
    """A door camera's version of a photo (RGB uint8)."""
    h, w = image.shape[:2]
    if variant == "small":  # LFW faces are ~110 px wide in 250 px: this makes them ~50 px
        return cv2.resize(image, (int(w * 0.45), int(h * 0.45)), interpolation=cv2.INTER_AREA)
    if variant == "motion_blur":
        k = np.zeros((9, 9), np.float32)
        k[4, :] = 1.0 / 9
        return cv2.filter2D(image, -1, k)
    if variant == "jpeg_q15":
        _, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 15])
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if variant == "dark_noisy":
        noisy = image.astype(np.float32) * 0.3 + rng.normal(0, 6, image.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    if variant == "ir_grey":
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        grey = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(grey)
        return np.repeat(grey[..., None], 3, axis=2)
    if variant == "off_angle":  # the head turned: a horizontal squeeze about the face's side
        src = np.float32([[0, 0], [w, 0], [0, h], [w, h]])
        dst = np.float32([[0, h * 0.08], [w * 0.78, 0], [0, h * 0.92], [w * 0.78, h]])
        return cv2.warpPerspective(image, cv2.getPerspectiveTransform(src, dst), (w, h),
                                   borderMode=cv2.BORDER_REPLICATE)
    raise ValueError(variant)


VARIANTS = ("small", "motion_blur", "jpeg_q15", "dark_noisy", "ir_grey", "off_angle")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.household", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=8, help="households drawn per size and split (default 8)")
    ap.add_argument("--splits", type=int, default=2, help="cohort/evaluation splits of the people (default 2)")
    ap.add_argument("--visits", type=int, default=300, help="stranger visits simulated per household (default 300)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "household")
    ap.add_argument("--name", default="")
    ap.add_argument("--no-variants", action="store_true", help="clean photos only")
    args = ap.parse_args(argv)
    lfw = need_shared("faces", "lfw-dev")
    started = time.monotonic()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    from device.bundle import load_bundle
    from device.classifier import FaceClassifier
    from device.preprocess import Preprocessing, load_image
    from train.crops import CropMaker, default_cache_dir, list_people

    backbone = work / "backbone"
    if not (backbone / "config.json").is_file():
        _run(["train", "backbone", "--arch", "dlib-resnet", "--out", str(backbone), "--force"], work / "backbone.log")
    everyone = {p: f for p, f in list_people(lfw).items() if f}
    names = sorted(everyone)
    prep = Preprocessing.from_dict(json.loads((backbone / "config.json").read_text())["preprocessing"])
    maker = CropMaker(prep.input_size, cache_dir=default_cache_dir(), alignment=prep.alignment)

    # One int8 embedder for every household: a bundle converted from a tiny run on this backbone.
    bundle_dir = work / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        tiny = work / "tiny-photos"
        for p in names[:3]:
            (tiny / p).mkdir(parents=True, exist_ok=True)
            for f in everyone[p][:8]:
                if not (tiny / p / f.name).exists():
                    (tiny / p / f.name).symlink_to(f)
        _run(["train", "--photos", str(tiny), "--out", str(work / "tiny-run"), "--backbone", str(backbone),
              "--force", "-q"], work / "tiny-train.log")
        _run(["convert", "--run", str(work / "tiny-run"), "--out", str(bundle_dir), "--force"], work / "convert.log")
    clf = FaceClassifier(load_bundle(bundle_dir), num_threads=1)

    def embed_photos(paths: list[Path], variant: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of the photos with a subject face, mask of which photos had one)."""
        out, ok = [], []
        vr = np.random.default_rng(1)
        for path in paths:
            if variant is None:
                crop, _ = maker.crop_file(path)
            else:
                crop, _ = maker.crop_image(degrade(load_image(path), variant, vr))
            ok.append(crop is not None)
            if crop is not None:
                out.append(clf.raw(crop))
        return (np.stack(out) if out else np.zeros((0, 128), np.float32)), np.array(ok, bool)

    all_paths = [f for p in names for f in everyone[p]]
    all_labels = np.array([p for p in names for _ in everyone[p]])
    print(f"embedding {len(all_paths)} photos (int8, device code) …", file=sys.stderr)
    clean_emb, clean_ok = embed_photos(all_paths, None)
    variant_emb = {}
    if not args.no_variants:
        for v in VARIANTS:
            print(f"  variant {v} …", file=sys.stderr)
            variant_emb[v] = embed_photos(all_paths, v)

    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    shifts = []
    for split in range(args.splits):
        srng = np.random.default_rng(100 + split)
        order = list(srng.permutation(names))
        cohort_people, eval_people = order[:COHORT_PEOPLE], order[COHORT_PEOPLE:]
        cdir = work / f"cohort-faces-{split}"
        for p in cohort_people:
            (cdir / p).mkdir(parents=True, exist_ok=True)
            for f in everyone[p]:
                if not (cdir / p / f.name).exists():
                    (cdir / p / f.name).symlink_to(f)
        cfile = work / f"cohort-{split}.npz"
        if not cfile.is_file():
            _run(["train", "cohort", "--backbone", str(backbone), "--photos", str(cdir), "--max-per-person", "30"],
                 work / f"cohort-{split}.log")
            (backbone / cohort_mod.COHORT_FILE).replace(cfile)
        cohort = cohort_mod.load(cfile)
        eligible = [p for p in eval_people if len(everyone[p]) >= ENROLL + 2]
        for size in SIZES:
            for _ in range(args.draws):
                home = [str(p) for p in srng.choice(eligible, size, replace=False)]
                enrol_idx, probe_idx = [], []
                for p in home:
                    idx = np.flatnonzero((all_labels == p) & clean_ok)
                    srng.shuffle(idx)
                    enrol_idx += list(idx[:ENROLL])
                    probe_idx += list(idx[ENROLL:])
                stranger_mask = np.isin(all_labels, eval_people) & ~np.isin(all_labels, home)
                # clean_emb is indexed over photos with a face; map photo index → row
                row = np.cumsum(clean_ok) - 1
                own = clean_emb[row[enrol_idx]]
                own_labels = list(all_labels[enrol_idx])
                gallery = gallery_from(own, own_labels, home)
                cal = cohort_mod.calibrate(gallery, home, cohort, own, own_labels)
                household_only = cohort_mod.calibrate(gallery, home, None, own, own_labels)
                conditions = {"clean": (clean_emb, clean_ok)} | variant_emb
                for cond, (emb, ok) in conditions.items():
                    r = np.cumsum(ok) - 1
                    kp = [i for i in probe_idx if ok[i]]
                    sp = [i for i in np.flatnonzero(stranger_mask) if ok[i]]
                    kb, ks = best_match(emb[r[kp]], gallery, home)
                    sb, ss = best_match(emb[r[sp]], gallery, home)
                    known_right = np.mean([accept(b, s, cal["accept"]) == all_labels[i]
                                           for b, s, i in zip(kb, ks, kp, strict=True)]) if kp else np.nan
                    stranger_acc = float(np.mean(ss >= cal["accept"])) if sp else np.nan
                    entry = {"known": float(known_right), "strangers": stranger_acc,
                             "face_found": float(np.mean(ok[probe_idx])),
                             "household_only_strangers": float(np.mean(ss >= household_only["accept"])),
                             "cohort_far": cal["far"], "impostor_scores": cal["impostor_scores"]}
                    if cond == "clean":
                        shifts.append((cal["far"], stranger_acc))
                        # per visit: sequences of VISIT_FRAMES different photos of one stranger
                        by_person: dict[str, list[int]] = {}
                        for j, i in enumerate(sp):
                            by_person.setdefault(str(all_labels[i]), []).append(j)
                        people_s = [p for p, js in by_person.items() if len(js) >= VISIT_FRAMES]
                        named = 0
                        for _v in range(args.visits):
                            js = srng.choice(by_person[str(srng.choice(people_s))], VISIT_FRAMES, replace=False)
                            votes = [(accept(sb[j], float(ss[j]), cal["accept"]), float(ss[j])) for j in js]
                            named += visit_decision(votes)[0] != UNKNOWN
                        entry["stranger_visits_named"] = named / args.visits
                        kvisits = right_visits = 0
                        kby: dict[str, list[int]] = {}
                        for j, i in enumerate(kp):
                            kby.setdefault(str(all_labels[i]), []).append(j)
                        for p, js in kby.items():
                            if len(js) < VISIT_FRAMES:
                                continue
                            for _v in range(20):
                                pick = srng.choice(js, VISIT_FRAMES, replace=False)
                                votes = [(accept(kb[j], float(ks[j]), cal["accept"]), float(ks[j])) for j in pick]
                                kvisits += 1
                                right_visits += visit_decision(votes)[0] == p
                        entry["known_visits_right"] = right_visits / kvisits if kvisits else float("nan")
                    rows.setdefault((cond, size), []).append(entry)

    summary = []
    for (cond, size), entries in sorted(rows.items(), key=lambda kv: (kv[0][0] != "clean", kv[0])):
        def mean(key: str, entries=entries) -> float | None:
            vals = [e[key] for e in entries if key in e and not np.isnan(e[key])]
            return float(np.mean(vals)) if vals else None

        def worst(key: str, entries=entries) -> float | None:
            vals = [e[key] for e in entries if key in e and not np.isnan(e[key])]
            return float(np.max(vals)) if vals else None

        summary.append({"condition": cond, "household": size, "households": len(entries),
                        "known": mean("known"), "strangers": mean("strangers"), "strangers_worst": worst("strangers"),
                        "household_only_strangers": mean("household_only_strangers"),
                        "stranger_visits_named": mean("stranger_visits_named"),
                        "known_visits_right": mean("known_visits_right"), "face_found": mean("face_found"),
                        "impostor_scores": mean("impostor_scores")})
    ratio = [s / c for c, s in shifts if c and c > 0]
    result: dict[str, Any] = {
        "machine": machine(), "seconds": round(time.monotonic() - started, 1),
        "protocol": {"sizes": SIZES, "enrolled_photos": ENROLL, "draws": args.draws, "splits": args.splits,
                     "cohort_people": COHORT_PEOPLE, "visit_frames": VISIT_FRAMES, "visits": args.visits,
                     "target_far": cohort_mod.DEFAULT_TARGET_FAR, "margin": cohort_mod.STRANGER_MARGIN},
        "cohort_to_unseen_strangers_far_ratio": {"median": float(np.median(ratio)) if ratio else None,
                                                 "max": float(np.max(ratio)) if ratio else None},
        "rows": summary,
    }
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}%"

    headers = ["condition", "people", "known/photo", "strangers/photo", "worst draw", "household-only",
               "known/visit", "strangers/visit", "face found"]
    print(table(headers, [[r["condition"], r["household"], pct(r["known"]), pct(r["strangers"]),
                           pct(r["strangers_worst"]), pct(r["household_only_strangers"]),
                           pct(r["known_visits_right"]), pct(r["stranger_visits_named"]), pct(r["face_found"])]
                          for r in summary]))
    path = write_result("household" + (f"-{args.name}" if args.name else ""), result)
    print(f"cohort → unseen strangers FAR ratio: median {result['cohort_to_unseen_strangers_far_ratio']['median']}"
          f"; {result['seconds']:.0f} s on {machine().get('cpu', '')}; wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
