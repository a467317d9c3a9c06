"""Fuzz (issue 21): damaged state files, made on the fly from a seeded generator, through the loaders the
daemon starts with: the outbox, the corrections, the stranger memory, the recent faces and the Home
Assistant discovery ledger. What must hold: no exception out of a loader (0 tracebacks), at most one
WARNING line per damaged file and it names the file, the loader is usable afterwards, and nothing it
holds is NaN.

The damage is drawn by hypothesis: each case gets a `random.Random` whose every draw hypothesis makes (and
shrinks to the smallest failing case). The sample is fixed unless FACEBERRY_FUZZ_SEED is set, which draws
another one (and replays it).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from faceberry.device.memory.corrections import Negatives
from faceberry.device.memory.facestore import EMBEDDINGS, META, FaceStore
from faceberry.device.memory.strangers import StrangerMemory
from faceberry.device.messaging.outbox import Outbox
from faceberry.device.outputs.homeassistant import DiscoveryLedger

SEED = int(os.environ.get("FACEBERRY_FUZZ_SEED", "21"))
CASES_PER_KIND = 30  # 5 kinds: 150 damaged files
FUZZ = settings(max_examples=CASES_PER_KIND, deadline=None, database=None,
                derandomize="FACEBERRY_FUZZ_SEED" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
randoms = st.randoms(use_true_random=False)


def _seeded(test: Any) -> Any:
    return seed(SEED)(test) if "FACEBERRY_FUZZ_SEED" in os.environ else test


def _fresh(tmp_path: Path) -> Path:
    """A folder of its own for one hypothesis example (tmp_path is shared by all of a test's examples)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))
WRONG: list[Any] = [None, True, -1, 0, 2**70, 1e308, math.nan, math.inf, "", "x" * 3000, [], {}, [1, "a"],
                    {"a": None}]


# --- ways to damage bytes ---------------------------------------------------------------------------------

def truncate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    at = rng.randrange(0, max(1, len(data)))
    return f"truncated at {at}", data[:at]


def overwrite(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    if not data:
        return "random", rng.randbytes(rng.randint(1, 64))
    at = rng.randrange(len(data))
    n = rng.randint(1, 4096)
    junk = bytes(rng.getrandbits(8) for _ in range(min(n, len(data) - at)))
    return f"{len(junk)} random bytes at {at}", data[:at] + junk + data[at + len(junk):]


def flip(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return "bits flipped", bytes(out)


def header(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    n = rng.choice([1, 16, 100, 512])
    return f"first {n} bytes zeroed", bytes(n) + data[n:]


def whole(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    return rng.choice([("empty", b""), ("random", rng.randbytes(rng.randint(1, 5000))),
                       ("text", b"hello\n" * rng.randint(1, 100)), ("zeros", bytes(rng.randint(1, 9000)))])


BYTE_DAMAGE = [truncate, overwrite, flip, header, whole]


def json_damage(doc: Any, rng: random.Random) -> tuple[str, bytes]:
    """A JSON document damaged as text or as values (wrong types, NaN, depth)."""
    choice = rng.random()
    if choice < 0.4:
        return rng.choice(BYTE_DAMAGE)(json.dumps(doc).encode(), rng)
    if choice < 0.5:
        depth = rng.randint(500, 5000)
        return f"nested {depth} deep", ("[" * depth + "]" * depth).encode()
    doc = json.loads(json.dumps(doc))
    path = []
    node = doc
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.3:
            break
        node = node[key]
    value = rng.choice(WRONG)
    if not path:
        return f"whole document {value!r:.30}", json.dumps(value).encode()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return f"{'/'.join(map(str, path))} = {value!r:.30}", json.dumps(doc).encode()  # NaN written as NaN


# --- the files, whole ---------------------------------------------------------------------------------------

def corrections_doc() -> dict:
    return {"corrections": [{"id": f"c{i}", "label": "alice" if i % 2 else "bob", "event_id": f"e{i}", "at": 1.0 + i,
                             "embeddings": [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]} for i in range(4)]}


def ledger_doc() -> dict:
    return {"topics": [f"homeassistant/sensor/faceberry_x_{i}/config" for i in range(6)]}


def strangers_bytes(rng: random.Random) -> tuple[str, bytes]:
    n = 3
    arrays: dict[str, Any] = {"ids": np.array([f"s-{i:08x}" for i in range(n)]),
                              "totals": np.eye(n, 4, dtype=np.float32), "counts": np.arange(1, n + 1),
                              "first": np.full(n, 1.7e9), "last": np.full(n, 1.7e9)}
    what = "whole"
    if rng.random() < 0.5:
        key = rng.choice(list(arrays))
        change = rng.choice(["drop", "nan", "shape", "dtype", "empty", "object"])
        what = f"{key}: {change}"
        if change == "drop":
            del arrays[key]
        elif change == "nan":
            arrays[key] = np.full(arrays[key].shape, np.nan) if arrays[key].dtype.kind == "f" else \
                np.array([np.nan] * n)
        elif change == "shape":
            arrays[key] = np.resize(arrays[key], (n + 1, *arrays[key].shape[1:]))
        elif change == "dtype":
            arrays[key] = np.array(["x"] * n) if arrays[key].dtype.kind != "U" else np.arange(n)
        elif change == "empty":
            arrays[key] = np.zeros((0,))
        else:
            arrays[key] = np.array([{"a": 1}] * n, dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    if what == "whole" or rng.random() < 0.3:
        how, data = rng.choice(BYTE_DAMAGE)(data, rng)
        what = how if what == "whole" else f"{what}, {how}"
    return what, data


# --- running a case -----------------------------------------------------------------------------------------

def run_case(kind: str, name: str, path: Path, load: Callable[[], Any], caplog, failures: list[str]) -> Any:
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            loaded = load()
    except Exception as exc:  # the point: none may escape
        failures.append(f"{kind} [{name}]: {type(exc).__name__}: {exc}")
        return None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if len(lines) > 1:
        failures.append(f"{kind} [{name}]: {len(lines)} lines: {lines}")
    elif lines and (str(path) not in lines[0] or "\n" in lines[0]):
        failures.append(f"{kind} [{name}]: the line does not name {path} on one line: {lines[0]!r}")
    return loaded


def place(path: Path, data: bytes | None) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)


@pytest.fixture(scope="module")
def good_outbox(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("outbox") / "o.sqlite3"
    box = Outbox(path)
    for i in range(120):
        box.put("faceberry/x/events", json.dumps({"event_id": f"e{i}", "pad": "x" * (50 + i * 7)}))
        if i % 10 == 0:
            box.put("faceberry/x/person/a", f"state{i}", retain=True)
    box.ack(list(range(1, 30)))
    box.close()
    return path.read_bytes()


@FUZZ
@_seeded
@given(rng=randoms)
def test_damaged_outboxes_open_salvage_and_work(tmp_path: Path, caplog, good_outbox: bytes,
                                                 rng: random.Random) -> None:
    failures: list[str] = []
    how, data = rng.choice(BYTE_DAMAGE)(good_outbox, rng)
    path = _fresh(tmp_path) / "outbox.sqlite3"
    place(path, data)
    box = run_case("outbox", how, path, lambda p=path: Outbox(p), caplog, failures)
    if box is not None:
        try:
            msgs = box.after(0, 10_000)
            ids = [m.id for m in msgs]
            if ids != sorted(ids) or len(msgs) != len(box):
                failures.append(f"outbox [{how}]: {len(msgs)} rows readable, {len(box)} counted")
            box.put("t", b"still works")
            box.ack(ids)
        except Exception as exc:
            failures.append(f"outbox [{how}] after opening: {type(exc).__name__}: {exc}")
        finally:
            box.close()
    assert not failures, "\n".join(failures)


def _check_corrections(path: Path, how: str, caplog, failures: list[str]) -> None:
    neg = run_case("corrections", how, path, lambda p=path: Negatives(p), caplog, failures)
    if neg is None:
        return
    for label in ("alice", "bob"):
        rows = neg.for_label(label)
        if rows is not None and not np.all(np.isfinite(rows)):
            failures.append(f"corrections [{how}]: non-finite negatives kept for {label}")
    try:
        neg.add("carol", np.array([[0.0, 0.0, 1.0]], np.float32))
    except Exception as exc:
        failures.append(f"corrections [{how}] add: {type(exc).__name__}: {exc}")


def _check_ledger(path: Path, how: str, caplog, failures: list[str]) -> None:
    ledger = run_case("ledger", how, path, lambda p=path: DiscoveryLedger(p), caplog, failures)
    if ledger is not None and not all(isinstance(t, str) for t in ledger.topics):
        failures.append(f"ledger [{how}]: topics that are not text: {ledger.topics}")


def _check_strangers(path: Path, how: str, caplog, failures: list[str]) -> None:
    mem = run_case("strangers", how, path, lambda p=path: StrangerMemory(p, 0.8, clock=lambda: 1.7e9), caplog,
                   failures)
    if mem is None:
        return
    if any(not np.all(np.isfinite(s.total)) for s in mem.clusters.values()):
        failures.append(f"strangers [{how}]: a NaN cluster was loaded")
    try:
        mem.observe(np.array([0.0, 0.0, 0.0, 1.0], np.float32))
    except Exception as exc:
        failures.append(f"strangers [{how}] observe: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize(("name", "check"), [("negatives.json", _check_corrections),
                                             ("discovery.json", _check_ledger), ("strangers.npz", _check_strangers)])
def test_a_directory_where_a_state_file_should_be(name: str, check: Callable, tmp_path: Path, caplog) -> None:
    failures: list[str] = []
    path = tmp_path / name
    place(path, None)
    check(path, "a directory", caplog, failures)
    assert not failures, "\n".join(failures)


@FUZZ
@_seeded
@given(rng=randoms)
def test_damaged_corrections_files(tmp_path: Path, caplog, rng: random.Random) -> None:
    failures: list[str] = []
    path = _fresh(tmp_path) / "negatives.json"
    how, data = json_damage(corrections_doc(), rng)
    place(path, data)
    _check_corrections(path, how, caplog, failures)
    assert not failures, "\n".join(failures)


@FUZZ
@_seeded
@given(rng=randoms)
def test_damaged_discovery_ledgers(tmp_path: Path, caplog, rng: random.Random) -> None:
    failures: list[str] = []
    path = _fresh(tmp_path) / "discovery.json"
    how, data = json_damage(ledger_doc(), rng)
    place(path, data)
    _check_ledger(path, how, caplog, failures)
    assert not failures, "\n".join(failures)


@FUZZ
@_seeded
@given(rng=randoms)
def test_damaged_stranger_memories(tmp_path: Path, caplog, rng: random.Random) -> None:
    failures: list[str] = []
    path = _fresh(tmp_path) / "strangers.npz"
    how, data = strangers_bytes(rng)
    place(path, data)
    _check_strangers(path, how, caplog, failures)
    assert not failures, "\n".join(failures)


@FUZZ
@_seeded
@given(rng=randoms)
def test_damaged_recent_faces(tmp_path: Path, caplog, rng: random.Random) -> None:
    failures: list[str] = []
    meta = {"event_id": "e1", "label": "alice", "score": 0.9, "track_id": 1, "bundle_id": "b", "at": 1000.0,
            "stranger_id": None}
    buf = io.BytesIO()
    np.save(buf, np.eye(2, 4, dtype=np.float32))
    good_npy = buf.getvalue()
    root = _fresh(tmp_path) / "faces"
    folder = root / "e1"
    folder.mkdir(parents=True)
    (folder / "crop_00.jpg").write_bytes(b"\xff\xd8 not really")
    if rng.random() < 0.5:
        how, data = json_damage(meta, rng)
        (folder / META).write_bytes(data)
        (folder / EMBEDDINGS).write_bytes(good_npy)
    else:
        how, data = rng.choice(BYTE_DAMAGE)(good_npy, rng)
        how = f"{EMBEDDINGS} {how}"
        (folder / META).write_text(json.dumps(meta))
        (folder / EMBEDDINGS).write_bytes(data)
    store = run_case("faces", how, root, lambda r=root: FaceStore(r, clock=lambda: 1000.0), caplog, failures)
    face = store.get("e1") if store is not None else None
    if face is not None:
        try:
            vectors = face.embeddings()
            if not np.all(np.isfinite(vectors)) or vectors.ndim != 2:
                failures.append(f"faces [{how}]: a face with unusable embeddings was kept")
        except Exception as exc:
            failures.append(f"faces [{how}] embeddings(): {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
