"""detect → align → classify on one frame, with per-stage timings: the path shared by
`device run`, `device eval`, the benchmarks and (for detect → align) training's crop maker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.bundle import Bundle, require_people
from device.classifier import FaceClassifier, Prediction
from device.detector import Face, FaceDetector
from device.preprocess import align_face


@dataclass
class Recognition:
    face: Face
    crop: np.ndarray  # aligned uint8 RGB crop
    prediction: Prediction
    vector: np.ndarray | None = None  # the classifier's output (an embedding, or softmax probabilities)


@dataclass
class FrameResult:
    recognitions: list[Recognition]
    timings_ms: dict[str, float] = field(default_factory=dict)  # detect, align, classify


class FacePipeline:
    def __init__(
        self,
        bundle: Bundle,
        num_threads: int | None = None,
        min_face_size: int = 40,
        detector_path: Path | None = None,
        score_threshold: float = 0.5,
    ) -> None:
        # A pipeline serves: one that can only ever say 'unknown' is refused here, before any model loads.
        require_people(bundle)
        self.bundle = bundle
        self.detector = FaceDetector(
            detector_path or bundle.detector_path,
            score_threshold=score_threshold,
            min_face_size=min_face_size,
            num_threads=num_threads,
        )
        self.classifier = FaceClassifier(bundle, num_threads=num_threads)
        self.size = bundle.preprocessing.input_size
        self.alignment = bundle.preprocessing.alignment

    def process(self, frame: np.ndarray) -> FrameResult:
        """All faces in an RGB uint8 frame, recognised."""
        t0 = time.perf_counter()
        faces = self.detector.detect(frame)
        t1 = time.perf_counter()
        crops = [align_face(frame, f.keypoints, self.size, self.alignment) for f in faces]
        t2 = time.perf_counter()
        looks = [self.classifier.look(c) for c in crops]
        vectors, preds = [v for v, _ in looks], [p for _, p in looks]
        t3 = time.perf_counter()
        return FrameResult(
            [Recognition(f, c, p, v) for f, c, p, v in zip(faces, crops, preds, vectors, strict=True)],
            {"detect": (t1 - t0) * 1e3, "align": (t2 - t1) * 1e3, "classify": (t3 - t2) * 1e3},
        )
