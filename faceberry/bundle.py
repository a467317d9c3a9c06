"""Model bundles: a directory with the classifier, the detector, labels and a manifest.

`convert/` writes bundles with `write_manifest`; the device loads them with `load_bundle`, which
reads the manifest into the typed `Manifest` (pydantic: unknown keys refused, each value checked, every
problem one line naming the file and the key) and checks every file's sha256 before anything runs. The
classifier section is a union over the classifier kinds; its kind's head (faceberry.heads) owns the rest.

manifest.json (schema 1):
    schema          1
    bundle_id       unique name of this bundle, reported in every event
    created         ISO 8601 UTC
    classifier      {file, kind: "softmax" | "embedding", quantization: "int8" | "float16" | "float32"}
    detector        {file, expected_sha256}
    labels          {file, count}
    gallery         {file, source, views} (embedding kind only: .npz with `embeddings` (N, D) and `labels` (N,))
    cohort          {file} (embedding kind, optional: faceberry.cohort's stranger embeddings, for enrolment)
    preprocessing   faceberry.preprocess.Preprocessing as a dict
    thresholds      {accept: float in (0, 1], target_far: float, basis, impostor_scores …}: a face is a
                    known person only if its score (softmax probability, or cosine similarity to the
                    gallery) is >= accept (faceberry.contract.accept)
    files           {name: sha256} for every file above
    metrics         free-form: float vs int8 agreement, validation accuracy, false-accept rate …
    source          free-form: the run and backbone it was converted from
    parent_bundle_id, enrolled   written by enroll: the bundle it came from, [{name, photos, refused, at}]

manifest.sha256 beside it holds the sha256 of manifest.json's bytes (`sha256sum -c` reads it): the
manifest checksums every other file, and this covers the manifest itself, so an edited threshold or a
damaged copy is refused instead of trusted. Bundles made before it existed load with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import reprlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from faceberry.contract import FACE_ONLY
from faceberry.errors import UsageError
from faceberry.heads import (
    CLASSIFIER_KINDS,
    QUANTIZATIONS,
    ClassifierSection,
    CohortSection,
    GallerySection,
    Head,
    HeadError,
)
from faceberry.preprocess import TEMPLATES, Preprocessing

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest.sha256"
# Crops smaller than this hold too little of a face to recognise, larger ones than any Pi model takes;
# outside it the manifest is damaged, not a model choice.
INPUT_SIZE_RANGE = (16, 1024)
REBUILD = "rebuild the bundle with `python -m convert`"
__all__ = ["CLASSIFIER_KINDS", "QUANTIZATIONS", "Bundle", "BundleError", "Manifest", "load_bundle", "people_of",
           "require_people", "write_manifest"]


class BundleError(UsageError):
    """A bundle that is missing, corrupt or from an incompatible version; the message says the fix."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the manifest, typed ---------------------------------------------------------------------------------------
# A value the device acts on is judged by value too, not only by the checksum: a bundle without
# manifest.sha256 (or one re-signed by hand) is not protected by one.


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _accept(value: float) -> float:
    # A threshold of 0 or below names every stranger as someone, NaN names nobody.
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError("not a number in (0, 1]; rebuild the bundle with `python -m convert` (or set "
                         "recognition.threshold in the config)")
    return value


def _rate(value: float) -> float:
    # enroll recalibrates at this rate: 0 would ask for a threshold no stranger can reach, 1 lets all in.
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError("not a number in (0, 1)")
    return value


def _one_line_name(value: str) -> str:
    if not value.strip() or "\n" in value:
        raise ValueError("not a one-line name")
    return value


def _scale(value: float) -> float:
    if value == 0:
        raise ValueError("0 (every face would look the same)")
    return _finite(value)


def _alignment(value: str) -> str:
    if value not in TEMPLATES:
        raise ValueError(f"not known to this version (knows {sorted(TEMPLATES)}); upgrade faceberry on this machine")
    return value


def _file_names(files: dict[str, str]) -> dict[str, str]:
    for name in files:
        # A plain file name: "../x" or "/etc/x" would make the bundle read (and enroll write) outside itself.
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"entry {name!r} is not a file name in the bundle")
    return files


class _Part(BaseModel):
    # strict: `accept: true` or `input_size: "112"` is a damaged manifest, not 1.0 or 112.
    model_config = ConfigDict(extra="forbid", strict=True)


_DEFAULT_PREP = Preprocessing()


class PreprocessingSection(_Part):
    """How the classifier expects its input (faceberry.preprocess.Preprocessing)."""

    input_size: int = Field(_DEFAULT_PREP.input_size, ge=INPUT_SIZE_RANGE[0], le=INPUT_SIZE_RANGE[1],
                            description="side of the aligned square crop, pixels")
    color_order: str = Field(_DEFAULT_PREP.color_order, pattern="^(RGB|BGR)$", description="RGB or BGR")
    scale: Annotated[float, AfterValidator(_scale)] = Field(_DEFAULT_PREP.scale,
                                                            description="x_normalised = x * scale + offset")
    offset: Annotated[float, AfterValidator(_finite)] = Field(_DEFAULT_PREP.offset,
                                                              description="x_normalised = x * scale + offset")
    alignment: Annotated[str, AfterValidator(_alignment)] = Field(_DEFAULT_PREP.alignment,
                                                                  description="the alignment template's name")

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(**self.model_dump())


class DetectorSection(_Part):
    file: str = Field(description="the face detector's .tflite in the bundle")
    expected_sha256: str | None = Field(None, description="the detector the bundle was built with")


class LabelsSection(_Part):
    file: str = Field(description="labels.txt: one name a line")
    count: int | None = Field(None, ge=0, description="how many names labels.txt holds")


class Thresholds(_Part):
    """The accept rule's threshold and how it was fitted.

    Besides accept and target_far it keeps the calibration's own record as written (faceberry.train.calibrate,
    faceberry.cohort.calibrate): those keys change with the procedure and nothing acts on them.
    """

    model_config = ConfigDict(extra="allow", strict=True)
    accept: Annotated[float, AfterValidator(_accept)] = Field(
        description="a face is a known person only if its score is >= accept (faceberry.contract.accept)")
    target_far: Annotated[float, AfterValidator(_rate)] = Field(
        0.05, description="the false-accept rate the threshold is fitted for (enroll recalibrates at it)")


class Enrolment(_Part):
    name: str = Field(description="who was enrolled")
    photos: int = Field(description="photos used")
    refused: int = Field(description="photos refused")
    at: str = Field(description="when, ISO 8601 UTC")


class Manifest(_Part):
    """manifest.json (schema 1); see the module docstring."""

    schema_: int = Field(alias="schema", description="the manifest format's version")
    bundle_id: Annotated[str, AfterValidator(_one_line_name)] = Field(description="this bundle's unique name")
    created: str | None = Field(None, description="ISO 8601 UTC")
    parent_bundle_id: str | None = Field(None, description="the bundle enroll made this one from")
    classifier: ClassifierSection = Field(description="the classifier: its file, kind and quantization")
    detector: DetectorSection
    labels: LabelsSection
    gallery: GallerySection | None = Field(None, description="embedding bundles: the enrolled people")
    cohort: CohortSection | None = Field(None, description="embedding bundles, optional: the stranger cohort")
    preprocessing: PreprocessingSection
    thresholds: Thresholds
    files: Annotated[dict[str, str], AfterValidator(_file_names)] = Field(
        description="{file name: sha256} for every file of the bundle")
    metrics: dict[str, Any] = Field(default_factory=dict, description="free-form: what convert measured")
    source: dict[str, Any] | None = Field(None, description="free-form: the run and backbone it came from")
    enrolled: list[Enrolment] = Field(default_factory=list, description="people enroll added, in order")

    @property
    def head(self) -> Head:
        return self.classifier.head


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40


def _where(loc: tuple[Any, ...]) -> str:
    # A discriminated union puts the chosen kind in the path (classifier.softmax.file): it is not a key.
    parts = [str(p) for i, p in enumerate(loc) if not (i == 1 and loc[0] == "classifier" and p in CLASSIFIER_KINDS)]
    return ".".join("schema" if p == "schema_" else p for p in parts)


def describe_problem(err: Any, path: Path, fix: str = REBUILD) -> str:
    """One problem pydantic found in a JSON file, as a line naming the file, the key, the value and the fix."""
    where, error_type = _where(tuple(err["loc"])), err["type"]
    value = err.get("input")
    shown = _REPR.repr(value) if isinstance(value, (dict, list, str)) else repr(value)
    if error_type == "missing":
        return f"{path}: {'manifest' if path.name == MANIFEST else 'it'} has no {where!r}; {fix}"
    if error_type == "extra_forbidden":
        return f"{path}: unknown key {where!r} (not written by this faceberry); {fix} or update faceberry"
    if error_type in ("union_tag_invalid", "union_tag_not_found"):
        found = value.get("kind") if isinstance(value, dict) else None
        return f"{path}: {where or 'classifier'} kind {found!r} is not one of {CLASSIFIER_KINDS}; {fix}"
    if error_type == "value_error":
        message = str(err.get("ctx", {}).get("error", err["msg"]))
    elif error_type in ("dict_type", "model_type", "model_attributes_type"):
        message = f"{type(value).__name__}, not an object"
    else:
        message = err["msg"].replace("Input should be", "must be").replace("String should match pattern", "must match")
    return f"{path}: {where or '(top level)'} is {shown}, {message}" + ("" if ";" in message else f"; {fix}")


def parse_manifest(data: Any, path: Path) -> Manifest:
    """The typed manifest of a parsed manifest.json; BundleError naming the file and the field."""
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object; copy the bundle again")
    if "schema" not in data:
        raise BundleError(f"{path}: manifest has no 'schema'; {REBUILD}")
    schema = data["schema"]
    # Before the fields: a newer format's keys would only read as unknown ones.
    if isinstance(schema, bool) or schema != SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema {schema} is not supported by this faceberry (expects "
                          f"{SCHEMA_VERSION}); rebuild the bundle or update faceberry")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise BundleError(describe_problem(errors[0], path) + more) from None
    problems = manifest.head.check_sections(manifest)
    if problems:
        key, what = problems[0]
        raise BundleError(f"{path}: {key} {what}; {REBUILD}")
    return manifest


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]  # manifest.json as written (enroll copies it); `spec` is the typed reading
    labels: list[str]
    preprocessing: Preprocessing
    classifier_path: Path
    detector_path: Path
    head: Head  # the classifier kind's head (faceberry.heads), chosen from the manifest
    accept_threshold: float
    spec: Manifest
    gallery_embeddings: np.ndarray | None = None
    gallery_labels: list[str] = field(default_factory=list)
    cohort_path: Path | None = None  # embedding kind: the stranger cohort enrolment recalibrates on
    # embedding kind: how the gallery's faces were embedded (faceberry.contract.FACE_ONLY, or ENROLLED_VIEWS:
    # face and mirror image, which turns on the classifier's second look)
    enrolled_views: str = FACE_ONLY

    @property
    def bundle_id(self) -> str:
        return self.spec.bundle_id

    @property
    def kind(self) -> str:
        """The classifier kind as the manifest names it ("softmax" | "embedding"), for messages and reports."""
        return self.head.kind


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


def read_labels(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read as UTF-8 text ({exc}); copy the bundle again") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(labels)) != len(labels):
        raise BundleError(f"{path}: duplicate labels")
    return labels


def _read_manifest(root: Path) -> tuple[dict[str, Any], Manifest]:
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
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or nesting deep enough to overflow
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); copy the bundle again") from None
    return raw, parse_manifest(raw, manifest_path)


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load and verify a bundle directory; raises BundleError with a one-line reason and fix."""
    root = Path(root)
    manifest_path = root / MANIFEST
    raw, spec = _read_manifest(root)
    for name, expected in spec.files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; copy the whole bundle directory again")
        if verify and sha256_file(path) != expected:
            raise BundleError(
                f"{path} does not match its sha256 in the manifest (corrupt or edited); copy the bundle again"
            )
    head = spec.head
    named = [("classifier", spec.classifier.file), ("detector", spec.detector.file), ("labels", spec.labels.file),
             *head.files(spec)]
    for section, name in named:
        if name not in spec.files:
            raise BundleError(f"{manifest_path}: {section} file {name!r} is not listed with a checksum")
    labels = read_labels(root / spec.labels.file)
    count = spec.labels.count if spec.labels.count is not None else len(labels)
    if count != len(labels):
        raise BundleError(f"{manifest_path}: labels.count is {count!r} but {spec.labels.file} has "
                          f"{len(labels)} names; copy the bundle again or rebuild it with `python -m convert`")
    bundle = Bundle(
        root=root,
        manifest=raw,
        labels=labels,
        preprocessing=spec.preprocessing.preprocessing(),
        classifier_path=root / spec.classifier.file,
        detector_path=root / spec.detector.file,
        head=head,
        accept_threshold=float(spec.thresholds.accept),
        spec=spec,
    )
    try:
        head.load(bundle, spec)
    except HeadError as exc:
        raise BundleError(str(exc)) from exc
    return bundle


def people_of(bundle: Bundle) -> list[str]:
    """Who the bundle can recognise: the gallery's people (embedding), else the labels, without 'unknown'."""
    return bundle.head.people(bundle)


def require_people(bundle: Bundle) -> None:
    """Refuse a bundle that can recognise nobody: every face would be 'unknown' (BundleError with the fix).

    Not part of `load_bundle`: `faceberry enroll` must open such a bundle to add the first person, which is
    the fix. Everything that serves a bundle (run, reload, deploy, check) goes through FacePipeline, which
    calls this.
    """
    if people_of(bundle):
        return
    raise BundleError(f"{bundle.root}: {bundle.head.nobody(bundle)}, so every face would be 'unknown'; enroll "
                      "someone (`faceberry enroll --name NAME --photos DIR`) or rebuild the bundle from a training "
                      "run with photos (`python -m convert`)")


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
