"""The subject of a photo with several faces of similar size (issue 24): chosen by the person's other photos
(faceberry.contract.choose_subject), size and position breaking ties, refused with the reason only when ambiguous.
Synthetic embeddings: the rule, not a network, is under test here (tests/test_household_of_one.py runs it on
real group photos through train, eval and enroll)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceberry.contract import (
    MIN_REFERENCE_PHOTOS,
    SEVERAL_FACES,
    STILL_AMBIGUOUS,
    agreement_floor,
    choose_subject,
    l2_normalize,
    subject_candidates,
)
from faceberry.train.crops import Candidates, CropSet, resolve_subjects


@dataclass
class _Face:
    width: float


def _person(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float = 0.15) -> np.ndarray:
    return l2_normalize(centre + spread * rng.normal(size=(n, len(centre))))


def test_the_face_like_the_persons_other_photos_is_chosen_wherever_it_is():
    rng = np.random.default_rng(0)
    me, other = rng.normal(size=32), rng.normal(size=32)
    own = _person(rng, me, 8)
    mine, theirs = _person(rng, me, 1)[0], _person(rng, other, 1)[0]
    # The person's face is the narrower and the less central one: identity decides, not geometry.
    index, how = choose_subject(np.stack([theirs, mine]), own, widths=[120, 100], offsets=[0.05, 0.3])
    assert index == 1 and how == "identity"
    index, _ = choose_subject(np.stack([mine, theirs]), own, widths=[100, 120], offsets=[0.3, 0.05])
    assert index == 0


def test_no_face_of_the_person_and_two_of_them_are_refused_with_the_reason():
    rng = np.random.default_rng(1)
    me = rng.normal(size=32)
    own = _person(rng, me, 8)
    strangers = np.stack([_person(rng, rng.normal(size=32), 1)[0] for _ in range(2)])
    index, why = choose_subject(strangers, own, [100, 100], [0.1, 0.1])
    assert index is None and why.startswith(STILL_AMBIGUOUS) and "none of its faces" in why
    # Two faces both like the person (a twin, a photo of a photo): the best-agreeing wins only if it is also the
    # widest or the most central of them.
    centre = l2_normalize(own.mean(axis=0))
    twins = l2_normalize(np.stack([centre + 0.001 * rng.normal(size=32) for _ in range(2)]))
    best = int(np.argmax(twins @ centre))
    index, how = choose_subject(twins, own, [100 + 20 * (k == best) for k in range(2)], [0.1, 0.1])
    assert index == best and how == "identity, then size and position"
    index, why = choose_subject(twins, own, [100 + 20 * (k != best) for k in range(2)],
                                [0.1 + 0.2 * (k == best) for k in range(2)])
    assert index is None and "several of its faces" in why


def test_too_few_reference_photos_are_no_reference():
    rng = np.random.default_rng(2)
    me = rng.normal(size=32)
    assert agreement_floor(_person(rng, me, MIN_REFERENCE_PHOTOS - 1)) is None
    index, why = choose_subject(_person(rng, me, 2), _person(rng, me, MIN_REFERENCE_PHOTOS - 1), [1, 1], [0, 0])
    assert index is None and f"fewer than {MIN_REFERENCE_PHOTOS}" in why


def test_the_floor_follows_the_persons_own_spread():
    rng = np.random.default_rng(3)
    me = rng.normal(size=32)
    tight, loose = agreement_floor(_person(rng, me, 10, 0.05)), agreement_floor(_person(rng, me, 10, 0.4))
    assert 0.0 < loose < tight < 1.0


def test_candidates_are_the_faces_of_similar_size_widest_first():
    faces = [_Face(60), _Face(100), _Face(20), _Face(80)]
    got, why = subject_candidates(faces, min_face_size=40)
    assert why == SEVERAL_FACES and [f.width for f in got] == [100, 80, 60]
    got, why = subject_candidates([_Face(200), _Face(60)], min_face_size=40)
    assert why is None and [f.width for f in got] == [200]
    assert subject_candidates([_Face(10)], min_face_size=40)[0] == []


def _crop_set(rng: np.random.Generator, people: dict[str, np.ndarray], n: int,
              group: np.ndarray) -> tuple[CropSet, np.ndarray]:
    """`n` one-face photos per person and the same group photo (`group`: its faces' embeddings) in every
    person's folder. A crop is a stand-in whose first pixel indexes the returned embedding table."""
    table = [*group]
    labels: list[str] = []
    for name, centre in people.items():
        table.extend(_person(rng, centre, n))
        labels += [name] * n
    first = len(group)
    crops = np.zeros((len(labels), 2, 2, 3), np.uint8)
    crops[:, 0, 0, 0] = np.arange(first, first + len(labels))
    faces = np.zeros((len(group), 2, 2, 3), np.uint8)
    faces[:, 0, 0, 0] = np.arange(len(group))
    group_photo = Candidates(faces, np.array([110, 100, 90], np.float32), np.array([0.2, 0.0, 0.2], np.float32))
    ambiguous = [(name, f"{name}/group.jpg", group_photo) for name in people]
    return CropSet(crops, labels, [f"{label}/{i}.jpg" for i, label in enumerate(labels)], [], ambiguous), \
        np.stack(table)


def test_a_group_photo_in_each_persons_folder_gives_each_their_own_face():
    """What README says of group photos: a copy in each one's folder enrols each with their own face."""
    rng = np.random.default_rng(4)
    people = {name: rng.normal(size=32) for name in ("alice", "bob")}
    # The group photo: bob (widest), a stranger (most central), alice.
    group = np.stack([_person(rng, people["bob"], 1)[0], _person(rng, rng.normal(size=32), 1)[0],
                      _person(rng, people["alice"], 1)[0]])
    crop_set, table = _crop_set(rng, people, 5, group)
    got = resolve_subjects(crop_set, lambda crops: table[crops[:, 0, 0, 0]])
    assert got == {"chosen": 2, "refused": 0} and crop_set.skipped == []
    chosen = {label: int(crop[0, 0, 0]) for label, crop in zip(crop_set.labels[-2:], crop_set.crops[-2:], strict=True)}
    assert chosen == {"alice": 2, "bob": 0}
    assert crop_set.paths[-2:] == ["alice/group.jpg", "bob/group.jpg"]


def test_without_a_recognizer_a_group_photo_is_skipped_with_the_fix():
    """The fine-tune path (no --backbone) has no embedder: its skipped.json reason says to train with --backbone."""
    rng = np.random.default_rng(5)
    people = {"alice": rng.normal(size=32)}
    group = np.stack([_person(rng, people["alice"], 1)[0], _person(rng, rng.normal(size=32), 1)[0],
                      _person(rng, rng.normal(size=32), 1)[0]])
    crop_set, _ = _crop_set(rng, people, 5, group)
    before = len(crop_set)
    assert resolve_subjects(crop_set, None) == {"chosen": 0, "refused": 1}
    assert len(crop_set) == before and crop_set.ambiguous == []
    [skip] = crop_set.skipped
    assert skip["path"] == "alice/group.jpg" and skip["label"] == "alice"
    assert skip["reason"].startswith(SEVERAL_FACES) and "train with --backbone" in skip["reason"]
