"""Who is this aligned face? The bundle's classifier (softmax head or embedder + gallery)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.bundle import Bundle
from device.preprocess import normalize
from device.runtime import ModelError, TFLiteModel

UNKNOWN = "unknown"


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
        if bundle.kind == "embedding":
            emb = np.asarray(bundle.gallery_embeddings, dtype=np.float32)
            self.gallery = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            self.gallery_labels = np.array(bundle.gallery_labels)

    def raw(self, crop: np.ndarray) -> np.ndarray:
        """The model's output vector for one crop: probabilities, or an L2-normalised embedding."""
        out = self.model.run(normalize(crop[None], self.prep))[0][0]
        if self.bundle.kind == "embedding":
            out = out / max(float(np.linalg.norm(out)), 1e-12)
        return out

    def decide(self, out: np.ndarray) -> Prediction:
        if self.bundle.kind == "embedding":
            if len(self.gallery) == 0:
                return Prediction(UNKNOWN, 0.0, UNKNOWN)
            sims = self.gallery @ out
            i = int(np.argmax(sims))
            best, score = str(self.gallery_labels[i]), float(sims[i])
        else:
            i = int(np.argmax(out))
            best, score = self.bundle.labels[i], float(out[i])
        label = best if (best != UNKNOWN and score >= self.threshold) else UNKNOWN
        return Prediction(label, score, best)

    def classify(self, crop: np.ndarray) -> Prediction:
        return self.decide(self.raw(crop))
