"""`python -m train cohort`: the stranger cohort of a backbone, stored beside it as embeddings only.

    python -m train cohort --backbone backbones/faces --lfw                 # Labeled Faces in the Wild, ~5,700 people
    python -m train cohort --backbone backbones/faces --photos FACES_DIR    # any <person>/*.jpg folder

Every face goes through the device's own detector and alignment and the backbone's embedder; only the
embeddings are kept (BACKBONE_DIR/cohort.npz, see faceberry.cohort). `python -m train --backbone` then
calibrates the accept threshold on them, `python -m convert` carries them into the bundle and
`python -m device enroll` recalibrates on them when a person is added.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from faceberry import cohort as cohort_mod
from faceberry.contract import list_images
from faceberry.device import cli
from faceberry.errors import UsageError
from faceberry.preprocess import Preprocessing
from faceberry.train.progress import progress_bar

log = logging.getLogger(__name__)


# A cohort of fewer people cannot say how strangers score; the threshold wants 1000+ impostor scores.
MIN_PEOPLE = 20
WANT_FACES = 1000
# LFW holds a few people with hundreds of photos (530 of one man): many people matter more than many photos.
LFW_PER_PERSON = 5
# Faces per embedding call: small enough that the bar moves every few seconds, large enough that the call's
# overhead does not show.
EMBED_BLOCK = 512


class CohortBuildError(UsageError, ValueError):
    """The cohort cannot be built from what was given; the message says the fix."""


HELP = "embed a stranger cohort beside a backbone (calibrates `unknown`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.epilog = (f"A cohort needs at least {MIN_PEOPLE} people; the threshold wants {WANT_FACES}+ faces of hundreds "
                "of people (README: the stranger cohort).")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--backbone", required=True, type=Path,
                   help="the backbone directory (from `python -m train backbone`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--photos", type=Path,
                     help="folder of other people's faces (not your household), one sub-folder per person")
    src.add_argument("--lfw", action="store_true",
                     help="Labeled Faces in the Wild, ~5,700 people, downloaded once through scikit-learn's fetcher "
                     "(about 200 MB, into ~/scikit_learn_data or $SCIKIT_LEARN_DATA)")
    p.add_argument("--exclude", type=Path, default=None,
                   help="your photos folder: people with these folder names are left out of the cohort")
    p.add_argument("--per-person", "--max-per-person", dest="per_person", type=int, default=None,
                   help="faces kept per cohort person (default: every photo given with --photos; "
                   f"{LFW_PER_PERSON} with --lfw, whose few people with hundreds of photos would crowd out the rest)")
    p.add_argument("--max-faces", type=int, default=20000, help="faces kept in all (default 20000)")
    p.add_argument("--min-face-size", type=int, default=40, help="faces narrower than this are not used (default 40)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the order people are taken in, which decides who a --max-faces cut leaves out "
                   "(default 0)")


def build_parser() -> argparse.ArgumentParser:
    """`python -m train cohort`'s parser, as faceberry.device.cli's tree builds it."""
    return cli.build_parser(("train", "cohort"), at=("train", "cohort"), prog="python -m train cohort")


def download(url: str, dest: Path, progress: bool = True, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """`url` saved as `dest`, with a progress bar over the bytes read (of Content-Length when the server gives
    it). The bytes go to DEST.part first, so an interrupted download never leaves a `dest` that looks whole;
    with `sha256`, a file that does not match is deleted and refused. Network errors are raised as they come
    (OSError: URLError, HTTPError, a timeout) for the caller to say what to do."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            length = resp.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            with progress_bar(total, f"download {dest.name}", "B", enabled=progress, unit_scale=True,
                              unit_divisor=1024) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CohortBuildError(f"the download of {url} is damaged (its SHA-256 is not the expected one); "
                                   "run the command again")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _cannot_download(exc: OSError) -> CohortBuildError:
    reason = getattr(exc, "reason", None) or exc
    return CohortBuildError(
        f"cannot download LFW ({reason}; no network?): use --photos DIR with photos of people not in your "
        f"household, one sub-folder per person, at least {MIN_PEOPLE} people ({WANT_FACES}+ faces of hundreds "
        "of people are better), or run --lfw once on a machine with network and copy its scikit_learn_data/"
        "lfw_home here (to ~/scikit_learn_data or $SCIKIT_LEARN_DATA)")


def lfw_folder(progress: bool = True) -> Path:
    """LFW's <person>/*.jpg folder, downloaded when it is not there yet.

    The ~200 MB archive is downloaded here, with a progress bar (scikit-learn's fetcher shows none), to where
    the fetcher looks for it, under the fetcher's own name, URL and checksum; the fetcher then unpacks it and
    fetches its small pair lists. Only that is asked of it (a limit no one meets stops it before it loads a
    photo): its loader would decode all 13,233 photos into one float array, about 10 GB. The files are then read
    like any --photos folder, one at a time.
    """
    from sklearn.datasets import fetch_lfw_people, get_data_home

    try:
        from sklearn.datasets import _lfw  # private: the fetcher's own archive name, URL and checksum
        remote = _lfw.FUNNELED_ARCHIVE
    except (ImportError, AttributeError):  # a scikit-learn that moved it: its fetcher downloads, without a bar
        remote = None
    home = Path(get_data_home()) / "lfw_home"
    folder = home / "lfw_funneled"
    archive = home / (remote.filename if remote is not None else "lfw-funneled.tgz")
    if remote is not None and not folder.is_dir() and not archive.is_file():
        log.info("LFW: downloading %s (about 200 MB, once) into %s", remote.url, home)
        try:
            download(remote.url, archive, progress, remote.checksum)
        except OSError as exc:  # URLError, HTTPError, a timeout, a full disk
            raise _cannot_download(exc) from None
    if not folder.is_dir():
        log.info("LFW: unpacking %s", archive)
    try:
        fetch_lfw_people(min_faces_per_person=10**9, download_if_missing=True)
    except ValueError:
        pass  # "too restrictive": downloaded, nothing loaded
    except OSError as exc:
        raise _cannot_download(exc) from None
    if not folder.is_dir():
        raise CohortBuildError(f"LFW's photos are not in {folder} after the download; delete {folder.parent} and "
                               "run again")
    return folder


def select_photos(people: dict[str, list[Path]], exclude: set[str] | None,
                  seed: int = 0) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """({person: photos to read}, {"per_person": 0, "excluded": photos of excluded people, "excluded_people": n,
    "no_face": 0, "max_faces": 0}): every photo of every person not excluded (build_cohort reads them in name
    order up to --per-person faces), people in a seeded order so a --max-faces cut takes whole people at
    random."""
    excluded = {cohort_mod.same_name(n) for n in (exclude or set())}
    order = sorted(p for p, files in people.items() if files)
    np.random.default_rng(seed).shuffle(order)
    dropped = {"per_person": 0, "excluded": 0, "excluded_people": 0, "no_face": 0, "max_faces": 0}
    chosen: dict[str, list[Path]] = {}
    for name in order:
        files = people[name]
        if cohort_mod.same_name(name) in excluded:
            dropped["excluded_people"] += 1
            dropped["excluded"] += len(files)
            continue
        chosen[name] = files
    return chosen, dropped


def embed_faces(model, crops: list[np.ndarray], prep: Preprocessing, views: str, progress: bool = True) -> np.ndarray:
    """The crops' embeddings (faceberry.train.fewshot.embed), EMBED_BLOCK faces at a time: a bar that moves over
    up to --max-faces faces, and only one block of crops stacked at a time."""
    from faceberry.train.fewshot import embed

    parts = []
    with progress_bar(len(crops), "embedding cohort faces", "face", enabled=progress) as bar:
        for start in range(0, len(crops), EMBED_BLOCK):
            block = np.stack(crops[start:start + EMBED_BLOCK])
            parts.append(embed(model, block, prep, views))
            bar.update(len(block))
    return np.concatenate(parts)  # never empty: build_cohort refuses fewer than MIN_PEOPLE people first


def build_cohort(backbone: Path, photos: Path | None = None, lfw: bool = False, exclude: set[str] | None = None,
                 per_person: int | None = None, max_faces: int = 20000, min_face_size: int = 40,
                 seed: int = 0, progress: bool = True) -> tuple[cohort_mod.Cohort, dict]:
    """(the cohort, what was kept and dropped: {"photos", "kept", "per_person", "excluded_people", "no_face",
    "max_faces"}). `progress`: bars for the LFW download and the embedding (stderr)."""
    from faceberry.train.backbone_dir import load_embedder
    from faceberry.train.crops import CropMaker, default_cache_dir, list_people

    if lfw:
        photos = lfw_folder(progress)
        per_person = LFW_PER_PERSON if per_person is None else per_person
    model, bconfig = load_embedder(backbone)
    prep = Preprocessing.from_dict(bconfig["preprocessing"])
    maker = CropMaker(prep.input_size, cache_dir=default_cache_dir(), min_face_size=min_face_size,
                      alignment=prep.alignment)
    # The cap is on usable faces, not photos: a person's photos are read in name order until they gave
    # `per_person` faces, so photos without a face do not leave the person short.
    chosen, dropped = select_photos(list_people(photos), exclude, seed)
    crops: list[np.ndarray] = []
    names: list[str] = []
    per: dict[str, int] = {}
    for name, paths in chosen.items():
        for path in paths:
            if len(crops) >= max_faces:
                dropped["max_faces"] += 1
                continue
            if per_person is not None and per.get(name, 0) >= per_person:
                dropped["per_person"] += 1
                continue
            crop, _ = maker.crop_file(path)
            if crop is None:
                dropped["no_face"] += 1
                continue
            crops.append(crop)
            names.append(name)
            per[name] = per.get(name, 0) + 1
            if len(crops) % 500 == 0:
                log.info("cohort: %d faces of %d people so far", len(crops), len(per))
    if len(set(names)) < MIN_PEOPLE:
        raise CohortBuildError(
            f"only {len(set(names))} people with a usable face: a stranger cohort needs at least {MIN_PEOPLE} "
            f"({WANT_FACES}+ faces of hundreds of people are better); pass a bigger --photos folder or use --lfw")
    from faceberry.contract import enrolled_views

    views = enrolled_views(bconfig.get("arch"))
    log.info("cohort: embedding %d faces of %d people", len(crops), len(per))
    cohort = cohort_mod.build(embed_faces(model, crops, prep, views, progress), names, views)
    return cohort, {"photos": sum(len(v) for v in chosen.values()) + dropped["excluded"],
                    "kept": len(crops), **dropped}


def main(argv: list[str] | None = None) -> int:
    """`python -m train cohort ARGS` from Python: `faceberry train cohort ARGS` (faceberry.device.cli)."""
    return cli.main(argv, prog="python -m train cohort", at=("train", "cohort"))


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    exclude = set()
    if args.exclude and args.exclude.is_dir():
        exclude = {d.name for d in args.exclude.iterdir() if d.is_dir()}
    if args.per_person is not None and args.per_person < 1:
        raise CohortBuildError("--per-person must be 1 or more (leave it out to keep every photo)")
    if args.photos is not None and not args.photos.is_dir():
        raise CohortBuildError(f"--photos {args.photos} is not a folder; pass a folder of <person>/*.jpg")
    if args.photos is not None and not any(list_images(d) for d in args.photos.iterdir() if d.is_dir()):
        raise CohortBuildError(f"no <person>/ photo folders in {args.photos}; put each person's photos in a "
                               "sub-folder")
    # A BackboneError or CohortBuildError (exit 2) is printed by faceberry.device.cli.
    try:
        # No -q here: --log-level WARNING (or above) is this command's quiet, for the bars too.
        cohort, kept = build_cohort(args.backbone, args.photos, args.lfw, exclude, args.per_person, args.max_faces,
                                    args.min_face_size, args.seed, progress=log.isEnabledFor(logging.INFO))
    except OSError as exc:  # on the workstation, a path of the user's own: not a case for sudo
        raise CohortBuildError(f"{exc}; check the paths and permissions") from exc
    out = args.backbone / cohort_mod.COHORT_FILE
    cohort.save(out)
    print(f"stranger cohort → {out}: {len(cohort)} faces of {cohort.people} people, from {kept['photos']} photos "
          f"({time.monotonic() - started:.0f} s); `python -m train --backbone {args.backbone}` calibrates on it")
    why = {"per_person": f"photos not read, their person had --per-person {args.per_person or LFW_PER_PERSON} faces",
           "excluded": "photos of people in --exclude", "no_face": "photos without one usable face",
           "max_faces": f"photos over --max-faces {args.max_faces}"}
    left = [f"{n} {why[k]}" for k, n in kept.items() if k in why and n]
    if left:
        print(f"not used: {'; '.join(left)}")
    if len(cohort) < WANT_FACES:
        print(f"warning: {len(cohort)} faces is a small cohort: the threshold wants {WANT_FACES}+ faces of hundreds "
              "of people to say how strangers score; add people to --photos (every photo is kept unless you pass "
              "--per-person), or use --lfw (~5,700 people, one 200 MB download)", file=sys.stderr)
    return 0
