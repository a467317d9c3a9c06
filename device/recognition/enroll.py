"""`python -m device enroll`: add a person to an embedding bundle on the Pi, without retraining.

The photos go through exactly what `device run` does to a camera frame: BlazeFace → alignment →
the bundle's own (int8) embedder. The person's normalised mean embedding is added to the bundle's
gallery and their name to labels.txt; the manifest gets new checksums and a new bundle_id (the
content changed, and events name the bundle that produced them). The accept threshold is
recalibrated on the bundle's stranger cohort (faceberry.cohort) for the new gallery — the cohort part of what
`convert` calibrated on (the Pi has no one's photos for leave-one-person-out or negatives);
a bundle without a cohort keeps its threshold (and enroll says so).

On the Pi the bundle is a store's `current` link (faceberry.device.ops.store): enroll then writes a NEW version (a
copy of current with the person added, owned and moded so the service user can read it, verified before
it is renamed into place), switches `current` to it, prunes old versions and asks the running daemon to
reload (faceberry.device.ops.reloader), reporting what the daemon says. `faceberry rollback` undoes it.

A plain bundle directory is updated in place: the new bundle is built in a sibling directory and
swapped in by rename, so a crash leaves either the old bundle or the new one, never a half-written one
(if it stops between the two renames, the old bundle sits in `.<name>.enroll-old` and the next enroll
puts it back).

`enroll()` is the whole job without the reload, so the daemon itself can call it (then Service.reload()).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import unicodedata
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from faceberry import cohort as cohort_mod
from faceberry.bundle import load_bundle, write_manifest
from faceberry.classifier import FaceClassifier
from faceberry.contract import (
    IMAGE_SUFFIXES,
    SEVERAL_FACES,
    UNKNOWN,
    UNREADABLE,
    centroid,
    choose_subject,
    list_images,
    subject_candidates,
)
from faceberry.detector import FaceDetector
from faceberry.device.ops.reloader import add_store_arguments, read_setup, reload_and_report
from faceberry.device.ops.store import CURRENT, DEFAULT_ROOT, KEEP, BundleStore, store_for_bundle
from faceberry.device.outputs.events import sanitize_label
from faceberry.device.outputs.homeassistant import _object_id, label_id
from faceberry.errors import UsageError
from faceberry.preprocess import ALIGN_TEMPLATE_NAME, ImageError, align_face, load_image

log = logging.getLogger(__name__)

HELP = "add a person to an embedding bundle's gallery from a folder of their photos (no retraining)"
SUFFIXES = ", ".join(IMAGE_SUFFIXES)


class EnrollError(UsageError):
    """A problem with the input; the message names it and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None,
                        help="the embedding bundle: a store's `current` link (a new version is written) or a plain "
                        "directory (updated in place); default: the config's `bundle:`, else "
                        f"{DEFAULT_ROOT / CURRENT}")
    parser.add_argument("--name", required=True, help="the person's name, as it will appear in events")
    parser.add_argument("--photos", required=True, type=Path,
                        help=f"folder of photos ({SUFFIXES}) showing this person's face "
                        "(small background faces are fine; in a group photo, the face that agrees with the "
                        "other photos is used)")
    parser.add_argument("--min-photos", type=int, default=3,
                        help="usable photos needed (default 3; 5–10 from different days and angles work best)")
    parser.add_argument("--min-face-size", type=int, default=40,
                        help="faces narrower than this many pixels are too small to use (default 40)")
    parser.add_argument("--replace", action="store_true",
                        help="the name is already enrolled: replace their gallery entry instead of refusing")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: LiteRT's choice)")
    parser.add_argument("--keep", type=int, default=KEEP,
                        help=f"versions kept in the store besides current and previous (default {KEEP})")
    add_store_arguments(parser)


def _name_key(name: str) -> str:
    # What a name becomes in MQTT topics (sanitize_label) and Home Assistant unique ids (label_id), and
    # case-blind as Home Assistant's entity ids are: two names with one key would share a topic or an entity.
    return _object_id("", label_id(name)).casefold()


def name_problem(name: str, labels: Sequence[str], replace: bool = False) -> str | None:
    """Why `name` cannot be enrolled beside `labels` (None: it can); one line naming the fix.

    A name is refused when its topic level is nothing but `_` (`/`, `+#`, `..`), when it is the reserved
    `unknown` under another spelling, or when it maps to the topic or unique id of someone already enrolled
    (`Ann Lee` or `Ann_Lee/` beside `Ann_Lee`) unless it is that very name and `replace` is asked for.
    """
    topic = sanitize_label(name)
    if topic == "_" or not topic.strip("_"):
        return (f"the name {name!r} becomes {topic!r} in MQTT topics and Home Assistant ids (slashes, wildcards, "
                "spaces and control characters are replaced by _): choose a name with letters or digits")
    key = _name_key(name)
    if key == _name_key(UNKNOWN):
        return f"the name {name!r} stands for the reserved label {UNKNOWN!r}; choose another name"
    for label in labels:
        if label == name:
            if replace:
                continue
            return None  # the caller's own "already enrolled, pass --replace" says it better
        if _name_key(label) == key:
            if sanitize_label(label) == topic:
                same = f"the same MQTT topic as {label!r} (both become person/{topic})"
            elif sanitize_label(label).casefold() == topic.casefold():
                same = f"the same Home Assistant entity id as {label!r} (they differ only in case)"
            else:
                same = (f"the same Home Assistant unique id as {label!r} (letters outside A-Z, digits, _ and - "
                        f"become _: both become {_object_id('', label_id(name))[len('faceberry__'):]!r})")
            return (f"the name {name!r} maps to {same}, who is already enrolled; choose a name that differs in "
                    f"letters or digits, or re-enroll {label!r} under that exact name with --replace")
    return None


def _recover(bundle: Path) -> None:
    """Put back a bundle left half-swapped by an interrupted enroll."""
    old = bundle.parent / f".{bundle.name}.enroll-old"
    if old.is_dir() and not bundle.exists():
        os.rename(old, bundle)
        log.warning("restored %s from an interrupted enroll", bundle)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def usable_crops(
    photos: list[Path], detector: FaceDetector, size: int, min_face_size: int, alignment: str = ALIGN_TEMPLATE_NAME,
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[list[np.ndarray], list[tuple[Path, str]]]:
    """(aligned crops, [(photo, why it was refused)]).

    A photo with several faces of similar size gives the face that agrees with the other photos
    (faceberry.contract.choose_subject, the rule training uses) when `embed` (one crop → its enrolled
    embedding) is given; otherwise, or when it stays ambiguous, it is refused with the reason.
    """
    crops, refused = [], []
    pending: list[tuple[Path, list[np.ndarray], list[float], list[float]]] = []
    for path in photos:
        try:
            image = load_image(path)
        except ImageError as exc:
            refused.append((path, f"{UNREADABLE} ({exc})"))
            continue
        faces, why = subject_candidates(detector.detect(image), min_face_size)
        if not faces:
            refused.append((path, why or "no face"))
        elif why is None:
            crops.append(align_face(image, faces[0].keypoints, size, alignment))
        elif embed is None:
            refused.append((path, why))
        else:
            h, w = image.shape[:2]
            centre = np.array([w / 2.0, h / 2.0])
            pending.append((path, [align_face(image, f.keypoints, size, alignment) for f in faces],
                            [f.width for f in faces],
                            [float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2.0 - centre) / np.hypot(w, h))
                             for f in faces]))
    if pending:
        own = np.stack([embed(c) for c in crops]) if crops else np.zeros((0, 1), np.float32)
        for path, candidates, widths, offsets in pending:
            index, how = (choose_subject(np.stack([embed(c) for c in candidates]), own, widths, offsets)
                          if len(crops) else (None, f"{SEVERAL_FACES} (no other photo shows one clear face)"))
            if index is None:
                refused.append((path, how))
            else:
                crops.append(candidates[index])
    return crops, refused


def _store_of(bundle_dir: Path | None, store: BundleStore | str | Path | None) -> BundleStore | None:
    if isinstance(store, BundleStore):
        return store
    if store is not None:
        return BundleStore(store)
    if bundle_dir is None:
        return None
    root = store_for_bundle(bundle_dir)
    return BundleStore(root) if root is not None and bundle_dir.is_symlink() else None


def _resolve(bundle_dir: Path | str | None, store: BundleStore | str | Path | None,
             what: str) -> tuple[BundleStore | None, Path, Path]:
    """(the store or None, the bundle path to write through, the version to read): with a store, its `current`
    (read through the version it names now, even if it switches meanwhile); else the bundle directory, recovered
    from an interrupted write."""
    versions = _store_of(Path(bundle_dir) if bundle_dir is not None else None, store)
    if versions is not None:
        if versions.current() is None:
            raise EnrollError(f"{versions.root} has no current version {what}; deploy a bundle first "
                              "(`faceberry deploy --bundle DIR`)")
        return versions, versions.root / CURRENT, Path(os.path.realpath(versions.root / CURRENT))
    if bundle_dir is None:
        raise EnrollError("no bundle given; pass --bundle DIR (or --store ROOT)")
    _recover(Path(bundle_dir))
    return None, Path(bundle_dir), Path(bundle_dir)


def enroll(bundle_dir: Path | None, name: str, photos_dir: Path, min_photos: int = 3, min_face_size: int = 40,
           replace: bool = False, num_threads: int | None = None, store: BundleStore | str | Path | None = None,
           keep: int = KEEP, embeddings: np.ndarray | None = None, merge: bool = True) -> dict:
    """Add `name` to the bundle; returns a summary. Raises EnrollError/BundleError/ModelError/StoreError.

    `embeddings` (n, dim), instead of photos (`photos_dir` is then unused): another device's enrolment from the
    shared library (faceberry.device.messaging.library). A name already enrolled is then the same person: the
    entry becomes the centroid of their entry and these (no `replace` needed); with `merge=False` their entry is
    replaced by the centroid of these alone (the library recomputes a person from every live entry).

    With a store (`store`, or `bundle_dir` being a store's `current` link) a new version is written and
    `current` switched to it; the summary's `path` and `bundle_id` name it. Nothing is reloaded here.
    """
    # NFC: "Zoë" typed with a combining accent is the same person (and topic) as the precomposed one.
    name = unicodedata.normalize("NFC", name.strip())
    if not name or "\n" in name or name.lower() == UNKNOWN:
        raise EnrollError(
            f"--name {name!r} is not usable (empty, multi-line or the reserved {UNKNOWN!r}); choose another name"
        )
    versions, bundle_dir, source = _resolve(bundle_dir, store, "to enroll into")
    bundle = load_bundle(source)
    if embeddings is not None:
        replace = True  # merged below, never lost
    problem = name_problem(name, [*bundle.labels, *bundle.gallery_labels], replace)
    if problem:
        raise EnrollError(problem)
    refusal = bundle.head.enrolment_refusal(bundle, Path(bundle_dir))
    if refusal:
        raise EnrollError(refusal)
    if name in bundle.labels and not replace:
        raise EnrollError(f"{name!r} is already in {bundle_dir}; pass --replace to re-enroll them from these photos")
    classifier = FaceClassifier(bundle, num_threads=num_threads)
    if embeddings is not None:
        emb = np.asarray(embeddings, dtype=np.float32)
        width = int(classifier.gallery.shape[1]) if classifier.gallery.ndim == 2 else emb.shape[-1]
        if emb.ndim != 2 or not len(emb) or emb.shape[1] != width:
            raise EnrollError(f"embeddings of shape {emb.shape} do not fit this bundle's gallery (width {width}); "
                              "they were made by another embedder")
        crops, refused = list(emb), []
        own_rows = [i for i, lbl in enumerate(bundle.gallery_labels) if lbl == name] if merge else []
        merged = np.concatenate([np.asarray(bundle.gallery_embeddings, dtype=np.float32)[own_rows], emb]) \
            if own_rows else emb
        entry = centroid(merged)
    else:
        if not photos_dir.is_dir():
            raise EnrollError(f"photos folder not found: {photos_dir}; pass a folder of {name}'s photos")
        photos = list_images(photos_dir)
        if not photos:
            raise EnrollError(f"no photos ({SUFFIXES}) in {photos_dir}; add photos of {name}")

        detector = FaceDetector(bundle.detector_path, num_threads=num_threads)
        crops, refused = usable_crops(
            photos, detector, bundle.preprocessing.input_size, min_face_size, bundle.preprocessing.alignment,
            embed=classifier.enrolled,
        )
        for path, why in refused:
            print(f"refused {path}: {why}", file=sys.stderr)
        if len(crops) < min_photos:
            raise EnrollError(
                f"only {len(crops)} of {len(photos)} photos in {photos_dir} show one usable face (need {min_photos}; "
                "refused ones are listed above); add clear, front-facing photos of one person"
            )
        emb = np.stack([classifier.enrolled(c) for c in crops])
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

    new_emb, new_gallery_labels, labels = bundle.head.with_person(bundle, name, entry)
    # A bigger household lets more strangers through one fixed threshold (a stranger has one more person
    # to resemble), so it is recalibrated on the bundle's stranger cohort (convert also had the people's own
    # photos and any negatives; the Pi has only the cohort).
    threshold, recalibrated, manifest, files, parent_id = _next_manifest(bundle, new_emb, new_gallery_labels, labels)
    manifest.setdefault("enrolled", []).append({
        "name": name, "photos": len(crops), "refused": len(refused),
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })

    summary = {
        "name": name, "photos": len(crops), "refused": [str(p) for p, _ in refused],
        "parent_bundle_id": parent_id, "people": len(labels),
        "own_min_cosine": float(own.min()), "nearest_other": rival, "threshold": threshold,
        "previous_threshold": bundle.accept_threshold, "recalibrated": recalibrated is not None,
        # What the shared library publishes (faceberry.device.messaging.library): the embeddings and the
        # embedder that made them (the classifier file, unchanged by an enrolment).
        "embeddings": emb, "embedder": bundle.manifest["files"].get(bundle.manifest["classifier"]["file"]),
    }
    return {**summary, **_write(bundle_dir, source, versions, keep, manifest, files, new_emb, new_gallery_labels,
                                labels)}


def _next_manifest(bundle: Any, gallery: np.ndarray, gallery_labels: list[str],
                   labels: list[str]) -> tuple[float, dict | None, dict, list[str], str | None]:
    """(threshold, the recalibration or None, the new manifest, its files, the parent bundle_id) for `bundle`
    with this gallery: the threshold recalibrated on the bundle's stranger cohort when it has one."""
    threshold, recalibrated = bundle.accept_threshold, None
    if bundle.cohort_path is not None and len(gallery):
        try:
            cohort = cohort_mod.load(bundle.cohort_path, gallery.shape[1], views=bundle.enrolled_views)
        except cohort_mod.CohortError as exc:
            raise EnrollError(str(exc)) from exc
        target = float(bundle.manifest["thresholds"].get("target_far", cohort_mod.DEFAULT_TARGET_FAR))
        recalibrated = cohort_mod.calibrate(gallery, gallery_labels, cohort, target_far=target)
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
    return threshold, recalibrated, manifest, files, parent_id


def unenroll(bundle_dir: Path | None, name: str, store: BundleStore | str | Path | None = None,
             keep: int = KEEP) -> dict:
    """Remove `name` from the bundle's gallery and labels (a person forgotten: the shared library's `forget`),
    the threshold recalibrated for the smaller gallery; written as enroll writes. Raises EnrollError (not
    enrolled, a bundle that does not enrol), BundleError, StoreError."""
    name = unicodedata.normalize("NFC", name.strip())
    versions, bundle_dir, source = _resolve(bundle_dir, store, "to forget from")
    bundle = load_bundle(source)
    refusal = bundle.head.enrolment_refusal(bundle, Path(bundle_dir))
    if refusal:
        raise EnrollError(refusal)
    if name not in bundle.labels and name not in bundle.gallery_labels:
        raise EnrollError(f"{name!r} is not enrolled in {bundle_dir}; nothing to forget")
    kept = [i for i, lbl in enumerate(bundle.gallery_labels) if lbl != name]
    gallery = np.asarray(bundle.gallery_embeddings, dtype=np.float32)
    gallery = gallery[kept] if len(gallery) else gallery
    gallery_labels = [str(bundle.gallery_labels[i]) for i in kept]
    labels = [lbl for lbl in bundle.labels if lbl != name]
    threshold, recalibrated, manifest, files, parent_id = _next_manifest(bundle, gallery, gallery_labels, labels)
    # The manifest keeps no trace of a forgotten person (its schema has no place for one: the library has it).
    manifest["enrolled"] = [e for e in manifest.get("enrolled", []) if e.get("name") != name]
    summary = {"name": name, "parent_bundle_id": parent_id, "people": len(labels), "threshold": threshold,
               "previous_threshold": bundle.accept_threshold, "recalibrated": recalibrated is not None}
    return {**summary, **_write(bundle_dir, source, versions, keep, manifest, files, gallery, gallery_labels,
                                labels)}


def _write(bundle_dir: Path, source: Path, versions: BundleStore | None, keep: int, manifest: dict, files: list[str],
           gallery: np.ndarray, gallery_labels: list[str], labels: list[str]) -> dict:
    """Write the bundle `source` with this gallery and labels: a new version of the store (switched to), or the
    plain directory replaced by rename. Returns bundle_id, path, store and pruned."""
    def fill(tmp: Path) -> dict:
        with open(tmp / manifest["gallery"]["file"], "wb") as fh:
            np.savez(fh, embeddings=gallery, labels=np.array(gallery_labels, dtype=str))
        (tmp / manifest["labels"]["file"]).write_text("\n".join(labels) + "\n", encoding="utf-8")
        return write_manifest(tmp, manifest, files)

    if versions is not None:
        # Not just the pid: the daemon may run two enrolments at once (its Home Assistant helper).
        tmp = versions.incoming(f"{os.getpid()}-enroll-{secrets.token_hex(4)}")
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            fill(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        path = versions.add(tmp)  # owned, moded, fsynced and verified before it is renamed into place
        versions.switch(path.name)
        removed = versions.prune(keep)
        return {"bundle_id": path.name, "path": str(path), "store": str(versions.root),
                "pruned": removed}

    tmp = bundle_dir.parent / f".{bundle_dir.name}.enroll-{os.getpid()}"
    old = bundle_dir.parent / f".{bundle_dir.name}.enroll-old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle_dir, tmp)
    try:
        written = fill(tmp)
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
    return {"bundle_id": written["bundle_id"], "path": str(bundle_dir), "store": None, "pruned": []}


def run(args: argparse.Namespace) -> int:
    setup = read_setup(args.config)
    bundle = args.bundle
    if bundle is None and args.store is None:
        bundle = Path(setup.bundle) if setup.bundle else DEFAULT_ROOT / CURRENT
    # An EnrollError, BundleError, ModelError or StoreError (bad input, exit 2) and a PermissionError (run it
    # with sudo) are printed by faceberry.device.cli.
    try:
        result = enroll(bundle, args.name, Path(args.photos), args.min_photos, args.min_face_size,
                        args.replace, args.threads, store=args.store, keep=args.keep)
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise
        raise EnrollError(f"{exc}; check the paths and permissions") from exc
    where = f"a new version {result['path']}" if result["store"] else str(result["path"])
    print(f"enrolled {result['name']} from {result['photos']} photo(s) into {where} "
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
        print(f"warning: {result['parent_bundle_id']} has no stranger cohort: the threshold "
              f"{result['threshold']:.3f} was kept; rebuild the bundle with a cohort (`python -m train cohort`, "
              "then train and convert) so strangers stay unknown",
              file=sys.stderr)
    if result["store"]:
        print(f"current is {result['bundle_id']} (`faceberry rollback` returns to {result['parent_bundle_id']})")
        if result["pruned"]:
            print(f"removed old versions: {', '.join(result['pruned'])}")
    reports = reload_and_report(args, setup, Path(result["store"] or result["path"]), result["bundle_id"])
    return 0 if all(r.ok for r in reports) else 1
