"""Few-shot people on a distilled backbone: RUN_DIR of kind "embedding", and its int8 bundle."""

from __future__ import annotations

import json

import numpy as np


def test_fewshot_run_dir_follows_the_contract(tiny_embedding: dict) -> None:
    run = tiny_embedding["run"]
    people = tiny_embedding["people"]
    config = json.loads((run / "config.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert config["kind"] == "embedding"
    assert config["preprocessing"]["input_size"] == 64
    assert (run / "labels.txt").read_text().split() == people
    with np.load(run / "gallery.npz") as g:
        assert [str(v) for v in g["labels"]] == people
        emb = g["embeddings"]
    assert emb.shape == (len(people), 128)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    with np.load(run / "crops.npz") as c:
        assert set(c["split"].tolist()) == {"train", "val"}
        assert c["crops"].shape[1:] == (64, 64, 3) and len(c["labels"]) == len(c["split"])
    th = report["threshold"]
    # No cohort beside this backbone: the strict default, calibrated on the people's own faces, and the
    # report says so and how little it rests on.
    assert 0.0 < th["accept"] <= 1.0 and th["target_far"] == 0.005
    assert th["basis"].startswith("leave-one-person-out") and th["far"] <= 0.005 + 1e-9
    assert th["cohort_people"] == 0 and th["impostor_scores"] < 1000
    assert any("no stranger cohort" in w for w in th["warnings"])
    assert set(report["per_person"]) == set(people)
    assert (run / "model.keras").is_file()


def test_int8_embedding_bundle_recognises_validation_faces(tiny_embedding: dict) -> None:
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier

    bundle = load_bundle(tiny_embedding["bundle"])
    assert bundle.kind == "embedding"
    assert bundle.manifest["classifier"]["quantization"] == "int8"
    assert sorted(bundle.gallery_labels) == tiny_embedding["people"]
    clf = FaceClassifier(bundle)
    with np.load(tiny_embedding["run"] / "crops.npz") as c:
        crops, labels, split = c["crops"], c["labels"], c["split"]
    val = np.flatnonzero(split == "val")
    best = [clf.classify(crops[i]).best for i in val]
    accuracy = float(np.mean([b == labels[i] for b, i in zip(best, val, strict=True)]))
    chance = 1.0 / len(bundle.gallery_labels)
    assert accuracy > chance + 0.15, (accuracy, chance)
