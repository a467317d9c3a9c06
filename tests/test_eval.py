"""`python -m device eval` on the gallery bundle and held-out photos of its people (plus strangers).

Every figure the command reports is recounted here from its per-probe results, so a wrong
aggregation fails, and accuracy is compared with chance computed from the number of people.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceberry.bundle import load_bundle
from faceberry.classifier import UNKNOWN
from faceberry.device.recognition import evaluate
from faceberry.device.recognition.pipeline import FacePipeline
from faceberry.preprocess import load_image

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def eval_result(gallery_bundle, heldout_photos, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    rc = evaluate.main(["--bundle", str(gallery_bundle), "--photos", str(heldout_photos), "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_json_has_the_documented_keys_and_types(eval_result):
    for key in ("known_accuracy", "stranger_false_accept_rate", "no_face_rate"):
        assert isinstance(eval_result[key], float), key
        assert 0.0 <= eval_result[key] <= 1.0, key
    assert isinstance(eval_result["probes"], list) and eval_result["probes"]
    assert isinstance(eval_result["per_person"], dict) and eval_result["per_person"]
    assert isinstance(eval_result["bundle_id"], str) and eval_result["bundle_id"]
    assert isinstance(eval_result["confusion"], dict)
    # Per stranger folder: its counts and whom its accepted photos were taken for (person → photos).
    assert isinstance(eval_result["strangers"], dict) and eval_result["strangers"]
    for folder, row in eval_result["strangers"].items():
        assert set(row) == {"probes", "false_accepts", "rejected", "no_face", "false_accept_rate", "taken_for"}, folder
        assert all(type(row[k]) is int for k in ("probes", "false_accepts", "rejected", "no_face")), folder
        assert row["false_accept_rate"] is None or isinstance(row["false_accept_rate"], float), folder
        assert isinstance(row["taken_for"], dict), folder
        assert all(isinstance(k, str) and type(n) is int for k, n in row["taken_for"].items()), folder
    # Enrolled people named as another enrolled person: [{truth, predicted, probes}], most frequent first.
    assert isinstance(eval_result["confusions"], list)
    for item in eval_result["confusions"]:
        assert set(item) == {"truth", "predicted", "probes"}, item
        assert isinstance(item["truth"], str) and isinstance(item["predicted"], str) and type(item["probes"]) is int
    assert [c["probes"] for c in eval_result["confusions"]] == sorted(
        (c["probes"] for c in eval_result["confusions"]), reverse=True)
    for stage in ("decode", "detect", "align", "classify"):
        stat = eval_result["latency_ms"][stage]
        assert stat["n"] > 0, stage
        assert 0.0 < stat["median"] <= stat["p95"], stage


def test_per_person_figures_match_a_recount_and_beat_chance(eval_result, gallery_people):
    probes = eval_result["probes"]
    people = set(gallery_people)
    assert set(eval_result["per_person"]) == {p["folder"] for p in probes if p["folder"] in people}
    for person, row in eval_result["per_person"].items():
        mine = [p for p in probes if p["folder"] == person]
        right = sum(1 for p in mine if p["predicted"] == person)
        assert row["probes"] == len(mine)
        assert row["right"] == right
        assert row["accuracy"] == pytest.approx(right / len(mine))
        assert row["right"] + row["wrong"] + row["rejected"] + row["no_face"] == row["probes"]
    known = [p for p in probes if p["folder"] in people]
    right = sum(1 for p in known if p["predicted"] == p["folder"])
    assert eval_result["known_accuracy"] == pytest.approx(right / len(known))
    # Confusion rows are the same probes, counted by what the pipeline said.
    for folder, row in eval_result["confusion"].items():
        said = Counter(p["predicted"] for p in probes if p["folder"] == folder)
        assert row == dict(said)
    # Chance = a uniform guess among the bundle's people. The best candidate (before the threshold)
    # must be right at least twice as often as chance, per person on average, recounted here; the
    # accepted-and-right rate, which the threshold trades against strangers, must still beat chance.
    chance = 1.0 / len(people)
    closed = [np.mean([p["best"] == person for p in probes if p["folder"] == person and p["faces"]])
              for person in eval_result["per_person"]]
    assert float(np.mean(closed)) >= min(0.9, 2 * chance), eval_result["per_person"]
    for person, row in eval_result["per_person"].items():
        mine = [p for p in probes if p["folder"] == person and p["faces"]]
        assert row["closed_set_accuracy"] == pytest.approx(np.mean([p["best"] == person for p in mine]))
    mean_accuracy = float(np.mean([row["accuracy"] for row in eval_result["per_person"].values()]))
    assert mean_accuracy > chance, eval_result["per_person"]


def test_strangers_false_accept_rate_is_consistent_with_the_counts(eval_result, gallery_people):
    probes = eval_result["probes"]
    strangers = [p for p in probes if p["folder"] not in set(gallery_people)]
    assert strangers, "heldout_photos should hold a stranger folder"
    assert all(p["truth"] == UNKNOWN and not p["known"] for p in strangers)
    found = [p for p in strangers if p["faces"] > 0]
    accepted = [p for p in found if p["predicted"] != UNKNOWN]
    assert eval_result["counts"]["false_accepts"] == len(accepted)
    assert eval_result["stranger_false_accept_rate"] == pytest.approx(len(accepted) / len(found))
    assert 0.0 <= eval_result["stranger_false_accept_rate"] <= 1.0
    per_folder = sum(row["false_accepts"] for row in eval_result["strangers"].values())
    assert per_folder == len(accepted)
    for folder, row in eval_result["strangers"].items():
        assert row["taken_for"] == dict(Counter(p["predicted"] for p in accepted if p["folder"] == folder))
    wrong = Counter((p["truth"], p["predicted"]) for p in probes if p["outcome"] == "wrong")
    assert {(c["truth"], c["predicted"]): c["probes"] for c in eval_result["confusions"]} == dict(wrong)
    no_face = sum(1 for p in probes if p["faces"] == 0)
    assert eval_result["no_face_rate"] == pytest.approx(no_face / len(probes))


def test_probe_results_are_the_device_pipelines(eval_result, gallery_bundle, heldout_photos):
    """A probe re-run through FacePipeline directly gives the same answer: eval takes no shortcut."""
    probe = next(p for p in eval_result["probes"] if p["faces"] == 1)
    pipeline = FacePipeline(load_bundle(gallery_bundle), num_threads=1)
    result = pipeline.process(load_image(heldout_photos / probe["path"]))
    assert len(result.recognitions) == 1
    pred = result.recognitions[0].prediction
    assert pred.label == probe["predicted"]
    assert pred.score == pytest.approx(probe["score"], abs=1e-5)


def test_unreadable_and_faceless_photos_are_counted_and_skipped(gallery_bundle, heldout_photos, tmp_path, caplog,
                                                                capsys):
    photos = tmp_path / "photos"
    person = next(d for d in sorted(heldout_photos.iterdir()) if d.is_dir())
    shutil.copytree(person, photos / person.name)
    (photos / person.name / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    blank = np.full((240, 320, 3), 200, dtype=np.uint8)
    cv2.rectangle(blank, (40, 40), (120, 200), (30, 90, 160), -1)  # shapes, no face
    cv2.imwrite(str(photos / person.name / "no_face.png"), blank)
    out = tmp_path / "eval.json"
    with caplog.at_level(logging.WARNING, logger="faceberry.device.recognition.evaluate"):
        rc = evaluate.main(["--bundle", str(gallery_bundle), "--photos", str(photos), "--json", str(out)])
    assert rc == 0
    assert "corrupt.jpg" in caplog.text
    result = json.loads(out.read_text())
    assert result["counts"]["unreadable"] == 1
    assert [u["path"] for u in result["unreadable"]] == [str(photos / person.name / "corrupt.jpg")]
    assert all(not p["path"].endswith("corrupt.jpg") for p in result["probes"])
    faceless = next(p for p in result["probes"] if p["path"].endswith("no_face.png"))
    assert faceless["faces"] == 0 and faceless["outcome"] == "no_face"
    assert result["per_person"][person.name]["no_face"] >= 1
    assert "known accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["bundle", "photos", "empty"])
def test_bad_input_is_one_line_error_and_nonzero_exit(what, gallery_bundle, heldout_photos, tmp_path, capsys):
    bundle, photos = gallery_bundle, heldout_photos
    if what == "bundle":
        bundle = tmp_path / "no-such-bundle"
    elif what == "photos":
        photos = tmp_path / "no-such-photos"
    else:
        photos = tmp_path / "empty"
        (photos / "someone").mkdir(parents=True)
    rc = evaluate.main(["--bundle", str(bundle), "--photos", str(photos)])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert str(bundle if what == "bundle" else photos) in err


def test_operating_points_recount_on_synthetic_probes():
    """The threshold picked for a target FAR accepts no more strangers than it allows (no models needed)."""
    rng = np.random.default_rng(0)
    probes = []
    for _ in range(200):
        probes.append({"known": False, "faces": 1, "truth": UNKNOWN, "best": "a", "score": float(rng.uniform(0, 0.8))})
    for i in range(100):
        best = "a" if i % 4 else "b"
        probes.append({"known": True, "faces": 1, "truth": "a", "best": best, "score": float(rng.uniform(0.3, 1.0))})
    probes.append({"known": True, "faces": 0, "truth": "a", "best": evaluate.NO_FACE, "score": 0.0})
    points = evaluate.operating_points(probes, (0.01, 0.05))
    assert [p["target_far"] for p in points] == [0.01, 0.05]
    for point in points:
        t = point["threshold"]
        fa = sum(1 for p in probes if not p["known"] and p["score"] >= t)
        right = sum(1 for p in probes if p["known"] and p["best"] == "a" and p["faces"] and p["score"] >= t)
        assert fa <= point["target_far"] * 200
        assert point["stranger_false_accept_rate"] == pytest.approx(fa / 200)
        assert point["known_accuracy"] == pytest.approx(right / 101)
    assert points[0]["threshold"] >= points[1]["threshold"]


def test_help_documents_every_flag(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="eval")
    evaluate.add_arguments(parser)
    text = parser.format_help()
    for flag in ("--bundle", "--photos", "--json", "--threads", "--min-face-size"):
        assert flag in text
    assert isinstance(evaluate.HELP, str) and evaluate.HELP
    assert Path(evaluate.__file__).name == "evaluate.py"


def test_confusions_and_lookalikes_are_named_in_the_report():
    """Who is taken for whom: the figures a user needs to aim a correction (synthetic probes, no bundle)."""
    def probe(folder: str, known: bool, predicted: str) -> dict:
        p = {"folder": folder, "truth": folder if known else UNKNOWN, "known": known, "faces": 1,
             "predicted": predicted, "best": predicted, "score": 0.9}
        p["outcome"] = evaluate._outcome(p)
        return p

    probes = [probe("alice", True, "alice"), probe("alice", True, "bob"), probe("alice", True, "bob"),
              probe("bob", True, "alice"), probe("bob", True, "bob"),
              probe("carl", False, "alice"), probe("carl", False, "alice"), probe("carl", False, "bob"),
              probe("dana", False, UNKNOWN)]
    assert evaluate.confusions(probes) == [{"truth": "alice", "predicted": "bob", "probes": 2},
                                           {"truth": "bob", "predicted": "alice", "probes": 1}]
    result = {"per_person": {}, "strangers": {
        "carl": {"probes": 3, "false_accepts": 3, "rejected": 0, "no_face": 0, "false_accept_rate": 1.0,
                 "taken_for": {"alice": 2, "bob": 1}},
        "dana": {"probes": 1, "false_accepts": 0, "rejected": 1, "no_face": 0, "false_accept_rate": 0.0,
                 "taken_for": {}}},
        "confusions": evaluate.confusions(probes)}
    lines = [line for line in evaluate.format_report({
        **result, "bundle_id": "b", "photos": "p", "threads": 1, "known_accuracy": 0.6, "closed_set_accuracy": 0.6,
        "stranger_false_accept_rate": 0.75, "no_face_rate": 0.0, "operating_points": [], "latency_ms": {},
        "classifier": {"kind": "gallery", "quantization": "int8", "input_size": 150, "accept_threshold": 0.9},
        "counts": {"right": 3, "known_probes": 5, "stranger_probes": 4, "stranger_no_face": 0, "false_accepts": 3,
                   "no_face": 0, "probes": 9, "unreadable": 0}}).splitlines()]
    assert any(line.startswith("carl") and line.endswith("alice 2, bob 1") for line in lines), lines
    assert any(line.startswith("dana") and line.rstrip().endswith("0.0%") for line in lines), lines
    assert "confused: alice named bob in 2 photo(s)" in lines
