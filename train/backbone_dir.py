"""A backbone directory's format, shared by the ways of building one and by those who load one.

`python -m train backbone` (faceberry.train.backbone) is the command line; faceberry.train.dlib_port and
faceberry.train.distill write a
directory, faceberry.train.model, faceberry.train.fewshot and faceberry.train.cohort read one. They all import from
here, so the
command line can import its builders without them importing it back.

BACKBONE_DIR holds embedder.keras (normalised float32 crop → embedding, compared by cosine) and
config.json (preprocessing, input size, source or teacher, settings), plus the builders' reports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.errors import UsageError
from faceberry.train import run_files
from faceberry.train.run_files import BackboneConfig

EMBEDDER_FILE = "embedder.keras"
RECOMMENDED = "python -m train backbone --arch dlib-resnet --out backbones/faces"


class BackboneError(UsageError):
    """A problem with the user's input; the message names it and the fix."""


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def read_backbone_config(backbone_dir: str | Path) -> BackboneConfig:
    """A backbone directory's config.json, typed (faceberry.train.run_files.BackboneConfig); BackboneError with the
    fix."""
    root = Path(backbone_dir)
    cfg_path, model_path = root / run_files.CONFIG_FILE, root / EMBEDDER_FILE
    if not cfg_path.is_file() or not model_path.is_file():
        raise BackboneError(
            f"{root} is not a backbone directory (needs config.json and {EMBEDDER_FILE}); "
            f"build one with `{RECOMMENDED}` (seconds) and pass --backbone backbones/faces"
        )
    try:
        return run_files.read(cfg_path, BackboneConfig, fix=f"build the backbone again (`{RECOMMENDED}`)")
    except run_files.RunFileError as exc:
        raise BackboneError(str(exc)) from None


def load_embedder(backbone_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """(keras model, config.json as written, checked against BackboneConfig); BackboneError with the fix.

    read_backbone_config gives the typed config."""
    read_backbone_config(backbone_dir)
    root = Path(backbone_dir)
    config = json.loads((root / run_files.CONFIG_FILE).read_text(encoding="utf-8"))
    # Deferred: keras brings TensorFlow, which the command line's --help should not wait for.
    import keras

    return keras.models.load_model(root / EMBEDDER_FILE, compile=False), config


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise BackboneError(f"output directory {out} is not empty; choose another --out or pass --force")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
