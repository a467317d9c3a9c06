"""The durable outbox: order, coalescing, bounds, one owner per file, and nothing lost to a SIGKILL while
the broker is down (a real writer process, a real mosquitto)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device.config import MqttConfig
from device.mqtt import MqttPublisher
from device.outbox import Outbox, OutboxError
from tests.fixtures_broker import Subscriber

ROOT = Path(__file__).resolve().parent.parent


def payloads(box: Outbox) -> list[bytes]:
    return [m.payload for m in box.after(0, 1_000_000)]


def test_messages_come_back_in_order_with_their_payloads_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    ids = [box.put("t/events", f"e{i}".encode(), qos=1) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    box.put("t/snap", b"\xff\xd8\x00binary", qos=0)
    box.ack(ids[:2])
    box.close()

    again = Outbox(path)
    try:
        assert again.recovered == 4
        msgs = again.after(0, 100)
        assert [m.payload for m in msgs] == [b"e2", b"e3", b"e4", b"\xff\xd8\x00binary"]
        assert [(m.topic, m.qos, m.retain) for m in msgs][-1] == ("t/snap", 0, False)
        assert again.after(msgs[1].id, 1)[0].payload == b"e4"  # paging continues after an id
        assert again.bytes == sum(len(m.payload) for m in msgs)
        # Acknowledging an id twice, or one that never existed, deletes nothing else.
        assert again.ack([ids[0], 10**9]) == 0 and len(again) == 4
    finally:
        again.close()


def test_retained_messages_are_coalesced_to_the_latest_per_topic(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    try:
        box.put("p/alice", b"a1", retain=True)
        box.put("p/events", b"ev1")
        box.put("p/alice", b"a2", retain=True)
        box.put("p/bob", b"b1", retain=True)
        box.put("p/events", b"ev2")  # events are never coalesced
        box.put("p/alice", b"a3", retain=True)
        assert payloads(box) == [b"ev1", b"b1", b"ev2", b"a3"]
        assert box.coalesced == 2 and box.dropped == 0 and len(box) == 4
    finally:
        box.close()


def test_bounds_drop_the_oldest_by_count_and_by_bytes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "count.sqlite3", max_messages=3)
    try:
        for i in range(7):
            box.put("t", f"m{i}")
        assert payloads(box) == [b"m4", b"m5", b"m6"] and box.dropped == 4
    finally:
        box.close()

    box = Outbox(tmp_path / "bytes.sqlite3", max_bytes=250)
    try:
        for i in range(5):
            box.put("t", bytes([i]) * 100)
        # 100-byte messages under a 250-byte bound: the two newest fit.
        assert [m.payload[0] for m in box.after(0, 10)] == [3, 4]
        assert box.bytes == 200 and box.dropped == 3 and box.dropped_bytes == 300
        # One message larger than the whole bound is kept alone rather than refused.
        box.put("t", b"x" * 1000)
        assert payloads(box) == [b"x" * 1000] and box.dropped == 5
    finally:
        box.close()


def test_one_daemon_per_outbox_file(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    first = Outbox(path)
    try:
        with pytest.raises(OutboxError, match="in use by another faceberry daemon"):
            Outbox(path)
    finally:
        first.close()
    Outbox(path).close()  # free again once the owner closed it


def test_wal_mode_and_the_sync_policy_are_what_the_docs_say(tmp_path: Path) -> None:
    for sync, level in (("normal", 1), ("full", 2)):
        box = Outbox(tmp_path / f"{sync}.sqlite3", sync=sync)
        try:
            assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert box._db.execute("PRAGMA synchronous").fetchone()[0] == level
        finally:
            box.close()
    with pytest.raises(ValueError, match="sync"):
        Outbox(tmp_path / "x.sqlite3", sync="sometimes")


def test_an_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OutboxError, match=r"cannot create the outbox .*state_dir"):
        Outbox(blocker / "outbox.sqlite3")


def test_a_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="move it away"):
        Outbox(path)


# --- SIGKILL while the broker is down -------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import json, sys, time
    from device.config import MqttConfig
    from device.mqtt import MqttPublisher

    port, outbox, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = MqttConfig(host="127.0.0.1", port=port, keepalive=5, reconnect_min_delay=1, reconnect_max_delay=1)
    pub = MqttPublisher(cfg, "killed", outbox=outbox)
    pub.start()
    for i in range(n):
        event = {"event_id": f"id-{i}", "timestamp": f"2026-01-31T08:00:{i % 60:02d}.000Z", "label": "alice"}
        assert pub.publish("faceberry/killed/events", json.dumps(event))
        pub.publish("faceberry/killed/person/alice", json.dumps({"last_seen": i}), retain=True)
    print("stored", flush=True)
    time.sleep(600)
""")


@pytest.mark.broker
def test_sigkill_while_the_broker_is_down_loses_nothing(mosquitto_factory, tmp_path: Path) -> None:
    n = 40
    broker = mosquitto_factory(persistent=True)
    sub = Subscriber(broker.host, broker.port, "faceberry/killed/events", session="faceberry-test-killed")
    broker.stop()
    outbox = tmp_path / "state" / "outbox.sqlite3"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(broker.port), str(outbox), str(n)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = writer.stdout.readline()
        assert line.strip() == "stored", writer.stderr.read()[-2000:]
    finally:
        writer.kill()
    writer.wait(10)
    assert writer.returncode == -signal.SIGKILL

    # What the killed process left on disk: every event, and the latest state only.
    with sqlite3.connect(outbox) as db:
        rows = db.execute("SELECT topic FROM outbox ORDER BY id").fetchall()
    assert [t for (t,) in rows].count("faceberry/killed/events") == n
    assert [t for (t,) in rows].count("faceberry/killed/person/alice") == 1

    broker.start()
    cfg = MqttConfig(host=broker.host, port=broker.port, keepalive=5, reconnect_min_delay=1, reconnect_max_delay=1)
    pub = MqttPublisher(cfg, "killed", outbox=outbox)
    assert pub.outbox.recovered == n + 1
    pub.start()
    try:
        expected = [f"id-{i}" for i in range(n)]
        assert sub.wait_for(lambda m: len({json.loads(p)["event_id"] for _, p, _ in m}) >= n, 30)
        got = [json.loads(p) for _, p, _ in sub.messages]
        ids = [e["event_id"] for e in got]
        # At least once, in the original order, with the original payloads (ids and timestamps).
        assert sorted(set(ids), key=ids.index) == expected
        first = {e["event_id"]: e for e in reversed(got)}
        assert all(first[f"id-{i}"]["timestamp"] == f"2026-01-31T08:00:{i % 60:02d}.000Z" for i in range(n))
        assert pub.flush(10) and pub.pending == 0
        late = Subscriber(broker.host, broker.port, "faceberry/killed/person/alice")
        try:
            assert late.wait_for(lambda m: bool(m), 10)
            assert json.loads(late.messages[-1][1]) == {"last_seen": n - 1}
        finally:
            late.close()
    finally:
        pub.stop(timeout=5)
        sub.close()
    # Delivered and acknowledged: nothing is replayed a second time.
    reopened = Outbox(outbox)
    try:
        assert len(reopened) == 0
    finally:
        reopened.close()


@pytest.mark.broker
def test_a_stop_while_the_broker_is_unreachable_keeps_the_messages(mosquitto_factory, tmp_path: Path,
                                                                   caplog) -> None:
    broker = mosquitto_factory()
    broker.stop()
    cfg = MqttConfig(host=broker.host, port=broker.port, keepalive=5, reconnect_min_delay=1, reconnect_max_delay=1)
    pub = MqttPublisher(cfg, "stopper", outbox=tmp_path / "o.sqlite3")
    pub.start()
    for i in range(20):
        pub.publish("faceberry/stopper/events", f"e{i}")
    with caplog.at_level("WARNING", logger="device.mqtt"):
        pub.stop(timeout=5)
    assert any("20 messages kept in the outbox" in r.getMessage() for r in caplog.records)
    box = Outbox(tmp_path / "o.sqlite3")
    try:
        assert payloads(box) == [f"e{i}".encode() for i in range(20)]
    finally:
        box.close()
