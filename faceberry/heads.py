"""One head per classifier kind: the only place that knows what a bundle's classifier kind means.

A bundle's manifest says which kind its classifier is (`classifier.kind`); the typed manifest
(faceberry.bundle.Manifest) parses that section as one of the `ClassifierSection` models below, a
discriminated union, and the section names its head. Everything that differs between kinds is a
method of the head, chosen that once:

    softmax    a network whose output is one probability per label (the card's MobileNetV2 fine-tune).
               Its people are fixed in the network: no gallery, no enrolment.
    embedding  an embedder whose unit-length output is matched by cosine to the gallery's people
               (manifest sections `gallery`, and `cohort` for enrolment's recalibration).

What a head owns:
    manifest   its classifier section (`section`), the other manifest sections it needs (`owned`), the
               files they name (`files`) and what it loads from them (`load`)
    scoring    `scorer`: the model's raw output → (best candidate, score), decided by faceberry.contract.accept
    people     who it can recognise (`people`), and why nobody (`nobody`)
    enrolment  whether a person can be added on the device (`enrolment_refusal`) and the gallery after it
    verify     convert's check of the converted model against the float one (`verify`), the run's
               reference it needs (`run_reference`) and the sections it adds to a new bundle (`finish`)

Adding a kind is adding a section model and a head here, and registering both in `ClassifierSection`.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from faceberry import cohort as cohort_mod
from faceberry.contract import (
    FACE_ONLY,
    UNKNOWN,
    accept_all,
    best_class,
    best_match,
    gallery_from,
    l2_normalize,
)
from faceberry.runtime import ModelError

Quantization = Literal["int8", "float16", "float32"]
QUANTIZATIONS: tuple[str, ...] = ("int8", "float16", "float32")
GALLERY_FILE = "gallery.npz"


class HeadError(ValueError):
    """A head's manifest section or file that cannot be used; faceberry.bundle turns it into a BundleError."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Classifier(_Section):
    file: str = Field(description="the classifier's .tflite file in the bundle")
    quantization: Quantization = Field("int8", description="how the classifier was converted: int8, float16 or "
                                       "float32")


class SoftmaxSection(_Classifier):
    """`classifier` of a softmax bundle: one output per line of labels.txt."""

    kind: Literal["softmax"] = Field(description="softmax: one probability per label")

    @property
    def head(self) -> Head:
        return SOFTMAX


class EmbeddingSection(_Classifier):
    """`classifier` of an embedding bundle: an embedder matched by cosine to the `gallery` section's file."""

    kind: Literal["embedding"] = Field(description="embedding: cosine similarity to the gallery's people")

    @property
    def head(self) -> Head:
        return GALLERY


# The manifest's classifier section: pydantic picks the model by `kind`, and the model names the head.
ClassifierSection = Annotated[SoftmaxSection | EmbeddingSection, Field(discriminator="kind")]


class GallerySection(_Section):
    """`gallery` (embedding bundles): the enrolled people's embeddings."""

    file: str = Field(description=".npz with `embeddings` (N, D) and `labels` (N,)")
    source: str | None = Field(None, description="how the gallery was made (free text)")
    views: str = Field(FACE_ONLY, description="how each face was embedded (faceberry.contract.FACE_ONLY, or "
                       "ENROLLED_VIEWS: face and mirror image, which turns on the classifier's second look)")


class CohortSection(_Section):
    """`cohort` (embedding bundles, optional): faceberry.cohort's stranger embeddings, for enrolment."""

    file: str = Field(description="the cohort .npz in the bundle")


class BundleData(Protocol):
    """What a head reads and fills of a loaded bundle (faceberry.bundle.Bundle)."""

    root: Path
    labels: list[str]
    classifier_path: Path
    gallery_embeddings: np.ndarray | None
    gallery_labels: list[str]
    cohort_path: Path | None
    enrolled_views: str


class ManifestSections(Protocol):
    """The parts of the typed manifest a head looks at (faceberry.bundle.Manifest)."""

    gallery: GallerySection | None
    cohort: CohortSection | None
    files: dict[str, str]


class Scorer(Protocol):
    gallery: np.ndarray  # (N, D) unit rows; (0, D) when the head has no gallery
    labels: np.ndarray  # the gallery's names, one per row

    def output(self, raw: np.ndarray) -> np.ndarray: ...

    def best(self, out: np.ndarray) -> tuple[str, float]: ...


@dataclass
class Verification:
    """Convert's check of one conversion: both models' outputs on the run's validation and negative faces."""

    float_out: np.ndarray
    converted_out: np.ndarray
    truth: list[str]  # the person, or UNKNOWN for a negative face
    is_val: np.ndarray  # True for a validation face, False for a negative one
    labels: list[str]  # the run's labels
    threshold: float  # the training run's accept threshold
    target_far: float
    reference: tuple[np.ndarray, list[str]] | None  # the run's own gallery (run_reference)
    # The softmax run's threshold procedure (faceberry.train.calibrate.calibrate), to re-fit it on the converted
    # outputs;
    # None: keep the training threshold.
    refit: Callable[..., dict[str, Any]] | None = None


@dataclass
class Verified:
    agreement: dict[str, Any]
    threshold: float
    note: str


@dataclass
class BundleDraft:
    """What convert has staged when a head adds its own sections and files to a new bundle."""

    staging: Path
    run_dir: Path
    views: str  # how the run embedded its people (its config's gallery.views)
    manifest: dict[str, Any]
    files: list[str]
    recalibrate: bool
    # (crops) → enrolled embeddings with the converted model, as the device embeds them (views applied)
    embed: Callable[[np.ndarray, str], np.ndarray]
    crops: np.ndarray
    crop_labels: list[str]
    split: np.ndarray
    labels: list[str]
    reference: tuple[np.ndarray, list[str]] | None
    target_far: float
    threshold: float
    warn: Callable[[str], None]


class Head:
    kind: ClassVar[str]
    owned: ClassVar[tuple[str, ...]] = ()  # top-level manifest sections besides `classifier` that are its own
    required: ClassVar[tuple[str, ...]] = ()  # of those, the ones every bundle of the kind has
    # Its outputs are embeddings comparable by cosine (a photo's faces can be told apart by the person's
    # other photos, faceberry.contract.choose_subject).
    embeds: ClassVar[bool] = False

    def check_sections(self, manifest: ManifestSections) -> list[tuple[str, str]]:
        """Its sections present, the others absent; [(dotted key, problem)]."""
        problems = [(name, f"is missing (every {self.kind} bundle has one)") for name in self.required
                    if getattr(manifest, name) is None]
        problems += [(name, f"is only for {', '.join(h.kind for h in HEADS.values() if name in h.owned)} bundles, "
                      f"not {self.kind}") for name in ("gallery", "cohort")
                     if name not in self.owned and getattr(manifest, name) is not None]
        return problems

    def files(self, manifest: ManifestSections) -> list[tuple[str, str]]:
        """[(section, file name)] its sections name; each must be listed in the manifest's files."""
        return []

    def load(self, bundle: BundleData, manifest: ManifestSections) -> None:
        """Read its files into the bundle; HeadError naming the file and the fix."""

    def people(self, bundle: BundleData) -> list[str]:
        raise NotImplementedError

    def nobody(self, bundle: BundleData) -> str:
        """Why the bundle recognises nobody (a clause)."""
        raise NotImplementedError

    def views(self, bundle: BundleData) -> str:
        return FACE_ONLY

    def scorer(self, bundle: BundleData, out_dim: int) -> Scorer:
        raise NotImplementedError

    def enrolment_refusal(self, bundle: BundleData, where: Path) -> str | None:
        """Why nobody can be enrolled into this bundle on the device (None: they can)."""
        return None

    def with_person(self, bundle: BundleData, name: str, entry: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
        """(gallery embeddings, gallery names, labels) with `name` enrolled (heads that enrol)."""
        raise NotImplementedError(f"a {self.kind} bundle has no gallery to enrol into")

    def run_reference(self, run_dir: Path) -> tuple[np.ndarray, list[str]] | None:
        """What convert needs from the training run besides the model (the embedding run's gallery)."""
        return None

    def verify(self, check: Verification) -> Verified:
        raise NotImplementedError

    def finish(self, draft: BundleDraft) -> dict[str, Any]:
        """Its sections and files in the new bundle (draft.manifest and draft.files); returns the thresholds."""
        return dict(draft.manifest["thresholds"])


# --- softmax -----------------------------------------------------------------------------------------------


def softmax_decisions(probs: np.ndarray, labels: list[str], threshold: float) -> list[str]:
    return accept_all(*best_class(probs, labels), threshold)


class _SoftmaxScorer:
    def __init__(self, bundle: BundleData, out_dim: int) -> None:
        self.names = list(bundle.labels)
        if out_dim != len(self.names):
            raise ModelError(f"{bundle.classifier_path} outputs {out_dim} classes but labels.txt has "
                             f"{len(self.names)}; rebuild the bundle with `python -m convert`")
        # No gallery: its people are the network's outputs.
        self.gallery = np.zeros((0, out_dim), np.float32)
        self.labels = np.array([], dtype=str)

    def output(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def best(self, out: np.ndarray) -> tuple[str, float]:
        i = int(np.argmax(out))
        return self.names[i], float(out[i])


class SoftmaxHead(Head):
    kind = "softmax"

    def people(self, bundle: BundleData) -> list[str]:
        return [name for name in dict.fromkeys(bundle.labels) if name != UNKNOWN]

    def nobody(self, bundle: BundleData) -> str:
        return "labels.txt names nobody"

    def scorer(self, bundle: BundleData, out_dim: int) -> Scorer:
        return _SoftmaxScorer(bundle, out_dim)

    def enrolment_refusal(self, bundle: BundleData, where: Path) -> str | None:
        return (f"{where} is a {self.kind} bundle: its people are fixed in the network, so enroll cannot add one; "
                "retrain with the new person's photos (`python -m train ...`), or build an embedding bundle with "
                "`python -m train --backbone BACKBONE_DIR ...` to enroll people on the device")

    def verify(self, check: Verification) -> Verified:
        agreement = compare_softmax(check.float_out, check.converted_out, check.truth, check.labels, check.threshold,
                                    check.is_val)
        if check.refit is None:
            return Verified(agreement, check.threshold, "from the training run")
        # The device runs the converted model, so the threshold is re-fitted on its outputs with the same
        # procedure and target the training run used.
        is_val = check.is_val
        q_out = check.converted_out
        val_truth = [t for t, v in zip(check.truth, is_val, strict=True) if v]
        cal = check.refit(q_out[is_val], val_truth, q_out[~is_val], check.labels, check.target_far)
        agreement["float_threshold"] = check.threshold
        agreement["calibration"] = cal
        # What the device will do (converted model, its threshold) against the float model at the training
        # threshold.
        f_dec = softmax_decisions(check.float_out, check.labels, check.threshold)
        q_dec = softmax_decisions(q_out, check.labels, cal["accept"])
        agreement["decision_agreement_same_threshold"] = agreement["decision_agreement"]
        agreement["decision_agreement"] = float(np.mean([a == b for a, b in zip(f_dec, q_dec, strict=True)]))
        return Verified(agreement, cal["accept"], "recalibrated on the converted model's outputs")


# --- embedding (gallery) -----------------------------------------------------------------------------------


def gallery_decisions(emb: np.ndarray, gallery: np.ndarray, gallery_labels: list[str],
                      threshold: float) -> tuple[list[str], list[str]]:
    """(decision, nearest) per embedding: nearest gallery entry by cosine, unknown below threshold."""
    if len(emb) == 0 or len(gallery) == 0:
        return [UNKNOWN] * len(emb), [UNKNOWN] * len(emb)
    nearest, scores = best_match(emb, l2_normalize(gallery), gallery_labels)
    return accept_all(nearest, scores, threshold), nearest


class _GalleryScorer:
    def __init__(self, bundle: BundleData, out_dim: int) -> None:
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


class GalleryHead(Head):
    kind = "embedding"
    owned = ("gallery", "cohort")
    required = ("gallery",)
    embeds = True

    def files(self, manifest: ManifestSections) -> list[tuple[str, str]]:
        return [("gallery", manifest.gallery.file)] if manifest.gallery is not None else []

    def load(self, bundle: BundleData, manifest: ManifestSections) -> None:
        assert manifest.gallery is not None  # check_sections
        gpath = bundle.root / manifest.gallery.file
        try:
            with np.load(gpath, allow_pickle=False) as data:
                raw = data["embeddings"]
                # float32 of a complex or a boolean array is silently something else: refused, not cast.
                if raw.dtype.kind not in "fiu":
                    raise ValueError(f"embeddings of dtype {raw.dtype}, not real numbers")
                emb = raw.astype(np.float32)
                names = [str(v) for v in data["labels"]]
        # EOFError: an empty file; BadZipFile: a damaged one; TypeError: 0-d labels or a .npy, not an .npz.
        except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
            raise HeadError(f"{gpath}: unreadable gallery ({exc}); rebuild the bundle") from exc
        unknown = set(names) - set(bundle.labels)
        if unknown:
            raise HeadError(f"{gpath}: gallery names people not in labels.txt: {sorted(unknown)[:3]}")
        if emb.ndim != 2 or len(emb) != len(names):
            raise HeadError(f"{gpath}: gallery embeddings have shape {emb.shape} for {len(names)} names; rebuild "
                              "the bundle")
        with np.errstate(all="ignore"):  # an overflowing norm is an answer here, not a warning
            norms = np.linalg.norm(emb, axis=1)
        # A row whose float32 norm overflows normalises to zeros on the device, like an all-zero row.
        if len(emb) and (not np.all(np.isfinite(emb)) or not np.all(np.isfinite(norms)) or np.any(norms < 1e-6)):
            raise HeadError(f"{gpath}: gallery holds NaN, infinite, all-zero or overflowing entries; rebuild the "
                              "bundle or enroll those people again")
        bundle.gallery_embeddings, bundle.gallery_labels = emb, names
        bundle.enrolled_views = manifest.gallery.views
        if manifest.cohort is not None and manifest.cohort.file in manifest.files:
            bundle.cohort_path = bundle.root / manifest.cohort.file

    def people(self, bundle: BundleData) -> list[str]:
        return [name for name in dict.fromkeys(bundle.gallery_labels) if name != UNKNOWN]

    def nobody(self, bundle: BundleData) -> str:
        named = [label for label in bundle.labels if label != UNKNOWN]
        return f"its gallery is empty (0 faces enrolled for the {len(named)} names in labels.txt)"

    def views(self, bundle: BundleData) -> str:
        return bundle.enrolled_views

    def scorer(self, bundle: BundleData, out_dim: int) -> Scorer:
        return _GalleryScorer(bundle, out_dim)

    def with_person(self, bundle: BundleData, name: str, entry: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
        """(gallery embeddings, gallery names, labels) with `name`'s entry replaced or added last."""
        kept = [i for i, lbl in enumerate(bundle.gallery_labels) if lbl != name]
        # The classifier has checked the gallery's width; an empty gallery has no row to infer it from.
        old = np.asarray(bundle.gallery_embeddings, dtype=np.float32).reshape(-1, len(entry))
        embeddings = np.concatenate([old[kept], entry[None]])
        names = [bundle.gallery_labels[i] for i in kept] + [name]
        labels = list(bundle.labels) + ([] if name in bundle.labels else [name])
        return embeddings, names, labels

    def run_reference(self, run_dir: Path) -> tuple[np.ndarray, list[str]] | None:
        gpath = run_dir / GALLERY_FILE
        if not gpath.is_file():
            raise HeadError(f"{gpath} is missing: an embedding run needs its gallery; train again")
        with np.load(gpath, allow_pickle=False) as data:
            return data["embeddings"].astype(np.float32), [str(v) for v in data["labels"]]

    def verify(self, check: Verification) -> Verified:
        assert check.reference is not None  # run_reference
        gallery, names = check.reference
        agreement = compare_embedding(check.float_out, check.converted_out, check.truth, gallery, names,
                                      check.threshold, check.is_val)
        # The device's threshold is re-fitted on the converted embedder's gallery in `finish`.
        return Verified(agreement, check.threshold, "from the training run")

    def finish(self, draft: BundleDraft) -> dict[str, Any]:
        views = draft.views
        thresholds = dict(draft.manifest["thresholds"])
        source = "float model (training run)"
        if draft.recalibrate:
            source, thresholds = self._device_gallery(draft, views)
            draft.manifest["metrics"]["float_gallery_threshold"] = draft.threshold
        else:
            shutil.copyfile(draft.run_dir / GALLERY_FILE, draft.staging / GALLERY_FILE)
        draft.manifest["gallery"] = {"file": GALLERY_FILE, "source": source, "views": views}
        draft.files.append(GALLERY_FILE)
        if (draft.staging / cohort_mod.COHORT_FILE).is_file():
            draft.manifest["cohort"] = {"file": cohort_mod.COHORT_FILE}
            draft.files.append(cohort_mod.COHORT_FILE)
        return thresholds

    @staticmethod
    def _device_gallery(draft: BundleDraft, views: str) -> tuple[str, dict[str, Any]]:
        """The gallery and threshold the device will use, made as `device enroll` makes them.

        Every person's entry is faceberry.contract.centroid of the *converted* embedder's outputs on the
        run's crops — the same rule and the same network as a person enrolled on the Pi — and the threshold
        is calibrated on it with faceberry.cohort.calibrate (cohort, negatives, leave-one-person-out).
        """
        people_mask = draft.split != "negative"
        own = draft.embed(draft.crops[people_mask], views)
        own_labels = [lbl for lbl, m in zip(draft.crop_labels, people_mask, strict=True) if m]
        neg_mask = draft.split == "negative"
        negatives = draft.embed(draft.crops[neg_mask], views) if neg_mask.any() else None
        names = list((draft.reference[1] if draft.reference else None) or draft.labels)
        gallery = gallery_from(own, own_labels, names)
        cohort = None
        if (draft.run_dir / cohort_mod.COHORT_FILE).is_file():
            try:
                cohort = cohort_mod.load(draft.run_dir / cohort_mod.COHORT_FILE, own.shape[1], views=views)
            except cohort_mod.CohortError as exc:
                raise HeadError(str(exc)) from exc
            shutil.copyfile(draft.run_dir / cohort_mod.COHORT_FILE, draft.staging / cohort_mod.COHORT_FILE)
        cal = cohort_mod.calibrate(gallery, names, cohort, own, own_labels, negatives, draft.target_far)
        for warning in cal["warnings"]:
            draft.warn(warning)
        with open(draft.staging / GALLERY_FILE, "wb") as fh:
            np.savez(fh, embeddings=gallery, labels=np.array(names, dtype=str))
        thresholds = {"source": "calibrated on the converted embedder's gallery (faceberry.cohort.calibrate)",
                      **{k: v for k, v in cal.items() if k != "warnings"}}
        return "faceberry.contract.centroid of the converted embedder on the run's crops", thresholds


SOFTMAX = SoftmaxHead()
GALLERY = GalleryHead()
HEADS: dict[str, Head] = {head.kind: head for head in (SOFTMAX, GALLERY)}
CLASSIFIER_KINDS: tuple[str, ...] = tuple(HEADS)


# --- verification: the converted model against the float one ---------------------------------------------


def _pick(values: list[str], mask: np.ndarray) -> list[str]:
    return [v for v, m in zip(values, mask, strict=True) if m]


def _acc(pred: list[str], truth: list[str]) -> float | None:
    return float(np.mean([p == t for p, t in zip(pred, truth, strict=True)])) if truth else None


def paired_counts(float_pred: list[str], converted_pred: list[str], truth: list[str]) -> dict[str, int]:
    """Face by face: how many only the float model gets right, and how many only the converted one.

    The faces both get right or both get wrong say nothing about a difference between the two models
    (McNemar); the accuracy drop is (float_only_right - converted_only_right) / faces."""
    f_right = [p == t for p, t in zip(float_pred, truth, strict=True)]
    q_right = [p == t for p, t in zip(converted_pred, truth, strict=True)]
    return {"faces": len(truth),
            "float_only_right": sum(f and not q for f, q in zip(f_right, q_right, strict=True)),
            "converted_only_right": sum(q and not f for f, q in zip(f_right, q_right, strict=True))}


def compare_softmax(float_out: np.ndarray, q_out: np.ndarray, truth: list[str], labels: list[str],
                    threshold: float, is_val: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and accuracy on validation faces; decision agreement on validation + strangers."""
    f_top = [labels[i] for i in np.argmax(float_out, axis=1)]
    q_top = [labels[i] for i in np.argmax(q_out, axis=1)]
    val_truth = [t for t, v in zip(truth, is_val, strict=True) if v]
    f_val = [p for p, v in zip(f_top, is_val, strict=True) if v]
    q_val = [p for p, v in zip(q_top, is_val, strict=True) if v]
    f_dec = softmax_decisions(float_out, labels, threshold)
    q_dec = softmax_decisions(q_out, labels, threshold)
    return {
        "faces": int(is_val.sum()),
        "faces_with_strangers": len(truth),
        "paired": paired_counts(f_val, q_val, val_truth),
        "top1_agreement": _acc(q_val, f_val),
        "float_accuracy": _acc(f_val, val_truth),
        "converted_accuracy": _acc(q_val, val_truth),
        "decision_agreement": _acc(q_dec, f_dec),
        "max_abs_prob_diff": float(np.max(np.abs(float_out - q_out))) if len(truth) else None,
    }


def compare_embedding(float_out: np.ndarray, q_out: np.ndarray, truth: list[str], gallery: np.ndarray,
                      gallery_labels: Sequence[str], threshold: float, is_val: np.ndarray) -> dict[str, Any]:
    """Same accept/reject and person through the gallery; plus the float↔converted cosine."""
    f_dec, f_near = gallery_decisions(float_out, gallery, list(gallery_labels), threshold)
    q_dec, q_near = gallery_decisions(q_out, gallery, list(gallery_labels), threshold)
    val_truth = [t for t, v in zip(truth, is_val, strict=True) if v]
    cos = np.sum(l2_normalize(float_out) * l2_normalize(q_out), axis=1) if len(truth) else np.zeros(0)
    return {
        "faces": int(is_val.sum()),
        "faces_with_strangers": len(truth),
        "paired": paired_counts(_pick(f_near, is_val), _pick(q_near, is_val), val_truth),
        "top1_agreement": _acc(_pick(q_near, is_val), _pick(f_near, is_val)),
        "decision_agreement": _acc(q_dec, f_dec),
        # The gate is the nearest person: the device's threshold is re-fitted on the converted embedder
        # (GalleryHead.finish), and a strict threshold puts validation faces near it, where a float↔int8
        # wobble of 1e-3 would count as a quantization loss it is not.
        "float_accuracy": _acc(_pick(f_near, is_val), val_truth),
        "converted_accuracy": _acc(_pick(q_near, is_val), val_truth),
        "float_accept_accuracy": _acc([p for p, v in zip(f_dec, is_val, strict=True) if v], val_truth),
        "converted_accept_accuracy": _acc([p for p, v in zip(q_dec, is_val, strict=True) if v], val_truth),
        "float_decision_accuracy": _acc(f_dec, truth),
        "converted_decision_accuracy": _acc(q_dec, truth),
        "mean_cosine": float(np.mean(cos)) if len(cos) else None,
        "min_cosine": float(np.min(cos)) if len(cos) else None,
    }

