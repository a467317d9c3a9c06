"""The typed JSON files train writes and convert (and train itself) reads back.

    RUN_DIR/config.json        RunConfig: how the run was made (kind, preprocessing, labels, backbone …)
    RUN_DIR/report.json        RunReport: what it measured, and the accept threshold convert starts from
    BACKBONE_DIR/config.json   BackboneConfig: the embedder's file, input and where it came from

pydantic models like the daemon's config (faceberry.device.config) and the bundle manifest (faceberry.bundle.Manifest):
unknown keys are refused, every field is described, and a problem is one line naming the file, the key and
the fix. Fields added in later releases have defaults, so files written before them still read. The
free-form records inside them (the command line's `args`, per-person rows, a calibration's record) are
kept as written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from faceberry.bundle import PreprocessingSection, describe_problem
from faceberry.errors import UsageError

CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
TRAIN_AGAIN = "train again"


class RunFileError(UsageError):
    """A training run's or backbone's JSON file that cannot be used; the message names the file, key and fix."""


class _Strict(BaseModel):
    # Not strict about types: these files are written by train itself (json keeps ints and floats apart
    # in ways Python does not), and a wrong type is still refused.
    model_config = ConfigDict(extra="forbid")


class DetectorUsed(_Strict):
    path: str = Field(description="the face detector the crops were found with")
    min_face_size: int = Field(description="faces narrower than this (pixels) were skipped")


class RunBackbone(_Strict):
    """The network under the run: ImageNet MobileNetV2 (softmax) or a backbone directory (embedding)."""

    name: str | None = Field(None, description="softmax: the Keras application (MobileNetV2)")
    alpha: float | None = Field(None, description="MobileNetV2 width multiplier")
    weights: str | None = Field(None, description="softmax: the initial weights (imagenet, none or a file)")
    dir: str | None = Field(None, description="embedding: the backbone directory")
    arch: str | None = Field(None, description="embedding: the backbone's architecture")
    teacher: dict[str, Any] | None = Field(None, description="embedding: the distillation teacher's id and licence")
    source: dict[str, Any] | None = Field(None, description="embedding: the weights file a rebuilt backbone came from")
    weights_init: str | None = Field(None, description="embedding: how the backbone's weights were initialised")


class RunGallery(_Strict):
    file: str = Field(description="the run's gallery .npz")
    method: str | None = Field(None, description="how each person's entry was made")
    views: str = Field("face", description="how each face was embedded (faceberry.contract.enrolled_views)")


class RunCohort(_Strict):
    file: str = Field(description="the stranger cohort .npz the threshold was calibrated on")
    faces: int = Field(description="faces in the cohort")
    people: int = Field(description="people in the cohort")


class RunConfig(_Strict):
    """RUN_DIR/config.json."""

    kind: Literal["softmax", "embedding"] = Field(description="the classifier kind (faceberry.heads)")
    preprocessing: PreprocessingSection = Field(description="how the classifier expects its input")
    labels: list[str] = Field(description="the run's labels, in output order")
    embedding_dim: int | None = Field(None, description="embedding: the embedding's length")
    gallery: RunGallery | None = Field(None, description="embedding: the run's gallery")
    cohort: RunCohort | None = Field(None, description="embedding: the stranger cohort used, if any")
    backbone: RunBackbone | None = Field(None, description="the network under the run")
    detector: DetectorUsed | None = Field(None, description="the face detector used")
    args: dict[str, Any] = Field(default_factory=dict, description="the command line, as given")


class ReportThreshold(BaseModel):
    """The accept threshold and the calibration's own record (faceberry.train.calibrate or
    faceberry.cohort.calibrate)."""

    model_config = ConfigDict(extra="allow")
    accept: float = Field(description="the accept threshold on the float model")
    target_far: float = Field(0.05, description="the false-accept rate it was fitted for")


class RunReport(_Strict):
    """RUN_DIR/report.json."""

    kind: Literal["softmax", "embedding"] | None = Field(None, description="the classifier kind")
    threshold: ReportThreshold = Field(description="the accept threshold and how it was fitted")
    labels: list[str] = Field(default_factory=list, description="the run's labels")
    val_accuracy: float | None = Field(None, description="share of validation faces named right (top-1)")
    val_accepted_right: float | None = Field(None, description="share accepted as the right person")
    chance: float | None = Field(None, description="1 / people: what guessing scores")
    per_person: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per person: faces, accuracy")
    stranger_faces: int | None = Field(None, description="negative faces the threshold was checked on")
    stranger_false_accepts: int | None = Field(None, description="of them, named as someone")
    confusion: dict[str, Any] | None = Field(None, description="softmax: the confusion matrix at the threshold")
    best_epoch: dict[str, Any] | None = Field(None, description="softmax: the epoch whose weights were kept")
    backbone: dict[str, Any] | None = Field(None, description="embedding: the backbone used")
    skipped: dict[str, Any] | None = Field(None, description="photos skipped, by reason (skipped.json)")
    several_faces: dict[str, Any] | None = Field(None, description="embedding: photos of several faces")
    warnings: list[str] = Field(default_factory=list, description="what the user should know")
    train_seconds: float | None = Field(None, description="wall time of the run")
    split: dict[str, int] | None = Field(None, description="softmax: faces per split")
    cpu_count: int | None = Field(None, description="cores of the machine that trained it")


class BackboneConfig(_Strict):
    """BACKBONE_DIR/config.json (faceberry.train.backbone)."""

    kind: Literal["backbone"] = Field(description="always backbone")
    arch: str = Field("mobilenetv2", description="dlib-resnet-v1 or mobilenetv2 (older distilled backbones say none)")
    file: str = Field("embedder.keras", description="the Keras embedder in the directory")
    embedding_dim: int = Field(description="the embedding's length")
    normalised_output: bool = Field(False, description="whether the embedder's output is unit length already")
    preprocessing: PreprocessingSection = Field(description="how the embedder expects its input")
    input_size: int = Field(description="side of the aligned crop, pixels")
    alpha: float | None = Field(None, description="MobileNetV2 width multiplier (None for dlib's ResNet)")
    weights_init: str | None = Field(None, description="how the weights were initialised")
    source: dict[str, Any] | None = Field(None, description="dlib-resnet: the weights file it was rebuilt from")
    teacher: dict[str, Any] | None = Field(None, description="mobilenetv2: the teacher (id, licence, mean …)")
    loss: str | None = Field(None, description="mobilenetv2: the distillation loss")
    views: int | None = Field(None, description="mobilenetv2: teacher-labelled views per face")
    detector: DetectorUsed | None = Field(None, description="mobilenetv2: the face detector used")
    args: dict[str, Any] = Field(default_factory=dict, description="the command line, as given")


Model = TypeVar("Model", bound=BaseModel)


def read(path: Path, model: type[Model], fix: str = TRAIN_AGAIN) -> Model:
    """`path` parsed as `model`; RunFileError naming the file, the key and `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{path} cannot be read ({exc}); {fix}") from None
    except ValueError as exc:
        raise RunFileError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path} is not a JSON object; {fix}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RunFileError(describe_problem(errors[0], path, fix) + more) from None


def write_checked(path: Path, data: dict[str, Any], model: type[BaseModel]) -> None:
    """Write `data` after checking it against `model`: train never writes a file convert would refuse."""
    model.model_validate(data)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
