"""Who is this aligned face? The bundle's classifier, scored by its kind's head (faceberry.heads), chosen once
from the manifest:

  softmax    a network whose output is one probability per label (the card's MobileNetV2 fine-tune);
  embedding  an embedder whose unit-length output is matched by cosine to the gallery's people.

Both end in the same rule, faceberry.contract.accept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceberry.bundle import Bundle
from faceberry.contract import (
    ENROLLED_VIEWS,
    UNKNOWN,
    accept,
    embed_enrolled,
    mirror_mean,
    mirrored,
    needs_second_look,
)
from faceberry.preprocess import normalize
from faceberry.runtime import ModelError, TFLiteModel

__all__ = ["UNKNOWN", "FaceClassifier", "Prediction"]


@dataclass
class Prediction:
    label: str  # a person from the bundle's labels, or "unknown"
    score: float  # softmax probability, or cosine similarity to the best gallery match
    best: str  # the best candidate even when rejected, for diagnostics and eval


class FaceClassifier:
    """Runs the bundle's classifier on aligned uint8 RGB crops."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None) -> None:
        self.bundle = bundle
        self.prep = bundle.preprocessing
        self.model = TFLiteModel(bundle.classifier_path, num_threads=num_threads)
        size = self.prep.input_size
        if self.model.input_shape[1:3] != (size, size):
            raise ModelError(
                f"{bundle.classifier_path} takes {self.model.input_shape[1:3]} but the manifest says "
                f"{size}×{size}; rebuild the bundle with `python -m convert`"
            )
        self.threshold = bundle.accept_threshold
        self.backend = bundle.head.scorer(bundle, int(self.model.output_shape[-1]))
        self.views = bundle.head.views(bundle)
        # A gallery of face+mirror embeddings is matched with the second look (faceberry.contract.SECOND_LOOK).
        self.second_look = self.views == ENROLLED_VIEWS

    @property
    def gallery(self) -> np.ndarray:
        """The gallery's unit rows (N, D); (0, D) for a head without one (softmax)."""
        return self.backend.gallery

    @property
    def gallery_labels(self) -> np.ndarray:
        return self.backend.labels

    def raw(self, crop: np.ndarray) -> np.ndarray:
        """The model's output vector for one crop: probabilities, or an L2-normalised embedding."""
        return self.backend.output(self.model.run(normalize(crop[None], self.prep))[0][0])

    def enrolled(self, crop: np.ndarray) -> np.ndarray:
        """An enrolled photo's embedding, made as the bundle's gallery and cohort were (its views)."""
        return embed_enrolled(self.raw, crop, self.views)

    def decide(self, out: np.ndarray) -> Prediction:
        best, score = self.backend.best(out)
        return Prediction(accept(best, score, self.threshold), score, best)

    def look(self, crop: np.ndarray) -> tuple[np.ndarray, Prediction]:
        """(the vector decided on, the decision) for a camera face; mirrored too when its score is near the
        threshold."""
        vector = self.raw(crop)
        pred = self.decide(vector)
        if self.second_look and needs_second_look(pred.score, self.threshold):
            vector = mirror_mean(vector, self.raw(mirrored(crop)))
            pred = self.decide(vector)
        return vector, pred

    def classify(self, crop: np.ndarray) -> Prediction:
        return self.look(crop)[1]
