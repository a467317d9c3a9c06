"""The demo (`./quickstart.sh demo` → demo.py): its pieces, and one whole quick run against real faces.

The whole run trains and converts a small model, runs the real daemon in a subprocess against the
embedded broker (amqtt; mosquitto is covered by the daemon's own tests), and checks that the summary is
computed from the events the subscriber received: each event's label must match what
`device eval` answers for the same photo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import demo
from tests.conftest import ROOT, need_shared


def test_config_written_by_the_demo_is_valid_for_the_daemon(tmp_path: Path) -> None:
    from faceberry.device.config import load_config

    (tmp_path / "bundle").mkdir()
    (tmp_path / "camera").mkdir()
    demo.write_config(tmp_path / "device.yaml", tmp_path / "bundle", tmp_path / "camera", 18830)
    cfg = load_config(tmp_path / "device.yaml", env={})
    assert cfg.camera.source == "folder" and Path(str(cfg.camera.device)) == tmp_path / "camera"
    assert cfg.tracking.votes_needed == demo.FRAMES_PER_VISIT and cfg.tracking.max_age == 0
    assert cfg.events.cooldown == 0 and cfg.mqtt.port == 18830 and cfg.device_id == demo.DEVICE_ID


def test_plan_keeps_training_camera_and_strangers_apart(tmp_path: Path, detector_path: Path) -> None:
    faces = need_shared("faces", "lfw-dev")
    preset = demo.PRESETS["quick"]
    plan = demo.make_plan(faces, tmp_path, preset, seed=3)
    assert len(plan.people) == preset["people"]
    trained = {p.name for person in plan.people for p in (plan.train_dir / person).iterdir()}
    assert all(len(list((plan.train_dir / p).iterdir())) == preset["train_photos"] for p in plan.people)
    negatives = {d.name for d in plan.negatives_dir.iterdir()}
    assert negatives and not negatives & set(plan.people)
    shown = {Path(v.photo).name for v in plan.visits}
    assert not shown & trained, "a held-out photo was also trained on"
    strangers = {v.person for v in plan.visits if not v.known}
    assert strangers and not strangers & set(plan.people) and not strangers & negatives
    assert {v.person for v in plan.visits if v.known} <= set(plan.people)
    # Every held-out photo is accounted for: shown to the camera or listed as screened out.
    assert len(plan.visits) + len(plan.screened_out) == preset["people"] * preset["test_photos"] + preset["strangers"]
    # Each visit is FRAMES_PER_VISIT frames of the photo then one empty frame, in order.
    frames = sorted(plan.camera_dir.iterdir())
    assert len(frames) == len(plan.visits) * (demo.FRAMES_PER_VISIT + 1)
    first = plan.visits[0]
    assert frames[0].read_bytes() == Path(first.photo).read_bytes()
    assert frames[demo.FRAMES_PER_VISIT].suffix == ".png"
    # Every camera frame of a visit is listed on it, so an event's `source` leads back to the visit.
    for visit in plan.visits:
        assert len(visit.frames) == demo.FRAMES_PER_VISIT
        assert all((plan.camera_dir / f).read_bytes() == Path(visit.photo).read_bytes() for f in visit.frames)
    saved = json.loads((tmp_path / "visits.json").read_text())
    assert [v["photo"] for v in saved] == [v.photo for v in plan.visits]
    # The eval folder holds the same photos, one folder per person (strangers under their own names).
    assert sum(1 for _ in plan.test_dir.rglob("*.jpg")) == len(plan.visits)


def test_plan_refuses_a_set_that_is_too_small(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for person in ("a", "b"):
        (photos / person).mkdir(parents=True)
        (photos / person / "1.jpg").write_bytes(b"x")
    with pytest.raises(demo.DemoError, match="people with >="):
        demo.make_plan(photos, tmp_path / "work", demo.PRESETS["quick"], seed=0)


def test_lfw_arrays_are_written_as_jpegs_with_the_right_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2
    import sklearn.datasets

    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, size=(3, 50, 40, 3)).astype(np.float32)  # scikit-learn's 0–1 floats
    fake = SimpleNamespace(images=images, target=np.array([0, 1, 0]), target_names=np.array(["Ann Lee", "Bo"]))
    monkeypatch.setattr(sklearn.datasets, "fetch_lfw_people", lambda **kw: fake)
    demo.write_lfw_arrays(tmp_path, min_faces=20)
    assert sorted(p.name for p in (tmp_path / "Ann_Lee").iterdir()) == ["Ann_Lee_0001.jpg", "Ann_Lee_0002.jpg"]
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "Bo" / "Bo_0001.jpg")), cv2.COLOR_BGR2RGB)
    assert back.shape == (50, 40, 3)
    assert abs(float(back.mean()) - float(images[1].mean() * 255)) < 3  # not 0–1 values, not wrapped around


def test_lfw_download_copies_the_unpacked_originals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets

    home = tmp_path / "sk"
    for name, n in (("Ann_Lee", 3), ("Bo", 2), ("Cy", 1)):
        folder = home / "lfw_home" / "lfw_funneled" / name
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{name}_{i + 1:04d}.jpg").write_bytes(f"{name}{i}".encode())
    calls: list[dict] = []

    def fetch(**kwargs: object) -> SimpleNamespace:
        calls.append(kwargs)
        return SimpleNamespace(target_names=np.array(["Ann Lee", "Bo"]))

    monkeypatch.setattr(sklearn.datasets, "fetch_lfw_people", fetch)
    monkeypatch.setattr(sklearn.datasets, "get_data_home", lambda: str(home))
    dest = demo.lfw_photos(tmp_path / "lfw", min_faces=2)
    assert calls and calls[0]["min_faces_per_person"] == 2
    assert sorted(demo.people_in(dest)) == ["Ann_Lee", "Bo"]  # only people with enough photos
    assert (dest / "Bo" / "Bo_0002.jpg").read_bytes() == b"Bo1"
    assert demo.lfw_photos(tmp_path / "lfw", min_faces=2) == dest and len(calls) == 1  # reused, not fetched again


def _outcome(person: str, known: bool, label: str, index: int = 0) -> demo.Outcome:
    return demo.Outcome(demo.Visit(index, f"/x/{person}/{person}_{index}.jpg", person, known), label, 0.9)


def test_summary_counts_right_and_wrong_from_outcomes(capsys: pytest.CaptureFixture[str]) -> None:
    outcomes = [
        _outcome("ann", True, "ann", 0), _outcome("ann", True, "unknown", 1), _outcome("bo", True, "ann", 2),
        _outcome("zed", False, "unknown", 3), _outcome("yan", False, "bo", 4),
    ]
    result = {"outcomes": outcomes, "statuses": ["online", "offline"], "unmatched": 0, "first_event_s": 1.0}
    probes = [{"folder": "ann", "path": "ann/ann_0.jpg", "predicted": "ann"},
              {"folder": "bo", "path": "bo/bo_2.jpg", "predicted": "bo"}]
    summary = demo.summarise(result, [o.visit for o in outcomes], {"training": 1.0}, None, probes)
    assert (summary["known_faces"], summary["known_right"], summary["known_unknown"],
            summary["known_wrong_person"]) == (3, 1, 1, 1)
    assert (summary["strangers"], summary["strangers_right"]) == (2, 1)
    assert summary["agrees_with_eval"] == (1, 2)
    out = capsys.readouterr().out
    assert "1 of 3 recognised correctly" in out and "1 of 2 called unknown" in out


@pytest.mark.training
def test_quick_demo_end_to_end_with_the_embedded_broker(tmp_path: Path, detector_path: Path) -> None:
    faces = need_shared("faces", "lfw-dev")
    weights = need_shared("weights", "mobilenet_v2_1.0_224_no_top.weights.h5")
    summary_path = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "demo.py", "--preset", "quick", "--broker", "embedded", "--photos", str(faces),
         "--weights", str(weights), "--workdir", str(tmp_path / "work"), "--json", str(summary_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embedded amqtt" in proc.stdout
    summary = json.loads(summary_path.read_text())
    visits = json.loads((tmp_path / "work" / "visits.json").read_text())
    assert summary["faces_shown"] == len(visits) > 0
    # One event per face shown, all of them received through the broker, online first, offline last.
    assert summary["events_received"] == summary["faces_shown"]
    assert summary["status"][0] == "online" and summary["status"][-1] == "offline"
    assert summary["known_faces"] + summary["strangers"] == summary["faces_shown"]
    # The default path is the face backbone (dlib's ResNet, rebuilt): held-out faces of the people it
    # was given are named, strangers are not (the quick preset shows 3 people × 3 photos + 3 strangers).
    assert "train backbone --arch dlib-resnet" in proc.stdout
    assert summary["known_right"] >= summary["known_faces"] - 1, summary
    assert summary["strangers_right"] >= summary["strangers"] - 1, summary
    # Events were matched to the right photos: the daemon agrees with `device eval` photo by photo.
    agree, compared = summary["agrees_with_eval"]
    assert compared == summary["faces_shown"] and agree == compared
    for name in ("photos", "training", "conversion", "device", "eval", "total"):
        assert summary["seconds"][name] > 0
    assert set(summary["latency_ms"]) >= {"detect", "classify"}
    assert "summary (computed from the events the subscriber received)" in proc.stdout
