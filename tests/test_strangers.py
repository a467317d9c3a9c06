"""Stranger memory (device/memory/strangers.py), the recent faces store (device/memory/facestore.py) and the corrections
file (device/memory/corrections.py); then through the daemon and a real mosquitto: two photos of one real
stranger get the same stranger_id (also after a restart), another stranger gets another, forget empties it."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from faceberry.contract import accept_with_negatives
from faceberry.device.memory.corrections import Negatives
from faceberry.device.memory.facestore import FaceStore, crop_with_margin
from faceberry.device.memory.strangers import StrangerMemory
from tests.plugins.daemon import HA_DEVICE as DEVICE
from tests.plugins.daemon import MARGIN, Daemon, blank, ha_config, link, predictions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unit(*v: float) -> np.ndarray:
    x = np.array(v, np.float32)
    return x / np.linalg.norm(x)


def test_clusters_are_stable_bounded_persisted_and_forgettable(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "strangers.npz"
    mem = StrangerMemory(path, threshold=0.8, max_clusters=2, retention=100, clock=clock)
    a, new = mem.observe(unit(1, 0, 0))
    assert new and a.count == 1 and a.stranger_id.startswith("s-")
    clock.now += 1
    again, new = mem.observe(unit(0.95, 0.1, 0))
    assert not new and again.stranger_id == a.stranger_id and again.count == 2 and again.first_seen == 1000.0
    b, new = mem.observe(unit(0, 1, 0))
    assert new and b.stranger_id != a.stranger_id
    # Read back by a new process: the same ids.
    mem2 = StrangerMemory(path, threshold=0.8, max_clusters=2, retention=100, clock=clock)
    clock.now += 1
    assert mem2.observe(unit(1, 0.05, 0))[0].stranger_id == a.stranger_id
    # Bounded: a third stranger pushes out the least recently seen (b).
    clock.now += 1
    c, _ = mem2.observe(unit(0, 0, 1))
    assert set(mem2.clusters) == {a.stranger_id, c.stranger_id}
    # Retention: unseen for longer than it, forgotten.
    clock.now += 101
    assert len(StrangerMemory(path, 0.8, 2, 100, clock=clock)) == 0
    assert mem2.forget(c.stranger_id) == 1 and mem2.forget() == 1 and len(StrangerMemory(path, 0.8)) == 0


def test_face_store_is_bounded_by_count_and_age(tmp_path: Path) -> None:
    clock = Clock()
    store = FaceStore(tmp_path / "faces", max_faces=2, max_age=50, clock=clock)
    crop = np.zeros((60, 50, 3), np.uint8)
    for i in range(3):
        clock.now += 1
        store.add(event_id=f"e{i}", label="unknown" if i else "alice", score=0.5, track_id=i, bundle_id="b",
                  crops=[crop, crop], embeddings=np.ones((2, 4)), stranger_id="s-1" if i == 2 else None)
    assert len(store) == 2 and store.get("e0") is None and not (tmp_path / "faces" / "e0").exists()
    assert store.last(label="unknown").event_id == "e2" and len(store.last().crops) == 2
    assert store.last(exclude="unknown") is None
    assert [f.event_id for f in store.of_stranger("s-1")] == ["e2"]
    (tmp_path / "faces" / "half-written").mkdir()  # no face.json: an interrupted write
    reopened = FaceStore(tmp_path / "faces", max_faces=2, max_age=50, clock=clock)
    assert len(reopened) == 2 and not (tmp_path / "faces" / "half-written").exists()
    assert reopened.get("e2").embeddings().shape == (2, 4)
    clock.now += 60
    assert len(FaceStore(tmp_path / "faces", max_faces=2, max_age=50, clock=clock)) == 0


def test_crop_with_margin_stays_inside_the_frame() -> None:
    frame = np.arange(100 * 200 * 3, dtype=np.uint8).reshape(100, 200, 3)
    assert crop_with_margin(frame, [50, 20, 90, 60]).shape == (84, 88, 3)
    assert crop_with_margin(frame, [-10, -10, 30, 30]).shape[:2] == (54, 54)


def test_negatives_rule_and_undo(tmp_path: Path) -> None:
    path = tmp_path / "neg.json"
    neg = Negatives(path)
    probe = unit(1, 0.1, 0)
    # Accepted as alice at 0.8 until that very face is stored as "not alice".
    assert accept_with_negatives("alice", 0.8, 0.5, probe, neg.for_label("alice"), 0.05) == "alice"
    neg.add("alice", probe[None], "e1")
    assert accept_with_negatives("alice", 0.8, 0.5, probe, Negatives(path).for_label("alice"), 0.05) == "unknown"
    # A face far from the negative (alice herself) is still alice; another person is not affected.
    assert accept_with_negatives("alice", 0.8, 0.5, unit(0, 0, 1), neg.for_label("alice"), 0.05) == "alice"
    assert accept_with_negatives("bob", 0.8, 0.5, probe, neg.for_label("bob"), 0.05) == "bob"
    assert accept_with_negatives("alice", 0.4, 0.5, unit(0, 0, 1), neg.for_label("alice"), 0.05) == "unknown"
    assert neg.undo()["event_id"] == "e1" and Negatives(path).for_label("alice") is None


@pytest.mark.broker
def test_a_stranger_seen_twice_gets_the_same_id(tmp_path, mosquitto_factory, tiny) -> None:
    from faceberry.bundle import load_bundle

    broker = mosquitto_factory()
    calibrated = load_bundle(Path(tiny["bundle"])).accept_threshold
    newcomer = sorted(Path(tiny["newcomer_photos"]).iterdir()) + [Path(p) for p in tiny["newcomer_probes"]]
    lfw = Path(tiny["newcomer_probes"][0]).parent.parent
    others = [sorted(d.glob("*.jpg"))[0] for d in sorted(lfw.iterdir())
              if d.is_dir() and d.name not in tiny["people"] and d.name != tiny["newcomer"]][-12:]

    def find(threshold: float) -> tuple[Path, Path, Path] | None:
        seen = {p: (label, vec) for p, (label, _, vec) in zip(newcomer + others, predictions(
            Path(tiny["bundle"]), newcomer + others, threshold), strict=True)}
        unknown_newcomer = [p for p in newcomer if seen[p][0] == "unknown"]
        for p1, p2 in itertools.combinations(unknown_newcomer, 2):
            same = float(seen[p1][1] @ seen[p2][1])
            for q in others:
                far = max(float(seen[q][1] @ seen[p1][1]), float(seen[q][1] @ seen[p2][1]))
                if (seen[q][0] == "unknown" and same >= threshold + MARGIN and far < threshold - MARGIN
                        and same > far + MARGIN):
                    return p1, p2, q
        return None

    # The suite's toy embedder packs faces close together, so its calibrated threshold may leave no pair of a
    # stranger's photos clearly within it; the config's threshold override (which the stranger memory follows,
    # as it follows the bundle's) moves it by at most 0.03 to where one exists.
    threshold, pick = next(((t, p) for t in (calibrated, *(calibrated + d for d in (-0.01, 0.01, -0.02, 0.02, -0.03,
                                                                                    0.03)))
                            if (p := find(t)) is not None), (calibrated, None))
    assert pick, "no two unknown photos of the newcomer are within the accept threshold of each other"
    p1, p2, q = pick
    camera = tmp_path / "camera"
    camera.mkdir()
    link(p1, camera / "a_first.jpg")
    blank(camera / "b_empty.jpg")
    link(q, camera / "c_other.jpg")
    blank(camera / "d_empty.jpg")
    link(p2, camera / "e_again.jpg")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    config = ha_config(tmp_path, bundle, broker, camera, memory={"strangers": True}, homeassistant={"commands": True},
                       recognition={"threshold": threshold})
    config.write_text(config.read_text().replace("loop: true", "loop: false"))
    events_topic = f"faceberry/{DEVICE}/events"

    def run() -> dict[str, dict]:
        d = Daemon(config, broker)
        d.wait(lambda m: sum(t == events_topic for t, _, _ in m) >= 3 or d.proc.poll() is not None, 90)
        d.stop()
        return {Path(e["source"]).name: e for e in d.json_on(events_topic)}

    first = run()
    assert set(first) == {"a_first.jpg", "c_other.jpg", "e_again.jpg"}, first
    assert {e["label"] for e in first.values()} == {"unknown"}
    a, c, e = first["a_first.jpg"], first["c_other.jpg"], first["e_again.jpg"]
    assert e["stranger_id"] == a["stranger_id"] != c["stranger_id"]
    assert (a["stranger_count"], e["stranger_count"], c["stranger_count"]) == (1, 2, 1)
    assert e["stranger_first_seen"] == a["stranger_first_seen"] and a["stranger_new"] and not e["stranger_new"]
    # A restart: the same stranger keeps the same id (the memory is in state_dir).
    second = run()
    assert second["a_first.jpg"]["stranger_id"] == a["stranger_id"]
    assert second["a_first.jpg"]["stranger_count"] == 3 and not second["a_first.jpg"]["stranger_new"]
    assert (tmp_path / "state" / f"strangers-{DEVICE}.npz").is_file()
    assert json.loads((tmp_path / "state" / f"faces-{DEVICE}" / a["event_id"] / "face.json").read_text())[
        "stranger_id"] == a["stranger_id"]
