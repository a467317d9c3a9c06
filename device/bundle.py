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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from device.preprocess import Preprocessing

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CLASSIFIER_KINDS = ("softmax", "embedding")
QUANTIZATIONS = ("int8", "float16", "float32")


class BundleError(RuntimeError):
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

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])


def _require(manifest: dict[str, Any], key: str, path: Path) -> Any:
    if key not in manifest:
        raise BundleError(f"{path}: manifest has no {key!r}; rebuild the bundle with `python -m convert`")
    return manifest[key]


def read_labels(path: Path) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(labels)) != len(labels):
        raise BundleError(f"{path}: duplicate labels")
    return labels


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load and verify a bundle directory; raises BundleError with a one-line reason and fix."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(
            f"bundle directory not found: {root}; build one with `python -m convert --run RUN --out {root}`"
        )
    if not manifest_path.is_file():
        raise BundleError(
            f"{manifest_path} is missing: {root} is not a faceberry bundle; rebuild it with `python -m convert`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); copy the bundle again") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} is not a JSON object; copy the bundle again")
    schema = _require(manifest, "schema", manifest_path)
    if schema != SCHEMA_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle schema {schema} is not supported by this faceberry (expects "
            f"{SCHEMA_VERSION}); rebuild the bundle or update faceberry"
        )
    files = _require(manifest, "files", manifest_path)
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; copy the whole bundle directory again")
        if verify and sha256_file(path) != expected:
            raise BundleError(
                f"{path} does not match its sha256 in the manifest (corrupt or edited); copy the bundle again"
            )
    classifier = _require(manifest, "classifier", manifest_path)
    kind = classifier.get("kind")
    if kind not in CLASSIFIER_KINDS:
        raise BundleError(f"{manifest_path}: classifier kind {kind!r} is not one of {CLASSIFIER_KINDS}")
    for section in ("classifier", "detector", "labels"):
        name = _require(manifest, section, manifest_path).get("file")
        if name not in files:
            raise BundleError(f"{manifest_path}: {section} file {name!r} is not listed with a checksum")
    try:
        prep = Preprocessing.from_dict(_require(manifest, "preprocessing", manifest_path))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: bad preprocessing ({exc}); rebuild the bundle") from exc
    labels = read_labels(root / manifest["labels"]["file"])
    thresholds = _require(manifest, "thresholds", manifest_path)
    accept = thresholds.get("accept") if isinstance(thresholds, dict) else None
    # A threshold of 0 or below names every stranger as someone, NaN names nobody: both pass a
    # checksum (the manifest is not checksummed), so they are refused here by value.
    if not isinstance(accept, (int, float)) or isinstance(accept, bool) or not 0.0 < float(accept) <= 1.0:
        raise BundleError(f"{manifest_path}: thresholds.accept is {accept!r}, not a number in (0, 1]; rebuild the "
                          "bundle with `python -m convert` (or set recognition.threshold in the config)")
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
                bundle.gallery_embeddings = data["embeddings"].astype(np.float32)
                bundle.gallery_labels = [str(v) for v in data["labels"]]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{gpath}: unreadable gallery ({exc}); rebuild the bundle") from exc
        unknown = set(bundle.gallery_labels) - set(labels)
        if unknown:
            raise BundleError(f"{gpath}: gallery names people not in labels.txt: {sorted(unknown)[:3]}")
        emb = bundle.gallery_embeddings
        if emb.ndim != 2 or len(emb) != len(bundle.gallery_labels):
            raise BundleError(f"{gpath}: gallery embeddings have shape {emb.shape} for {len(bundle.gallery_labels)} "
                              "names; rebuild the bundle")
        if len(emb) and (not np.all(np.isfinite(emb)) or np.any(np.linalg.norm(emb, axis=1) < 1e-6)):
            raise BundleError(f"{gpath}: gallery holds NaN, infinite or all-zero entries; rebuild the bundle or "
                              "enroll those people again")
        cohort = manifest.get("cohort")
        if isinstance(cohort, dict) and cohort.get("file") in files:
            bundle.cohort_path = root / cohort["file"]
    return bundle


def write_manifest(root: str | Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Fill in schema, created time, checksums and a bundle id, and write manifest.json."""
    root = Path(root)
    out = dict(manifest)
    out["schema"] = SCHEMA_VERSION
    out.setdefault("created", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    out["files"] = {name: sha256_file(root / name) for name in files}
    if "bundle_id" not in out:
        combined = hashlib.sha256("".join(sorted(out["files"].values())).encode()).hexdigest()[:8]
        out["bundle_id"] = f"faceberry-{out['created'][:10]}-{combined}"
    (root / MANIFEST).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
