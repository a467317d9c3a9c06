"""`python -m device enroll`: add a person to an embedding bundle on the Pi, without retraining.

The photos go through exactly what `device run` does to a camera frame: BlazeFace → alignment →
the bundle's own (int8) embedder. The person's normalised mean embedding is added to the bundle's
gallery and their name to labels.txt; the manifest gets new checksums and a new bundle_id (the
content changed, and events name the bundle that produced them). The accept threshold is
recalibrated on the bundle's stranger cohort (device.cohort) for the new gallery — the cohort part of what
`convert` calibrated on (the Pi has no one's photos for leave-one-person-out or negatives);
a bundle without a cohort keeps its threshold (and enroll says so).

The new bundle is built in a sibling directory and swapped in by rename, so a crash leaves either
the old bundle or the new one, never a half-written one (if it stops between the two renames, the
old bundle sits in `.<name>.enroll-old` and the next enroll puts it back).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from device import cohort as cohort_mod
from device.bundle import BundleError, load_bundle, write_manifest
from device.classifier import FaceClassifier
from device.contract import IMAGE_SUFFIXES, UNKNOWN, UNREADABLE, centroid, list_images, subject_face
from device.detector import FaceDetector
from device.errors import UsageError
from device.preprocess import ALIGN_TEMPLATE_NAME, ImageError, align_face, load_image
from device.runtime import ModelError

log = logging.getLogger(__name__)

HELP = "add a person to an embedding bundle's gallery from a folder of their photos (no retraining)"
SUFFIXES = ", ".join(IMAGE_SUFFIXES)


class EnrollError(UsageError):
    """A problem with the input; the message names it and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="the embedding bundle directory to update in place")
    parser.add_argument("--name", required=True, help="the person's name, as it will appear in events")
    parser.add_argument("--photos", required=True, type=Path,
                        help=f"folder of photos ({SUFFIXES}) showing this person's face "
                        "(small background faces are fine)")
    parser.add_argument("--min-photos", type=int, default=3,
                        help="usable photos needed (default 3; 5–10 from different days and angles work best)")
    parser.add_argument("--min-face-size", type=int, default=40,
                        help="faces narrower than this many pixels are too small to use (default 40)")
    parser.add_argument("--replace", action="store_true",
                        help="the name is already enrolled: replace their gallery entry instead of refusing")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: LiteRT's choice)")


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _recover(bundle: Path) -> None:
    """Put back a bundle left half-swapped by an interrupted enroll."""
    old = bundle.parent / f".{bundle.name}.enroll-old"
    if old.is_dir() and not bundle.exists():
        os.rename(old, bundle)
        log.warning("restored %s from an interrupted enroll", bundle)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def usable_crops(
    photos: list[Path], detector: FaceDetector, size: int, min_face_size: int, alignment: str = ALIGN_TEMPLATE_NAME
) -> tuple[list[np.ndarray], list[tuple[Path, str]]]:
    """(aligned crops, [(photo, why it was refused)])."""
    crops, refused = [], []
    for path in photos:
        try:
            image = load_image(path)
        except ImageError as exc:
            refused.append((path, f"{UNREADABLE} ({exc})"))
            continue
        face, why = subject_face(detector.detect(image), min_face_size)
        if face is None:
            refused.append((path, why or "no face"))
        else:
            crops.append(align_face(image, face.keypoints, size, alignment))
    return crops, refused


def enroll(bundle_dir: Path, name: str, photos_dir: Path, min_photos: int = 3, min_face_size: int = 40,
           replace: bool = False, num_threads: int | None = None) -> dict:
    """Add `name` to the bundle; returns a summary. Raises EnrollError/BundleError/ModelError."""
    name = name.strip()
    if not name or "\n" in name or name.lower() == UNKNOWN:
        raise EnrollError(
            f"--name {name!r} is not usable (empty, multi-line or the reserved {UNKNOWN!r}); choose another name"
        )
    _recover(bundle_dir)
    bundle = load_bundle(bundle_dir)
    if bundle.kind != "embedding":
        raise EnrollError(
            f"{bundle_dir} is a {bundle.kind} bundle: its people are fixed in the network, so enroll cannot add one; "
            "retrain with the new person's photos (`python -m train ...`), or build an embedding bundle with "
            "`python -m train --backbone BACKBONE_DIR ...` to enroll people on the device"
        )
    if name in bundle.labels and not replace:
        raise EnrollError(f"{name!r} is already in {bundle_dir}; pass --replace to re-enroll them from these photos")
    if not photos_dir.is_dir():
        raise EnrollError(f"photos folder not found: {photos_dir}; pass a folder of {name}'s photos")
    photos = list_images(photos_dir)
    if not photos:
        raise EnrollError(f"no photos ({SUFFIXES}) in {photos_dir}; add photos of {name}")

    detector = FaceDetector(bundle.detector_path, num_threads=num_threads)
    classifier = FaceClassifier(bundle, num_threads=num_threads)
    crops, refused = usable_crops(
        photos, detector, bundle.preprocessing.input_size, min_face_size, bundle.preprocessing.alignment
    )
    for path, why in refused:
        print(f"refused {path}: {why}", file=sys.stderr)
    if len(crops) < min_photos:
        raise EnrollError(
            f"only {len(crops)} of {len(photos)} photos in {photos_dir} show one usable face (need {min_photos}; "
            "refused ones are listed above); add clear, front-facing photos of one person"
        )
    emb = np.stack([classifier.raw(c) for c in crops])
    entry = centroid(emb)
    # How this person's own photos score against the new entry, and how close they come to others:
    # a newcomer already matching someone else above the threshold is worth a warning.
    own = emb @ entry
    rival = None
    if len(classifier.gallery):
        others = [i for i, lbl in enumerate(classifier.gallery_labels) if lbl != name]
        if others:
            sims = emb @ classifier.gallery[others].T
            j = int(np.argmax(sims.mean(axis=0)))
            rival = (str(classifier.gallery_labels[others[j]]), float(sims.mean(axis=0)[j]))

    keep = [i for i, lbl in enumerate(bundle.gallery_labels) if lbl != name]
    # The classifier has checked the gallery's width; an empty gallery has no row to infer it from.
    old_emb = np.asarray(bundle.gallery_embeddings, dtype=np.float32).reshape(-1, len(entry))
    new_emb = np.concatenate([old_emb[keep], entry[None]])
    new_gallery_labels = [bundle.gallery_labels[i] for i in keep] + [name]
    labels = list(bundle.labels) + ([] if name in bundle.labels else [name])
    # A bigger household lets more strangers through one fixed threshold (a stranger has one more person
    # to resemble), so it is recalibrated on the bundle's stranger cohort (convert also had the people's own
    # photos and any negatives; the Pi has only the cohort).
    threshold, recalibrated = bundle.accept_threshold, None
    if bundle.cohort_path is not None:
        try:
            cohort = cohort_mod.load(bundle.cohort_path, new_emb.shape[1])
        except cohort_mod.CohortError as exc:
            raise EnrollError(str(exc)) from exc
        target = float(bundle.manifest["thresholds"].get("target_far", cohort_mod.DEFAULT_TARGET_FAR))
        recalibrated = cohort_mod.calibrate(new_emb, new_gallery_labels, cohort, target_far=target)
        threshold = recalibrated["accept"]

    manifest = json.loads(json.dumps(bundle.manifest))
    files = list(manifest["files"])
    parent_id = manifest.pop("bundle_id", None)
    manifest.pop("created", None)
    manifest["parent_bundle_id"] = parent_id
    manifest["labels"]["count"] = len(labels)
    if recalibrated is not None:
        manifest["thresholds"] = {"source": "recalibrated by `device enroll` on the bundle's stranger cohort",
                                  **{k: v for k, v in recalibrated.items() if k != "warnings"}}
    manifest.setdefault("enrolled", []).append({
        "name": name, "photos": len(crops), "refused": len(refused),
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })

    tmp = bundle_dir.parent / f".{bundle_dir.name}.enroll-{os.getpid()}"
    old = bundle_dir.parent / f".{bundle_dir.name}.enroll-old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle_dir, tmp)
    try:
        with open(tmp / manifest["gallery"]["file"], "wb") as fh:
            np.savez(fh, embeddings=new_emb, labels=np.array(new_gallery_labels, dtype=str))
        (tmp / manifest["labels"]["file"]).write_text("\n".join(labels) + "\n", encoding="utf-8")
        written = write_manifest(tmp, manifest, files)
        load_bundle(tmp)  # never swap in something the device would refuse
        for path in (tmp, *tmp.iterdir()):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        os.rename(bundle_dir, old)
        os.rename(tmp, bundle_dir)
    except BaseException:
        if old.is_dir() and not bundle_dir.exists():
            os.rename(old, bundle_dir)  # failed between the two renames: put the old bundle back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return {
        "name": name, "photos": len(crops), "refused": [str(p) for p, _ in refused],
        "bundle_id": written["bundle_id"], "parent_bundle_id": parent_id, "people": len(labels),
        "own_min_cosine": float(own.min()), "nearest_other": rival, "threshold": threshold,
        "previous_threshold": bundle.accept_threshold, "recalibrated": recalibrated is not None,
    }


def run(args: argparse.Namespace) -> int:
    try:
        result = enroll(Path(args.bundle), args.name, Path(args.photos), args.min_photos, args.min_face_size,
                        args.replace, args.threads)
    except (EnrollError, BundleError, ModelError, OSError) as exc:
        return _fail(str(exc) if not isinstance(exc, OSError) else f"{exc}; check the paths and permissions")
    print(f"enrolled {result['name']} from {result['photos']} photo(s) into {args.bundle} "
          f"({result['people']} people; bundle_id {result['bundle_id']}, was {result['parent_bundle_id']})")
    if result["refused"]:
        print(f"refused {len(result['refused'])} photo(s) without one usable face (listed above)")
    rival = result["nearest_other"]
    if rival and rival[1] >= result["threshold"]:
        print(f"warning: {result['name']}'s photos also score {rival[1]:.3f} against {rival[0]} (threshold "
              f"{result['threshold']:.3f}): they may be confused; enroll more varied photos", file=sys.stderr)
    if result["recalibrated"]:
        print(f"accept threshold {result['threshold']:.3f} (was {result['previous_threshold']:.3f}), "
              "recalibrated on the bundle's stranger cohort for the new gallery")
    else:
        print(f"warning: {args.bundle} has no stranger cohort: the threshold {result['threshold']:.3f} was kept; "
              "rebuild the bundle with a cohort (`python -m train cohort`, then train and convert) so strangers "
              "stay unknown",
              file=sys.stderr)
    print("restart `python -m device run` (or its systemd service) to load the new gallery")
    return 0
