"""Where the face detector model comes from and where train/ and device/ find it."""

from __future__ import annotations

import os
from pathlib import Path

DETECTOR_FILENAME = "face_detection_short_range.tflite"
# sha256 of the BlazeFace short-range model inside the mediapipe 0.10.21 wheel.
DETECTOR_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"
MODELS_DIR = Path(__file__).resolve().parent


def default_detector_path() -> Path:
    """The detector path: $FACEBERRY_DETECTOR if set, else models/face_detection_short_range.tflite."""
    env = os.environ.get("FACEBERRY_DETECTOR")
    return Path(env) if env else MODELS_DIR / DETECTOR_FILENAME
