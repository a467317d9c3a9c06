"""Corrections ("wrong, that was not X") on real faces: the int8 gallery bundle's embedder, the run's real
crops, the daemon's own CorrectionFilter at the configured default margin (memory.negative_margin).

The rule's arithmetic on made-up vectors and the file's undo are in tests/test_strangers.py; what a margin does
over many households and lookalikes is measured by `python -m bench.calibration --lookalikes`
(docs/BENCHMARKS.md, "Lookalikes")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceberry.contract import SECOND_LOOK, UNKNOWN


def test_one_correction_stops_a_lookalike_and_keeps_the_member(gallery_run: Path, gallery_bundle: Path,
                                                               tmp_path: Path) -> None:
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier
    from faceberry.device.config import MemoryConfig
    from faceberry.device.memory.corrections import CorrectionFilter, Negatives

    clf = FaceClassifier(load_bundle(gallery_bundle), num_threads=1)
    with np.load(gallery_run / "crops.npz") as c:
        crops, labels = c["crops"], np.array([str(v) for v in c["labels"]])
    names = np.array([str(v) for v in clf.gallery_labels])
    gallery = np.array(clf.gallery)
    # The two people most alike: one of them left out of the household is the other's lookalike.
    sims = gallery @ gallery.T
    np.fill_diagonal(sims, -1.0)
    s, x = np.unravel_index(int(np.argmax(sims)), sims.shape)
    stranger, member = str(names[s]), str(names[x])
    home = names != stranger
    clf.backend.gallery, clf.backend.labels = gallery[home], names[home]
    theirs, own = crops[labels == stranger], crops[labels == member]
    scores = gallery[home] @ np.stack([clf.raw(c) for c in theirs]).T
    row = list(names[home]).index(member)
    taken = scores.argmax(axis=0) == row
    assert taken.sum() >= 6, (stranger, member, int(taken.sum()))
    own_scores = gallery[x] @ np.stack([clf.raw(c) for c in own]).T
    # A household whose threshold lets the stranger pass for the member in most of their photos while every
    # photo of the member is named (far enough below their scores that none needs the second look).
    clf.threshold = float(min(np.quantile(scores[row, taken], 0.2), own_scores.min() - 2 * SECOND_LOOK))

    looks = [clf.look(c) for c in theirs]
    named = [i for i, (_, p) in enumerate(looks) if p.label == member]
    assert len(named) >= 5, (stranger, member, len(named), len(theirs))
    kept = [clf.look(c) for c in own]
    assert all(p.label == member for _, p in kept)

    margin = MemoryConfig().negative_margin
    corrections = CorrectionFilter(Negatives(tmp_path / "negatives.json"), margin)
    corrected = named[0]
    # What the command runner stores: the vector the device decided on for that face.
    corrections.negatives.add(member, looks[corrected][0][None], "e1")
    reread = CorrectionFilter(Negatives(tmp_path / "negatives.json"), margin)  # as after a restart

    def after(filt: CorrectionFilter, looked: list) -> list[str]:
        return [filt.apply(p, v, clf.threshold).label for v, p in looked]

    # The same face in the next frames (shifted by a pixel or two, a little brighter) is unknown at once.
    frame = theirs[corrected]
    frames = [clf.look(again) for again in (np.roll(frame, 2, axis=1), np.roll(frame, -1, axis=0),
                                            np.clip(frame.astype(np.int16) + 12, 0, 255).astype(frame.dtype))]
    frames = [(v, p) for v, p in frames if p.label == member]
    assert frames and after(reread, frames) == [UNKNOWN] * len(frames)
    # Their other photos named as the member: at most 5% of them still are (issue 24's goal) ...
    others = [looks[i] for i in named[1:]]
    still = sum(label == member for label in after(reread, others))
    assert still <= 0.05 * len(others), (still, len(others), margin)
    # ... and no photo of the member is lost; another member is not affected by a correction about this one.
    assert after(reread, kept) == [member] * len(kept)
    other = next(str(n) for n in names if n not in (stranger, member))
    their_own = [clf.look(c) for c in crops[labels == other]]
    assert after(reread, their_own) == [p.label for _, p in their_own]
