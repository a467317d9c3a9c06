"""Model bundles: a directory with the classifier, the detector, labels and a manifest.

`convert/` writes bundles with `write_manifest`; the device loads them with `load_bundle`, which
checks the schema and every file's sha256 before anything runs.

manifest.json (schema 1):
    schema          1
    bundle_id       unique name of this bundle, reported in every event
    created         ISO 8601 UTC
    classifier      {file, kind: "softmax" | "embedding", quantization: "int8" | "float16" | "float32"}
    detector        {file}
    labels          {file, count}
    gallery         {file} (embedding kind only: .npz with `embeddings` (N, D) and `labels` (N,))
    cohort          {file} (embedding kind, optional: device.cohort's stranger embeddings, for enrolment)
    preprocessing   device.preprocess.Preprocessing as a dict
    thresholds      {accept: float in (0, 1], target_far: float, basis, impostor_scores …}: a face is a
                    known person only if its score (softmax probability, or cosine similarity to the
                    gallery) is >= accept (device.contract.accept)
    files           {name: sha256} for every file above
    metrics         free-form: float vs int8 agreement, validation accuracy, false-accept rate …

manifest.sha256 beside it holds the sha256 of manifest.json's bytes (`sha256sum -c` reads it): the
manifest checksums every other file, and this covers the manifest itself, so an edited threshold or a
damaged copy is refused instead of trusted. Bundles made before it existed load with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from device.contract import FACE_ONLY, UNKNOWN
from device.errors import UsageError
from device.preprocess import Preprocessing

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest.sha256"
# Crops smaller than this hold too little of a face to recognise, larger ones than any Pi model takes;
# outside it the manifest is damaged, not a model choice.
INPUT_SIZE_RANGE = (16, 1024)
CLASSIFIER_KINDS = ("softmax", "embedding")
QUANTIZATIONS = ("int8", "float16", "float32")


class BundleError(UsageError):
    """A bundle that is missing, corrupt or from an incompatible version; the message says the fix."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    labels: list[str]
    preprocessing: Preprocessing
    classifier_path: Path
    detector_path: Path
    kind: str
    accept_threshold: float
    gallery_embeddings: np.ndarray | None = None
    gallery_labels: list[str] = field(default_factory=list)
    cohort_path: Path | None = None  # embedding kind: the stranger cohort enrolment recalibrates on
    # embedding kind: how the gallery's faces were embedded (device.contract.FACE_ONLY, or ENROLLED_VIEWS:
    # face and mirror image, which turns on the classifier's second look)
    enrolled_views: str = FACE_ONLY

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])


def _require(manifest: dict[str, Any], key: str, path: Path) -> Any:
    if key not in manifest:
        raise BundleError(f"{path}: manifest has no {key!r}; rebuild the bundle with `python -m convert`")
    return manifest[key]


def _section(manifest: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = _require(manifest, key, path)
    if not isinstance(value, dict):
        raise BundleError(f"{path}: {key!r} is {type(value).__name__}, not an object; rebuild the bundle with "
                          "`python -m convert`")
    return value


def _number(value: Any) -> bool:
    # bool is an int to Python, but `accept: true` is a damaged manifest, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_manifest_sha256(root: Path, data: bytes) -> None:
    """Refuse a manifest that does not match manifest.sha256; warn when there is none (older bundles)."""
    path = root / MANIFEST_SHA256
    if not path.is_file():
        log.warning("%s has no %s (made by an older faceberry): its manifest cannot be verified; rebuild it with "
                    "`python -m convert` to cover it", root, MANIFEST_SHA256)
        return
    try:
        expected = path.read_text(encoding="ascii").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        expected = ""
    if expected != hashlib.sha256(data).hexdigest():
        raise BundleError(f"{root / MANIFEST} does not match {path}: manifest.json was edited or damaged; copy the "
                          "bundle again / rebuild with python -m convert")


def _check_preprocessing(data: dict[str, Any], path: Path) -> Preprocessing:
    try:
        prep = Preprocessing.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bad preprocessing ({exc}); rebuild the bundle") from exc
    low, high = INPUT_SIZE_RANGE
    size = prep.input_size
    if not _number(size) or not isinstance(size, int) or not low <= size <= high:
        raise BundleError(f"{path}: preprocessing.input_size is {size!r}, not a whole number of pixels in "
                          f"[{low}, {high}]; rebuild the bundle with `python -m convert`")
    for key in ("scale", "offset"):
        if not _number(getattr(prep, key)):
            raise BundleError(f"{path}: preprocessing.{key} is {getattr(prep, key)!r}, not a finite number; "
                              "rebuild the bundle with `python -m convert`")
    if prep.scale == 0:
        raise BundleError(f"{path}: preprocessing.scale is 0 (every face would look the same); rebuild the bundle")
    return prep


def read_labels(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read as UTF-8 text ({exc}); copy the bundle again") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(labels)) != len(labels):
        raise BundleError(f"{path}: duplicate labels")
    return labels


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load and verify a bundle directory; raises BundleError with a one-line reason and fix."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        if root.name == "current":  # a versions store's link (docs/PI.md): bundles arrive by deploy, not convert
            raise BundleError(f"bundle directory not found: {root} (no version deployed yet); add one with "
                              f"`faceberry deploy --bundle DIR --store {root.parent}`")
        raise BundleError(
            f"bundle directory not found: {root}; build one with `python -m convert --run RUN --out {root}`"
        )
    if not manifest_path.is_file():
        raise BundleError(
            f"{manifest_path} is missing: {root} is not a faceberry bundle; rebuild it with `python -m convert`"
        )
    try:
        data = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{manifest_path} cannot be read ({exc.strerror or exc}); fix its permissions") from None
    # Verified before parsing: the same bytes are checked and read, and damage gets the copy-again fix.
    _check_manifest_sha256(root, data)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or nesting deep enough to overflow
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); copy the bundle again") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} is not a JSON object; copy the bundle again")
    schema = _require(manifest, "schema", manifest_path)
    if not _number(schema) or schema != SCHEMA_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle schema {schema} is not supported by this faceberry (expects "
            f"{SCHEMA_VERSION}); rebuild the bundle or update faceberry"
        )
    bundle_id = _require(manifest, "bundle_id", manifest_path)
    if not isinstance(bundle_id, str) or not bundle_id.strip() or "\n" in bundle_id:
        raise BundleError(f"{manifest_path}: bundle_id {bundle_id!r} is not a one-line name; rebuild the bundle")
    files = _section(manifest, "files", manifest_path)
    for name, expected in files.items():
        # A plain file name: "../x" or "/etc/x" would make the bundle read (and enroll write) outside itself.
        if not name or Path(name).name != name or name in (".", "..") or not isinstance(expected, str):
            raise BundleError(f"{manifest_path}: files entry {name!r}: {expected!r} is not a file name in the bundle "
                              "with its sha256; rebuild the bundle with `python -m convert`")
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; copy the whole bundle directory again")
        if verify and sha256_file(path) != expected:
            raise BundleError(
                f"{path} does not match its sha256 in the manifest (corrupt or edited); copy the bundle again"
            )
    classifier = _section(manifest, "classifier", manifest_path)
    kind = classifier.get("kind")
    if not isinstance(kind, str) or kind not in CLASSIFIER_KINDS:
        raise BundleError(f"{manifest_path}: classifier kind {kind!r} is not one of {CLASSIFIER_KINDS}")
    quantization = classifier.get("quantization", "int8")
    if not isinstance(quantization, str) or quantization not in QUANTIZATIONS:
        raise BundleError(f"{manifest_path}: classifier quantization {quantization!r} is not one of {QUANTIZATIONS}; "
                          "rebuild the bundle")
    sections = ["classifier", "detector", "labels"] + (["gallery"] if kind == "embedding" else [])
    for section in sections:
        name = _section(manifest, section, manifest_path).get("file")
        if not isinstance(name, str) or name not in files:
            raise BundleError(f"{manifest_path}: {section} file {name!r} is not listed with a checksum")
    prep = _check_preprocessing(_section(manifest, "preprocessing", manifest_path), manifest_path)
    labels = read_labels(root / manifest["labels"]["file"])
    count = manifest["labels"].get("count", len(labels))
    if not _number(count) or count != len(labels):
        raise BundleError(f"{manifest_path}: labels.count is {count!r} but {manifest['labels']['file']} has "
                          f"{len(labels)} names; copy the bundle again or rebuild it with `python -m convert`")
    thresholds = _section(manifest, "thresholds", manifest_path)
    accept = thresholds.get("accept")
    # A threshold of 0 or below names every stranger as someone, NaN names nobody: refused by value,
    # since a bundle without manifest.sha256 (or one re-signed by hand) is not protected by a checksum.
    if not _number(accept) or not 0.0 < float(accept) <= 1.0:
        raise BundleError(f"{manifest_path}: thresholds.accept is {accept!r}, not a number in (0, 1]; rebuild the "
                          "bundle with `python -m convert` (or set recognition.threshold in the config)")
    target_far = thresholds.get("target_far", 0.05)
    # enroll recalibrates at this rate: 0 would ask for a threshold no stranger can reach, 1 lets all in.
    if not _number(target_far) or not 0.0 < float(target_far) < 1.0:
        raise BundleError(f"{manifest_path}: thresholds.target_far is {target_far!r}, not a number in (0, 1); "
                          "rebuild the bundle with `python -m convert`")
    bundle = Bundle(
        root=root,
        manifest=manifest,
        labels=labels,
        preprocessing=prep,
        classifier_path=root / classifier["file"],
        detector_path=root / manifest["detector"]["file"],
        kind=kind,
        accept_threshold=float(accept),
    )
    if kind == "embedding":
        gallery = _require(manifest, "gallery", manifest_path)
        gpath = root / gallery["file"]
        try:
            with np.load(gpath, allow_pickle=False) as data:
                raw = data["embeddings"]
                # float32 of a complex or a boolean array is silently something else: refused, not cast.
                if raw.dtype.kind not in "fiu":
                    raise ValueError(f"embeddings of dtype {raw.dtype}, not real numbers")
                bundle.gallery_embeddings = raw.astype(np.float32)
                bundle.gallery_labels = [str(v) for v in data["labels"]]
        # EOFError: an empty file; BadZipFile: a damaged one; TypeError: 0-d labels or a .npy, not an .npz.
        except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"{gpath}: unreadable gallery ({exc}); rebuild the bundle") from exc
        unknown = set(bundle.gallery_labels) - set(labels)
        if unknown:
            raise BundleError(f"{gpath}: gallery names people not in labels.txt: {sorted(unknown)[:3]}")
        emb = bundle.gallery_embeddings
        if emb.ndim != 2 or len(emb) != len(bundle.gallery_labels):
            raise BundleError(f"{gpath}: gallery embeddings have shape {emb.shape} for {len(bundle.gallery_labels)} "
                              "names; rebuild the bundle")
        with np.errstate(all="ignore"):  # an overflowing norm is an answer here, not a warning
            norms = np.linalg.norm(emb, axis=1) if emb.ndim == 2 else np.zeros(0)
        # A row whose float32 norm overflows normalises to zeros on the device, like an all-zero row.
        if len(emb) and (not np.all(np.isfinite(emb)) or not np.all(np.isfinite(norms)) or np.any(norms < 1e-6)):
            raise BundleError(f"{gpath}: gallery holds NaN, infinite, all-zero or overflowing entries; rebuild the "
                              "bundle or enroll those people again")
        bundle.enrolled_views = str(gallery.get("views", FACE_ONLY))
        cohort = manifest.get("cohort")
        if isinstance(cohort, dict) and cohort.get("file") in files:
            bundle.cohort_path = root / cohort["file"]
    return bundle


def people_of(bundle: Bundle) -> list[str]:
    """Who the bundle can recognise: the gallery's people (embedding), else the labels, without 'unknown'."""
    names = dict.fromkeys(bundle.gallery_labels) if bundle.kind == "embedding" else dict.fromkeys(bundle.labels)
    return [name for name in names if name != UNKNOWN]


def require_people(bundle: Bundle) -> None:
    """Refuse a bundle that can recognise nobody: every face would be 'unknown' (BundleError with the fix).

    Not part of `load_bundle`: `faceberry enroll` must open such a bundle to add the first person, which is
    the fix. Everything that serves a bundle (run, reload, deploy, check) goes through FacePipeline, which
    calls this.
    """
    if people_of(bundle):
        return
    named = [label for label in bundle.labels if label != UNKNOWN]
    if bundle.kind == "embedding":
        what = f"its gallery is empty (0 faces enrolled for the {len(named)} names in labels.txt)"
    else:
        what = "labels.txt names nobody"
    raise BundleError(f"{bundle.root}: {what}, so every face would be 'unknown'; enroll someone (`faceberry "
                      "enroll --name NAME --photos DIR`) or rebuild the bundle from a training run with photos "
                      "(`python -m convert`)")


def write_manifest(root: str | Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Fill in schema, created time, checksums and a bundle id; write manifest.json and manifest.sha256."""
    root = Path(root)
    out = dict(manifest)
    out["schema"] = SCHEMA_VERSION
    out.setdefault("created", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    out["files"] = {name: sha256_file(root / name) for name in files}
    if "bundle_id" not in out:
        combined = hashlib.sha256("".join(sorted(out["files"].values())).encode()).hexdigest()[:8]
        out["bundle_id"] = f"faceberry-{out['created'][:10]}-{combined}"
    data = (json.dumps(out, indent=2, sort_keys=True) + "\n").encode("utf-8")
    (root / MANIFEST).write_bytes(data)
    # The format of `sha256sum`, so `sha256sum -c manifest.sha256` checks a copy without faceberry.
    (root / MANIFEST_SHA256).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n", encoding="ascii")
    return out
