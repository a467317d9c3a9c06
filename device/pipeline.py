"""detect → align → classify on one frame, with per-stage timings: the path shared by
`device run`, `device eval`, the benchmarks and (for detect → align) training's crop maker.

Given the frame loop's tracker, `process` embeds only the faces that need it (device.tracker's
re-verification): a face continuing a decided track reuses that track's last recognition on most frames,
and is marked `reused`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.bundle import Bundle, require_people
from device.classifier import FaceClassifier, Prediction
from device.detector import Face, FaceDetector
from device.preprocess import align_face
from device.tracker import REVERIFY_EVERY, Tracker


@dataclass
class Recognition:
    face: Face
    crop: np.ndarray  # aligned uint8 RGB crop
    prediction: Prediction
    vector: np.ndarray | None = None  # the classifier's output (an embedding, or softmax probabilities)
    # True: not embedded in this frame; crop, prediction and vector are the track's last fresh ones (the face
    # and its box are this frame's). The tracker counts it as seen, never as a vote.
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
        continuing a decided track is embedded only every `reverify_every` frames or when it moved or its
        detection score drifted (Tracker.plan); otherwise its Recognition is the track's last one, `reused`.
        """
        t0 = time.perf_counter()
        faces = self.detector.detect(frame)
        t1 = time.perf_counter()
        planned = (tracker.plan([f.box for f in faces], [f.score for f in faces], reverify_every)
                   if tracker is not None else [None] * len(faces))
        todo = [i for i, slot in enumerate(planned) if slot is None or slot.reuse is None]
        crops = {i: align_face(frame, faces[i].keypoints, self.size, self.alignment) for i in todo}
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
                rec = Recognition(face, last.crop, last.prediction, last.vector, reused=True)
            recognitions.append(rec)
        return FrameResult(
            recognitions,
            {"detect": (t1 - t0) * 1e3, "align": (t2 - t1) * 1e3, "classify": (t3 - t2) * 1e3},
            embedded=len(todo),
        )
