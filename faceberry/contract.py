"""The decisions shared by train, convert, device, demo and bench, each defined once.

Everything that decides *what* a face is — which face of a photo is its subject, when a score is a
known person or `unknown`, the threshold that lets a target fraction of strangers through, which
files are images, how embeddings are normalised and how a gallery is made from them — lives here.
The pixels (detection, alignment, normalisation of crops) are in faceberry.detector and
faceberry.preprocess; this module is the rules applied to their output. tests/test_contract.py holds
train's, convert's and device's decisions equal on the same photos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

UNKNOWN = "unknown"

# The image formats OpenCV decodes everywhere, the Pi included.
OPENCV_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Phone formats (an iPhone saves HEIC, many Android phones HEIF or AVIF), read through Pillow: HEIC/HEIF with
# pillow-heif, AVIF with Pillow 11.3 or later; both are in requirements-train.txt. Where the library is absent
# (the Pi needs neither) such a photo is refused with the fix (faceberry.preprocess.load_image), never ignored.
PHONE_SUFFIXES: tuple[str, ...] = (".heic", ".heif", ".avif")
# Every file name a photo may have. The folder camera, training, the cohort, convert, eval, enroll, the demo
# and bench all list photos by this one set, so a photo never counts in one and not another.
IMAGE_SUFFIXES: tuple[str, ...] = OPENCV_SUFFIXES + PHONE_SUFFIXES

# When a photo holds several faces, the widest is its subject only if it is this many times wider than
# the next: photos often show a small bystander behind the subject, and a phone photo of one person
# should not be thrown away for that, but two people of similar size are ambiguous.
DOMINANCE = 1.8

# Why a photo gave no subject face (the words the skip reports use).
NO_FACE = "no face"
TOO_SMALL = "face too small"
SEVERAL_FACES = "several faces of similar size"
UNREADABLE = "unreadable"
# A photo of several faces of similar size whose subject the person's other photos could not single out
# (choose_subject): the reason, then why, in brackets.
STILL_AMBIGUOUS = "several faces of similar size, none singled out by the person's other photos"

# choose_subject: a candidate agrees with a person's other photos when its cosine to their centroid is no
# more than AGREEMENT_SIGMAS standard deviations below the mean of their own photos' leave-one-out cosines
# (nor above their lowest): the person's own spread sets the bar, in the backbone's own scale, so no absolute
# cosine is assumed. A quantile of so few photos was too strict: a probe of Jacques Chirac at 0.965 beside a
# stranger at 0.915 was refused under a floor of 0.970 set by six photos agreeing at 0.966-0.978.
# Fewer than MIN_REFERENCE_PHOTOS unambiguous photos are no reference.
AGREEMENT_SIGMAS = 3.0
MIN_REFERENCE_PHOTOS = 3

# A threshold resting on fewer impostor scores than this is a guess at the tail: say so.
MIN_IMPOSTOR_SCORES = 1000

# Enrolled faces (gallery entries, the stranger cohort, every impostor score a threshold is calibrated on)
# are embedded as the mean of the face and its mirror image: less noise per photo, and at the same share
# of strangers accepted it named 0.1–0.9 points more of a household's own photos
# (bench/household_rules.py). A camera face is embedded once and looked at again, mirrored, only when its
# best score is within SECOND_LOOK of the threshold: in bench/household.py that gave the same rates as
# mirroring every face, at one more embedder run for 5–8% of clean faces (7–14% degraded).
# Only for dlib's ResNet (`train backbone --arch dlib-resnet`), where it was measured: a distilled student is
# not mirror-consistent enough (a weak one's face and mirror embeddings differ more than two photos do), so
# its galleries stay one view per face and its bundles take no second look.
ENROLLED_VIEWS = "face+mirror"
FACE_ONLY = "face"
SECOND_LOOK = 0.02
MIRRORED_ARCHS = ("dlib-resnet-v1",)


def enrolled_views(arch: str | None) -> str:
    """How a backbone's enrolled faces are embedded: ENROLLED_VIEWS for dlib's ResNet, else FACE_ONLY."""
    return ENROLLED_VIEWS if arch in MIRRORED_ARCHS else FACE_ONLY


# The share of a visit's frames that must name a person for the visit to name them. A stranger who
# resembles one of the family passes the per-photo threshold in some frames; measured over 4,800 stranger
# visits of 5 photos per household size (bench/household.py, docs/BENCHMARKS.md; face-only embeddings at
# the 2x cohort margin), a simple majority (3 of 5) named 0.12–0.23% of them, 4 of 5 at most 0.08%, and
# the family's visits stayed 99.9–100% named right (a family member missed at first is still named once 4
# of their last 5 are).
VISIT_AGREEMENT = 0.8


class _Face(Protocol):
    @property
    def width(self) -> float: ...


def is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted; hidden files ignored; sub-folders too when recursive)."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if is_image(p))


def subject_face(faces: Sequence[Any], min_face_size: float) -> tuple[Any | None, str | None]:
    """(the photo's subject face, None) or (None, why there is none).

    The subject is the widest face at least `min_face_size` wide, if it is DOMINANCE times wider than
    the next such face; faces narrower than `min_face_size` are background and never compete.
    """
    if not faces:
        return None, NO_FACE
    big = sorted((f for f in faces if f.width >= min_face_size), key=lambda f: -f.width)
    if not big:
        return None, TOO_SMALL
    if len(big) > 1 and big[0].width < DOMINANCE * big[1].width:
        return None, SEVERAL_FACES
    return big[0], None


def subject_candidates(faces: Sequence[Any], min_face_size: float) -> tuple[list[Any], str | None]:
    """The faces that may be the photo's subject, widest first, and why the photo has no single one.

    ([subject], None) where subject_face finds one; ([two or more], SEVERAL_FACES) for faces of similar size,
    for choose_subject to tell apart by the person's other photos; ([], NO_FACE | TOO_SMALL) otherwise.
    """
    face, why = subject_face(faces, min_face_size)
    if face is not None:
        return [face], None
    if why != SEVERAL_FACES:
        return [], why
    big = sorted((f for f in faces if f.width >= min_face_size), key=lambda f: -f.width)
    return [f for f in big if DOMINANCE * f.width > big[0].width], SEVERAL_FACES


def agreement_floor(own: np.ndarray) -> float | None:
    """The cosine to a person's centroid at which a face agrees with their photos (AGREEMENT_SIGMAS below the
    mean of their own leave-one-out cosines, or their lowest); None with fewer than MIN_REFERENCE_PHOTOS photos."""
    own = l2_normalize(np.asarray(own, np.float64))
    if len(own) < MIN_REFERENCE_PHOTOS:
        return None
    total = own.sum(axis=0)
    loo = np.einsum("ij,ij->i", own, l2_normalize(total[None, :] - own))
    return float(min(loo.min(), loo.mean() - AGREEMENT_SIGMAS * loo.std(ddof=1)))


def choose_subject(candidates: np.ndarray, own: np.ndarray, widths: Sequence[float],
                   offsets: Sequence[float]) -> tuple[int | None, str]:
    """Which of a photo's candidate faces (embeddings, widest first) is the person, by identity consistency.

    `own`: embeddings of the person's unambiguous photos; `widths` and `offsets` (each candidate's distance
    from the photo's centre, as a share of the photo's diagonal) break ties. Returns (index, how) or
    (None, why not). A candidate agrees when its cosine to the person's centroid reaches agreement_floor:
    the only one that agrees is chosen; of several, the best-agreeing if it is also the widest or the most
    central of them; none, several without that, or no reference: refused.
    """
    floor = agreement_floor(own)
    if floor is None:
        return None, f"{STILL_AMBIGUOUS} (fewer than {MIN_REFERENCE_PHOTOS} of the person's photos show one clear face)"
    sims = l2_normalize(np.asarray(candidates, np.float64)) @ centroid(own).astype(np.float64)
    agree = [i for i in range(len(sims)) if sims[i] >= floor]
    if len(agree) == 1:
        return agree[0], "identity"
    if not agree:
        return None, f"{STILL_AMBIGUOUS} (none of its faces looks like the person's other photos)"
    best = max(agree, key=lambda i: sims[i])
    widest = max(agree, key=lambda i: widths[i])
    central = min(agree, key=lambda i: offsets[i])
    if best in (widest, central):
        return best, "identity, then size and position"
    return None, f"{STILL_AMBIGUOUS} (several of its faces look like the person's other photos)"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroid(embeddings: np.ndarray) -> np.ndarray:
    """A person's gallery entry: the normalised mean of their normalised embeddings.

    One rule whether the person came from training or from `device enroll`, in float32: a mean of
    unit vectors weights every photo equally and is steadier than any single photo.
    """
    return l2_normalize(l2_normalize(embeddings).mean(axis=0))


def mirrored(crops: np.ndarray) -> np.ndarray:
    """Crops ((N,) H, W, C) flipped left to right."""
    return np.ascontiguousarray(np.asarray(crops)[..., ::-1, :])


def mirror_mean(face: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """A face's ENROLLED_VIEWS embedding from its own and its mirror image's (rows alike)."""
    return l2_normalize(l2_normalize(face) + l2_normalize(mirror))


def embed_enrolled(embed: Any, crops: np.ndarray, views: str) -> np.ndarray:
    """Enrolled faces' unit embeddings as `views` says: `embed` (crops → embeddings, any runner: Keras,
    LiteRT, one crop or a batch) on the faces, averaged with their mirror images for ENROLLED_VIEWS."""
    face = embed(crops)
    return mirror_mean(face, embed(mirrored(crops))) if views == ENROLLED_VIEWS else l2_normalize(face)


def needs_second_look(score: float, threshold: float) -> bool:
    """Whether a camera face's best score is close enough to the threshold to look again, mirrored."""
    return abs(float(score) - float(threshold)) < SECOND_LOOK


def gallery_from(embeddings: np.ndarray, labels: Sequence[str], people: Sequence[str]) -> np.ndarray:
    """(len(people), D) centroids, in `people` order."""
    lab = np.asarray(labels)
    return np.stack([centroid(embeddings[lab == p]) for p in people]).astype(np.float32)


def best_match(embeddings: np.ndarray, gallery: np.ndarray, names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(best gallery name, its cosine) per embedding, before the accept threshold."""
    emb = l2_normalize(np.atleast_2d(embeddings))
    if len(emb) == 0 or len(gallery) == 0:
        return [UNKNOWN] * len(emb), np.zeros(len(emb), np.float32)
    sims = emb @ np.asarray(gallery, np.float32).T
    idx = np.argmax(sims, axis=1)
    return [str(names[i]) for i in idx], sims[np.arange(len(emb)), idx]


def best_class(probs: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(most probable label, its probability) per softmax output row."""
    probs = np.atleast_2d(np.asarray(probs, np.float64))
    idx = np.argmax(probs, axis=1)
    return [str(labels[i]) for i in idx], probs[np.arange(len(probs)), idx]


def accept(best: str, score: float, threshold: float) -> str:
    """The accept rule: the best candidate if it is a person and scores at least the threshold."""
    return best if best != UNKNOWN and score >= threshold else UNKNOWN


def accept_with_negatives(best: str, score: float, threshold: float, probe: np.ndarray | None,
                          negatives: np.ndarray | None, margin: float) -> str:
    """The accept rule with corrections: `negatives` are embeddings a user said were *not* `best`.

    `best` must first pass `accept`; then its score (cosine to `best`'s gallery entry) must beat the
    nearest negative's cosine to the probe by `margin`. The face that was corrected (or one very like
    it) is nearer its own stored negative than to `best`'s entry and becomes `unknown`; `best`'s own
    photos are far from a stranger's negative and keep being accepted.
    """
    label = accept(best, score, threshold)
    if label == UNKNOWN or probe is None or negatives is None or len(negatives) == 0:
        return label
    nearest = float(np.max(l2_normalize(np.atleast_2d(negatives)) @ l2_normalize(probe).reshape(-1)))
    return label if score >= nearest + margin else UNKNOWN


def accept_all(best: Sequence[str], scores: np.ndarray, threshold: float) -> list[str]:
    return [accept(b, float(s), threshold) for b, s in zip(best, scores, strict=True)]


def accept_scores(best: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """The score at which each face would be accepted: -inf when its best candidate is `unknown`."""
    out = np.asarray(scores, np.float64).copy()
    out[np.array([b == UNKNOWN for b in best], dtype=bool)] = -np.inf
    return out


def threshold_for_far(impostor_scores: np.ndarray, target: float) -> float:
    """Smallest threshold letting at most floor(target × n) impostor scores through (0.0 with none)."""
    scores = np.asarray(impostor_scores, np.float64)
    n = len(scores)
    finite = np.sort(scores[np.isfinite(scores)])[::-1]
    allowed = int(np.floor(target * n + 1e-9))
    if allowed >= len(finite):
        return 0.0
    # Just above the (allowed+1)-th highest impostor score.
    return float(np.nextafter(finite[allowed], np.inf))


def visit_agreed(votes_for: int, frames: int) -> bool:
    """Whether `votes_for` of `frames` frames are enough to name a person for a visit (VISIT_AGREEMENT)."""
    return frames > 0 and votes_for >= math.ceil(VISIT_AGREEMENT * frames - 1e-9)


def visit_decision(votes: Sequence[tuple[str, float]]) -> tuple[str, float, int]:
    """A visit's identity from its frames' decisions: (label, mean score of its votes, votes for it).

    A person is named only when VISIT_AGREEMENT of the frames named them (4 of 5: a stranger who
    resembles someone in two frames of five stays `unknown`); among people, most votes win and ties go to
    the higher mean score. Otherwise the visit is `unknown`, scored by its best candidate's mean.
    """
    if not votes:
        return UNKNOWN, 0.0, 0
    by_label: dict[str, list[float]] = {}
    for label, score in votes:
        by_label.setdefault(label, []).append(float(score))
    people = [lab for lab in by_label if lab != UNKNOWN]
    if people:
        top = max(people, key=lambda lab: (len(by_label[lab]), float(np.mean(by_label[lab]))))
        if visit_agreed(len(by_label[top]), len(votes)):
            return top, float(np.mean(by_label[top])), len(by_label[top])
    unknown = by_label.get(UNKNOWN, [])
    return UNKNOWN, float(np.mean(unknown)) if unknown else 0.0, len(unknown)
