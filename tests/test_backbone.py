"""The backbone stage: a small real distillation from dlib's face embedder into MobileNetV2.

`tiny_embedding` (tests/plugins/bundles.py; also used by test_fewshot.py and test_enroll.py) builds, once per
session and in subprocesses (TensorFlow never loads into the test process): a backbone distilled on a few
../shared/data/faces/lfw-dev people at a small input size, a few-shot RUN_DIR on it
(`python -m train --backbone`), and its int8 bundle (`python -m convert`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.plugins.bundles import (
    LFW,
    WEIGHTS,
    link_tree,
    need_student_data,
    need_teacher,
    student_selection,
)
from tests.plugins.bundles import STUDENT_INPUT_SIZE as INPUT_SIZE
from tests.plugins.processes import python

# ---------------------------------------------------------------- tests


def test_distillation_moves_the_student_towards_the_teacher(tiny_embedding: dict) -> None:
    root = tiny_embedding["backbone"]
    history = json.loads((root / "history.json").read_text())
    report = json.loads((root / "report.json").read_text())
    config = json.loads((root / "config.json").read_text())
    assert len(history["loss"]) >= 3
    # Loss falls and cosine rises, first epoch against last, and against the untrained student.
    assert history["loss"][-1] < history["loss"][0] - 0.05, history["loss"]
    assert history["cosine"][-1] > history["cosine"][0] + 0.05, history["cosine"]
    assert history["cosine"][-1] > history["initial_cosine"] + 0.2, (history["initial_cosine"], history["cosine"])
    # On faces of a person it never trained on, the student also moved towards the teacher.
    cos = report["student_teacher_cosine"]
    assert report["heldout"].startswith("1 of 4 people")
    assert cos["mean"] > cos["untrained_mean"] + 0.05, cos
    assert "dlib_face_recognition_resnet_model_v1" in config["teacher"]["id"]
    assert "CC0" in config["teacher"]["licence"]
    assert config["input_size"] == INPUT_SIZE and len(config["teacher"]["mean"]) == 128
    assert (root / "embedder.keras").is_file()


def test_distillation_with_the_default_rebuilt_teacher(tmp_path: Path) -> None:
    """The default path: dlib's network rebuilt in Keras labels dlib-chip-v1 views in batches, and the
    student learns from it (a short run: the loss must fall)."""
    need_student_data()
    need_teacher()
    photos = tmp_path / "photos"
    link_tree(photos, {n: f[:6] for n, f in student_selection()["gallery"].items()})
    out = tmp_path / "backbone"
    python("-m", "train", "backbone", "--arch", "mobilenetv2", "--photos", str(photos), "--out", str(out),
           "--weights", str(WEIGHTS),
           "--cache-dir", str(tmp_path / "crops"), "--teacher-cache", str(tmp_path / "teacher.npz"),
           "--input-size", str(INPUT_SIZE), "--views", "2", "--epochs", "6", "--batch-size", "8", "--lr", "2e-3",
           "--val-people", "0.25", "-q", what="python -m train backbone (rebuilt teacher)", check=True, nice=True,
           timeout=900)
    config = json.loads((out / "config.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert config["teacher"]["kind"] == "rebuilt"
    assert config["preprocessing"]["alignment"] == "dlib-chip-v1"
    assert history["loss"][-1] < history["loss"][0] - 0.05, history["loss"]
    assert history["cosine"][-1] > history["initial_cosine"] + 0.2, (history["initial_cosine"], history["cosine"])
    with np.load(tmp_path / "teacher.npz") as cached:
        assert len(cached["keys"]) > 0 and all(str(k).startswith("rebuilt:") for k in cached["keys"])


def test_augmented_views_are_deterministic_and_vary() -> None:
    from faceberry.train.distill import make_views

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:48]
    crops = np.stack([np.dstack([(xx * 5 + i * 40) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256])
                      for i in range(3)]).astype(np.uint8)
    crops[1] = rng.integers(0, 255, crops[1].shape, dtype=np.uint8)
    views, owner = make_views(crops, 4, seed=0)
    again, _ = make_views(crops, 4, seed=0)
    other_seed, _ = make_views(crops, 4, seed=1)
    assert views.shape == (12, 48, 48, 3) and views.dtype == np.uint8
    assert owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert np.array_equal(views, again)  # same views every run, so the teacher cache hits
    assert np.array_equal(views[0], crops[0]) and np.array_equal(views[4], crops[1])  # view 0 is the clean crop
    assert not np.array_equal(views[1], crops[0]) and not np.array_equal(views[1], views[2])
    assert not np.array_equal(views[1], other_seed[1])


def test_teacher_tells_people_apart_on_our_crops_and_caches(tmp_path: Path) -> None:
    need_student_data()
    need_teacher()
    from faceberry.train.crops import build_crop_set
    from faceberry.train.teacher import TeacherCache, label_crops

    sel = student_selection()["gallery"]
    files = {n: f[:3] for n, f in list(sel.items())[:2]}
    cs = build_crop_set(LFW, 112, files=files, progress=False)
    assert len(cs) >= 5
    cache = TeacherCache(tmp_path / "teacher.npz")
    emb = label_crops(cs.crops, cache)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    lab = np.array(cs.labels)
    sims = emb @ emb.T
    same = sims[(lab[:, None] == lab[None]) & ~np.eye(len(lab), dtype=bool)]
    diff = sims[lab[:, None] != lab[None]]
    assert same.mean() > diff.mean() + 0.03, (same.mean(), diff.mean())
    # A second labelling is served from the cache file: no teacher is needed (none is passed, and a
    # teacher that would be used raises).

    class NoTeacher:
        def embed(self, crop):
            raise AssertionError("cache miss")

    again = label_crops(cs.crops, TeacherCache(tmp_path / "teacher.npz"), teacher=NoTeacher())
    assert np.allclose(again, emb)


def test_backbone_cli_reports_bad_input(tmp_path: Path) -> None:
    from faceberry.train.backbone import main

    distil = ["--arch", "mobilenetv2"]
    assert main([*distil, "--photos", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([*distil, "--photos", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep me")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"\xff\xd8 not really")
    assert main([*distil, "--photos", str(photos), "--out", str(out)]) == 2
    assert (out / "x").read_text() == "keep me"  # nothing lost without --force


def test_the_card_fine_tune_can_start_from_the_distilled_student(tiny_embedding: dict) -> None:
    """`python -m train --weights BACKBONE_DIR`: the fine-tune's MobileNetV2 starts from the face-aware one
    inside a distilled student (at another input size: a convolution's weights do not depend on it)."""
    root = tiny_embedding["backbone"]
    script = f"""
import numpy as np
from faceberry.train.backbone import load_embedder
from faceberry.train.errors import WeightsError
from faceberry.train.model import build_backbone
model, cfg = load_embedder({str(root)!r})
inner = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
start = build_backbone(96, cfg["alpha"], {str(root)!r})
imagenet = build_backbone(96, cfg["alpha"], {str(WEIGHTS)!r})
pairs = list(zip(start.get_weights(), inner.get_weights(), strict=True))
print("same", all(np.array_equal(a, b) for a, b in pairs))
print("differs", any(not np.array_equal(a, b) for a, b in zip(start.get_weights(), imagenet.get_weights())))
try:
    build_backbone(96, 0.5, {str(root)!r})
except WeightsError as exc:
    print("refused", str(exc))
"""
    out = python("-c", script, what="build_backbone from a distilled student", check=True, nice=True,
                 timeout=900).stdout
    assert "same True" in out and "differs True" in out, out
    assert "refused --weights" in out and "pass --alpha" in out, out
