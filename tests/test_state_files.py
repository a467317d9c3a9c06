"""Damaged memory files (issue 21): the corrections, the stranger memory, the recent faces and the Home
Assistant discovery ledger each refuse a damaged file with one line naming it and what was lost, set it
aside, and start without it. NaN/inf embeddings are refused at load and never written. A disk that refuses
writes costs one line per kind of failure, not one per face."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest

from faceberry.device.memory.corrections import Negatives
from faceberry.device.memory.facestore import EMBEDDINGS, META, FaceStore
from faceberry.device.memory.strangers import StrangerMemory
from faceberry.device.outputs.homeassistant import DiscoveryLedger
from faceberry.statefile import RateLimitedLog, set_aside, write_atomic


def unit(*v: float) -> np.ndarray:
    x = np.array(v, np.float32)
    return x / np.linalg.norm(x)


def damage_lines(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and str(path) in r.getMessage()]


def aside_of(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


# --- the shared helper -----------------------------------------------------------------------------------

def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    write_atomic(path, "old")

    def fails(fh) -> None:
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, fails)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no tmp left


def test_a_status_file_on_a_full_disk_is_overwritten_in_place(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "status.json"
    write_atomic(path, json.dumps({"lost": 0}))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("faceberry.statefile.os.replace", full)
    with pytest.raises(OSError):
        write_atomic(path, json.dumps({"lost": 1}))  # not asked for: the old file stays
    assert json.loads(path.read_text()) == {"lost": 0}
    write_atomic(path, json.dumps({"lost": 12}), overwrite_if_full=True)
    assert json.loads(path.read_text()) == {"lost": 12}
    write_atomic(path, json.dumps({"lost": 3}), overwrite_if_full=True)  # shorter: padded, still JSON
    assert json.loads(path.read_text()) == {"lost": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_set_aside_names_the_file_and_keeps_three_copies(tmp_path: Path, caplog) -> None:
    path = tmp_path / "x.json"
    for i in range(5):
        time.sleep(0.002)  # copies made within one millisecond would sort by their counter only
        path.write_text(f"bad {i}")
        with caplog.at_level("WARNING"):
            target = set_aside(path, "not JSON", "nothing much")
        assert target is not None and not path.exists() and target.read_text() == f"bad {i}"
    assert len(aside_of(path)) == 3
    assert f"{path} is damaged (not JSON): moved aside to {target.name}; nothing much; the daemon goes on" in \
        caplog.records[-1].getMessage()


def test_rate_limited_log_says_each_kind_once_then_its_recovery(caplog) -> None:
    now = [0.0]
    limiter = RateLimitedLog(logging.getLogger("t"), repeat_s=60, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="t"):
        for _ in range(100):
            limiter.fail("full", "disk full")
        limiter.fail("io", "I/O error")
        limiter.ok("full", "writes again")
        limiter.fail("full", "disk full")  # flapping within the minute: counted, not logged
        limiter.ok("full", "writes again")
        now[0] = 61
        limiter.fail("full", "disk full")
    assert [r.getMessage() for r in caplog.records] == [
        "disk full", "I/O error", "writes again", "disk full (100 more like it since the last line)"]
    assert limiter.counts == {"full": 102, "io": 1}


def test_rate_limited_log_all_clear_sums_up_and_forgets(caplog) -> None:
    # The MQTT connection's use: attempts of any kind counted; when it is back, one summary and a fresh start.
    now = [10.0]
    limiter = RateLimitedLog(logging.getLogger("t"), repeat_s=60, clock=lambda: now[0])
    assert limiter.all_clear() is None
    with caplog.at_level("INFO", logger="t"):
        limiter.fail("refused", "connection refused")
        now[0] = 20
        limiter.fail("refused", "connection refused")
        limiter.fail("dns", "name not known")
        assert limiter.attempts == 3
        now[0] = 55
        assert limiter.all_clear() == "after 3 failed attempts over 45 s"
        assert limiter.attempts == 0
        limiter.fail("refused", "connection refused")  # a new outage: news at once, not rate-limited
    assert [r.getMessage() for r in caplog.records] == [
        "connection refused", "name not known", "connection refused"]


# --- corrections ----------------------------------------------------------------------------------------

def good_correction(label: str = "alice", rows: list[list[float]] | None = None) -> dict:
    return {"id": "c1", "label": label, "event_id": "e1", "at": 1.0, "embeddings": rows or [[1.0, 0.0, 0.0]]}


@pytest.mark.parametrize("content", [
    "", '{"corrections": [', "\x00\xff" * 10, "[]", '{"corrections": 3}', '{"other": []}', "[" * 5000,
])
def test_an_unreadable_corrections_file_is_set_aside(tmp_path: Path, caplog, content: str) -> None:
    path = tmp_path / "negatives-x.json"
    path.write_bytes(content.encode("latin-1"))
    with caplog.at_level("WARNING"):
        neg = Negatives(path)
    assert len(neg) == 0 and not path.exists() and len(aside_of(path)) == 1
    line, = damage_lines(caplog, path)
    assert "corrections" in line and "lost" in line and "goes on" in line and "\n" not in line
    neg.add("bob", unit(0, 1, 0)[None])  # and it works: a new file
    assert len(Negatives(path)) == 1


def test_nan_corrections_are_dropped_the_whole_ones_kept(tmp_path: Path, caplog) -> None:
    # The issue: one NaN correction turned every known face `unknown`.
    path = tmp_path / "negatives-x.json"
    records = [good_correction("alice"), good_correction("alice", [[math.nan, 0.0, 0.0]]),
               good_correction("bob", [[0.0, math.inf, 0.0]]), good_correction("carol", [[1.0, 2.0]]),
               good_correction("carol", [[1.0, 2.0, 3.0]]), {"label": 5}, "text"]
    path.write_text(json.dumps({"corrections": records}))  # Python writes NaN/Infinity literals
    with caplog.at_level("WARNING"):
        neg = Negatives(path)
    assert [r["label"] for r in neg.records] == ["alice", "carol"]
    assert np.all(np.isfinite(neg.for_label("alice"))) and neg.for_label("bob") is None
    line, = damage_lines(caplog, path)
    assert "5 of 7 corrections damaged" in line and "2 are kept" in line
    assert [r["label"] for r in Negatives(path).records] == ["alice", "carol"]  # written back whole
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_nan_embeddings_are_never_written_as_corrections(tmp_path: Path) -> None:
    path = tmp_path / "negatives-x.json"
    neg = Negatives(path)
    neg.add("alice", np.array([[1, 0, 0], [np.nan, 0, 0]], np.float32))
    assert len(neg.records[0]["embeddings"]) == 1
    with pytest.raises(ValueError, match="not finite"):
        neg.add("alice", np.array([[np.inf, 0, 0]], np.float32))
    assert len(Negatives(path)) == 1


def test_a_directory_where_the_corrections_file_should_be(tmp_path: Path, caplog) -> None:
    path = tmp_path / "negatives-x.json"
    path.mkdir()
    with caplog.at_level("WARNING"):
        neg = Negatives(path)
    assert len(neg) == 0 and "a directory" in damage_lines(caplog, path)[0] and aside_of(path)[0].is_dir()
    neg.add("alice", unit(1, 0, 0)[None])
    assert path.is_file()


# --- stranger memory ------------------------------------------------------------------------------------

def saved_strangers(path: Path) -> None:
    mem = StrangerMemory(path, threshold=0.8)
    mem.observe(unit(1, 0, 0))
    mem.observe(unit(0, 1, 0))
    assert len(StrangerMemory(path, 0.8)) == 2


def npz(path: Path, **arrays) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def good_arrays(**override) -> dict:
    now = 1e9 * 1.7
    arrays = {"ids": np.array(["s-1", "s-2"]), "totals": np.eye(2, 3, dtype=np.float32),
              "counts": np.array([1, 2]), "first": np.array([now, now]), "last": np.array([now, now])}
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize("name, make", [
    ("empty", lambda p: p.write_bytes(b"")),
    ("truncated", lambda p: (saved_strangers(p), p.write_bytes(p.read_bytes()[:300]))),
    ("bad zip", lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 200)),
    ("random bytes", lambda p: p.write_bytes(bytes(range(256)) * 4)),
    ("a .npy", lambda p: p.write_bytes(npy_bytes(np.zeros(3)))),
    ("missing key", lambda p: npz(p, **good_arrays(last=None))),
    ("wrong shapes", lambda p: npz(p, **good_arrays(counts=np.array([1, 2, 3])))),
    ("totals 1-D", lambda p: npz(p, **good_arrays(totals=np.zeros(2, np.float32)))),
    ("wrong types", lambda p: npz(p, **good_arrays(ids=np.array([1, 2])))),
    ("NaN", lambda p: npz(p, **good_arrays(totals=np.full((2, 3), np.nan, np.float32)))),
    ("inf time", lambda p: npz(p, **good_arrays(last=np.array([np.inf, 1.0])))),
    ("pickled objects", lambda p: npz(p, **good_arrays(ids=np.array([{"a": 1}, None], dtype=object)))),
    ("a directory", lambda p: p.mkdir()),
])
def test_a_damaged_stranger_memory_is_set_aside(tmp_path: Path, caplog, name: str, make) -> None:
    path = tmp_path / "strangers-x.npz"
    make(path)
    with caplog.at_level("WARNING"):
        mem = StrangerMemory(path, threshold=0.8, clock=lambda: 1e9 * 1.7)
    assert len(mem) == 0, name
    line, = damage_lines(caplog, path)
    assert "moved aside" in line and "forgotten" in line and "goes on" in line and "\n" not in line
    assert not path.exists() and len(aside_of(path)) == 1
    mem.observe(unit(1, 0, 0))  # and it works again
    assert len(StrangerMemory(path, 0.8, clock=lambda: 1e9 * 1.7)) == 1


def test_a_nan_face_is_not_remembered_among_the_strangers(tmp_path: Path, caplog) -> None:
    path = tmp_path / "strangers-x.npz"
    mem = StrangerMemory(path, threshold=0.8)
    a, _ = mem.observe(unit(1, 0, 0))
    with caplog.at_level("WARNING"):
        for _ in range(5):
            _, new = mem.observe(np.array([np.nan, 0, 0], np.float32))
            assert new
    assert list(mem.clusters) == [a.stranger_id] and mem.observe(unit(1, 0.01, 0))[0].stranger_id == a.stranger_id
    assert len([r for r in caplog.records if "not finite" in r.getMessage()]) == 1
    assert len(StrangerMemory(path, 0.8)) == 1


def test_cannot_save_the_stranger_memory_is_one_line_not_one_per_face(tmp_path: Path, caplog) -> None:
    # The issue: 215 WARNINGs in 25 s with a full disk, one per unknown face.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    mem = StrangerMemory(blocker / "strangers.npz", threshold=0.8)
    with caplog.at_level("WARNING"):
        for i in range(50):
            mem.observe(unit(1, i, 0))
    assert len([r for r in caplog.records if "cannot save the stranger memory" in r.getMessage()]) == 1


# --- recent faces ---------------------------------------------------------------------------------------

def store_two(root: Path) -> FaceStore:
    store = FaceStore(root, clock=lambda: 1000.0)
    for event in ("e1", "e2"):
        store.add(event_id=event, label="alice", score=0.9, track_id=1, bundle_id="b", crops=[np.zeros((8, 8, 3),
                  np.uint8)], embeddings=unit(1, 0, 0)[None], at=1000.0)
    return store


@pytest.mark.parametrize("name, damage", [
    ("meta truncated", lambda f: (f / META).write_text('{"event_id": "e1", "lab')),
    ("meta empty", lambda f: (f / META).write_text("")),
    ("meta a list", lambda f: (f / META).write_text("[1, 2]")),
    ("meta a string", lambda f: (f / META).write_text('"e1"')),
    ("meta wrong types", lambda f: (f / META).write_text(json.dumps(
        {"event_id": "e1", "label": "a", "score": "high", "track_id": 1, "bundle_id": "b", "at": 1000.0}))),
    ("meta NaN score", lambda f: (f / META).write_text(json.dumps(
        {"event_id": "e1", "label": "a", "score": math.nan, "track_id": 1, "bundle_id": "b", "at": 1000.0}))),
    ("meta missing key", lambda f: (f / META).write_text(json.dumps({"event_id": "e1"}))),
    ("meta a directory", lambda f: ((f / META).unlink(), (f / META).mkdir())),
    ("embeddings NaN", lambda f: np.save(f / EMBEDDINGS, np.full((1, 3), np.nan, np.float32))),
    ("embeddings 1-D", lambda f: np.save(f / EMBEDDINGS, np.zeros(3, np.float32))),
    ("embeddings truncated", lambda f: (f / EMBEDDINGS).write_bytes((f / EMBEDDINGS).read_bytes()[:70])),
    ("embeddings missing", lambda f: (f / EMBEDDINGS).unlink()),
])
def test_a_damaged_stored_face_is_removed_with_one_line(tmp_path: Path, caplog, name: str, damage) -> None:
    root = tmp_path / "faces-x"
    store_two(root)
    damage(root / "e1")
    with caplog.at_level("WARNING"):
        store = FaceStore(root, clock=lambda: 1000.0)
    assert store.get("e1") is None and store.get("e2") is not None, name
    line, = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(root) in line and "1 stored faces were damaged" in line and "e1" in line and "goes on" in line
    assert not (root / "e1").exists()


def test_a_file_where_the_faces_folder_should_be(tmp_path: Path, caplog) -> None:
    root = tmp_path / "faces-x"
    root.write_text("oops")
    with caplog.at_level("WARNING"):
        store = FaceStore(root)
    assert len(store) == 0 and root.is_dir() and aside_of(root)[0].read_text() == "oops"
    assert len(damage_lines(caplog, root)) == 1


def test_nan_embeddings_are_never_stored_with_a_face(tmp_path: Path, caplog) -> None:
    store = FaceStore(tmp_path / "faces")
    with caplog.at_level("WARNING"):
        for i in range(5):
            assert store.add(event_id=f"e{i}", label="a", score=0.5, track_id=1, bundle_id="b",
                             crops=[np.zeros((8, 8, 3), np.uint8)],
                             embeddings=np.array([[np.nan, 1, 0]], np.float32)) is None
    assert len(store) == 0 and not any((tmp_path / "faces").iterdir())
    assert len([r for r in caplog.records if "not finite" in r.getMessage()]) == 1


# --- the discovery ledger -------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "{", '{"topics": "a/b"}', '{"topics": [1, 2]}', "[]", "\xff\xfe",
                                     '{"topics": [""]}'])
def test_a_damaged_discovery_ledger_is_set_aside(tmp_path: Path, caplog, content: str) -> None:
    path = tmp_path / "discovery-x.json"
    path.write_bytes(content.encode("latin-1"))
    with caplog.at_level("WARNING"):
        ledger = DiscoveryLedger(path)
    assert ledger.topics == set() and len(aside_of(path)) == 1
    line, = damage_lines(caplog, path)
    assert "Home Assistant" in line and "goes on" in line
    assert ledger.replace(["homeassistant/sensor/a/config"]) == []
    assert DiscoveryLedger(path).topics == {"homeassistant/sensor/a/config"}
