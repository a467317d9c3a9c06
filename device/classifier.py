"""Who is this aligned face? The bundle's classifier: one back-end per kind, chosen once from the manifest.

  softmax    a network whose output is one probability per label (the card's MobileNetV2 fine-tune);
  embedding  an embedder whose unit-length output is matched by cosine to the gallery's people.

Both end in the same rule, device.contract.accept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.bundle import Bundle
from device.contract import (
    ENROLLED_VIEWS,
    FACE_ONLY,
    UNKNOWN,
    accept,
    embed_enrolled,
    l2_normalize,
    mirror_mean,
    mirrored,
    needs_second_look,
)
from device.preprocess import normalize
from device.runtime import ModelError, TFLiteModel

__all__ = ["UNKNOWN", "FaceClassifier", "Prediction"]


@dataclass
class Prediction:
    label: str  # a person from the bundle's labels, or "unknown"
    score: float  # softmax probability, or cosine similarity to the best gallery match
    best: str  # the best candidate even when rejected, for diagnostics and eval


class _Softmax:
    def __init__(self, bundle: Bundle, out_dim: int) -> None:
        self.labels = list(bundle.labels)
        if out_dim != len(self.labels):
            raise ModelError(f"{bundle.classifier_path} outputs {out_dim} classes but labels.txt has "
                             f"{len(self.labels)}; rebuild the bundle with `python -m convert`")

    def output(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def best(self, out: np.ndarray) -> tuple[str, float]:
        i = int(np.argmax(out))
        return self.labels[i], float(out[i])


class _Gallery:
    def __init__(self, bundle: Bundle, out_dim: int) -> None:
        emb = np.asarray(bundle.gallery_embeddings, dtype=np.float32)
        # An empty gallery (nobody enrolled yet) has no row to infer its width from.
        emb = emb.reshape(len(bundle.gallery_labels), -1) if emb.size else np.zeros((0, out_dim), np.float32)
        if len(emb) and emb.shape[1] != out_dim:
            raise ModelError(f"{bundle.root}: the gallery holds {emb.shape[1]}-d embeddings but the embedder gives "
                             f"{out_dim}-d; rebuild the bundle with `python -m convert` or enroll again")
        self.gallery = l2_normalize(emb)
        self.labels = np.array(bundle.gallery_labels)

    def output(self, raw: np.ndarray) -> np.ndarray:
        return l2_normalize(raw)

    def best(self, out: np.ndarray) -> tuple[str, float]:
        if len(self.gallery) == 0:
            return UNKNOWN, 0.0
        sims = self.gallery @ out
        i = int(np.argmax(sims))
        return str(self.labels[i]), float(sims[i])


_BACKENDS = {"softmax": _Softmax, "embedding": _Gallery}


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
        self.backend = _BACKENDS[bundle.kind](bundle, int(self.model.output_shape[-1]))
        self.views = bundle.enrolled_views if bundle.kind == "embedding" else FACE_ONLY
        # A gallery of face+mirror embeddings is matched with the second look (device.contract.SECOND_LOOK).
        self.second_look = self.views == ENROLLED_VIEWS

    @property
    def gallery(self) -> np.ndarray:
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
