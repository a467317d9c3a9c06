"""detect → align → classify on one frame, with per-stage timings: the path shared by
`device run`, `device eval`, the benchmarks and (for detect → align) training's crop maker.

Given the frame loop's tracker, `process` embeds only the faces that need it (faceberry.device.recognition.tracker's
re-verification): a face continuing a decided track reuses that track's last recognition on most frames,
and is marked `reused`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from faceberry.bundle import Bundle, require_people
from faceberry.classifier import FaceClassifier, Prediction
from faceberry.detector import Face, FaceDetector
from faceberry.device.recognition.tracker import REVERIFY_EVERY, Tracker
from faceberry.preprocess import align_face

# Side of the grey thumbnail compared between frames (faceberry.device.recognition.tracker.REVERIFY_MIN_LIKENESS). At
# 32 the
# keypoints' wobble on a still, jittered face already cost correlation down to 0.85; at 16 it stays above 0.93.
APPEARANCE_SIZE = 16


def appearance(crop: np.ndarray) -> np.ndarray:
    """A face crop's appearance signature: its grey 16×16 thumbnail, zero mean, unit length, so that the
    dot product of two is their correlation (1: the same picture, up to brightness and contrast)."""
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(grey, (APPEARANCE_SIZE, APPEARANCE_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    thumb = thumb.ravel() - thumb.mean()
    return thumb / max(float(np.linalg.norm(thumb)), 1e-6)


@dataclass
class Recognition:
    face: Face
    crop: np.ndarray  # aligned uint8 RGB crop
    prediction: Prediction
    vector: np.ndarray | None = None  # the classifier's output (an embedding, or softmax probabilities)
    # True: not embedded in this frame; prediction and vector are the track's last fresh ones (the face, its
    # box and crop are this frame's). The tracker counts it as seen, never as a vote.
    reused: bool = False


@dataclass
class FrameResult:
    recognitions: list[Recognition]
    timings_ms: dict[str, float] = field(default_factory=dict)  # detect, align, classify
    embedded: int = 0  # faces the classifier ran on (the others reused their track's recognition)


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

    def process(self, frame: np.ndarray, tracker: Tracker | None = None,
                reverify_every: int = REVERIFY_EVERY) -> FrameResult:
        """All faces in an RGB uint8 frame, recognised.

        With `tracker` (the one whose `update()` gets this frame's observations next, in this order), a face
        continuing a decided track is embedded only every `reverify_every` frames, or when it moved, looks
        different or its detection score drifted (Tracker.plan); otherwise its Recognition reuses the track's
        last prediction and vector, marked `reused`.
        """
        t0 = time.perf_counter()
        faces = self.detector.detect(frame)
        t1 = time.perf_counter()
        crops = [align_face(frame, f.keypoints, self.size, self.alignment) for f in faces]
        planned = (tracker.plan([f.box for f in faces], [f.score for f in faces], reverify_every,
                                [appearance(c) for c in crops])
                   if tracker is not None else [None] * len(faces))
        todo = [i for i, slot in enumerate(planned) if slot is None or slot.reuse is None]
        t2 = time.perf_counter()
        looks = {i: self.classifier.look(crops[i]) for i in todo}
        t3 = time.perf_counter()
        recognitions = []
        for i, (face, slot) in enumerate(zip(faces, planned, strict=True)):
            if i in looks:
                vector, pred = looks[i]
                rec = Recognition(face, crops[i], pred, vector)
                if slot is not None:
                    slot.memo = rec
            else:
                last: Recognition = slot.reuse
                rec = Recognition(face, crops[i], last.prediction, last.vector, reused=True)
            recognitions.append(rec)
        return FrameResult(
            recognitions,
            {"detect": (t1 - t0) * 1e3, "align": (t2 - t1) * 1e3, "classify": (t3 - t2) * 1e3},
            embedded=len(todo),
        )
