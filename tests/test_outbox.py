"""The durable outbox: order, coalescing, bounds, one owner per file, and nothing lost to a SIGKILL while
the broker is down (a real writer process, a real mosquitto)."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

import pytest

from faceberry.device.config import MqttConfig
from faceberry.device.messaging.mqtt import MqttPublisher
from faceberry.device.messaging.outbox import Outbox, OutboxError, OutboxWriteError
from tests.plugins.broker import Subscriber
from tests.plugins.files import damage
from tests.plugins.processes import start

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


def test_a_file_that_is_not_a_database_is_set_aside_and_a_fresh_outbox_starts(tmp_path: Path, caplog) -> None:
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level("WARNING"):
        box = Outbox(path)
    try:
        box.put("t", b"new")
        assert payloads(box) == [b"new"] and box.set_aside is not None
        assert box.set_aside.read_bytes() == b"this is not a database" * 100  # kept for a person to look at
        line, = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
        assert str(path) in line and box.set_aside.name in line and "could be read" in line
    finally:
        box.close()


# --- SIGKILL while the broker is down -------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import json, sys, time
    from faceberry.device.config import MqttConfig
    from faceberry.device.messaging.mqtt import MqttPublisher

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
    writer = start([sys.executable, "-c", WRITER, str(broker.port), str(outbox), str(n)])
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
    with caplog.at_level("WARNING", logger="faceberry.device.messaging.mqtt"):
        pub.stop(timeout=5)
    assert any("20 messages kept in the outbox" in r.getMessage() for r in caplog.records)
    box = Outbox(tmp_path / "o.sqlite3")
    try:
        assert payloads(box) == [f"e{i}".encode() for i in range(20)]
    finally:
        box.close()


# --- a full or failing disk -----------------------------------------------------------------------------

def on_disk(path: Path) -> tuple[int, int]:
    """What a restart would find: rows and payload bytes, read by a connection of its own."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()


def test_a_full_database_loses_the_write_counts_it_and_the_counters_stay_what_is_on_disk(tmp_path: Path,
                                                                                          caplog) -> None:
    # PRAGMA max_page_count makes SQLite itself answer "database or disk is full" (SQLITE_FULL) once the
    # file would grow past it: the very error a full SD card gives, on any file system.
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, max_messages=1000)
    try:
        for i in range(5):
            box.put("p/alice", f"state{i}".encode() * 50, retain=True)  # coalesced inside each transaction
            box.put("t/events", bytes([i]) * 3000)
        pages = box._db.execute("PRAGMA page_count").fetchone()[0]
        box._db.execute(f"PRAGMA max_page_count = {pages + 3}")
        written = lost = 0
        with caplog.at_level("INFO", logger="faceberry.device.messaging.outbox"):
            for i in range(40):
                try:
                    box.put("p/alice", f"late{i}".encode() * 50, retain=True)
                    box.put("t/events", bytes([i]) * 3000)
                    written += 1
                except OutboxWriteError as exc:
                    assert exc.kind == "full" and "is full" in str(exc)
                    lost += 1
            assert lost and box.lost >= lost
            # The counters are the file's, not the sum of what was tried.
            assert (len(box), box.bytes) == on_disk(path)
            assert box.stats()["outbox_lost"] == box.lost
            # One line for the kind of failure, not one per lost message.
            lines = [r for r in caplog.records if "cannot write a message to the outbox" in r.getMessage()]
            assert len(lines) == 1 and "state_dir's file system is full" in lines[0].getMessage()
            # Room again: the outbox takes messages as before, and says so once.
            box._db.execute("PRAGMA max_page_count = 1000000")
            box.put("t/events", b"after")
            assert any("takes messages again" in r.getMessage() for r in caplog.records)
        assert (len(box), box.bytes) == on_disk(path)
        assert payloads(box)[-1] == b"after"
    finally:
        box.close()
    again = Outbox(path)
    try:
        assert again.recovered == len(payloads(again)) and again.set_aside is None
    finally:
        again.close()


def test_a_failed_delete_keeps_the_acknowledgement_in_memory_and_retries(tmp_path: Path, monkeypatch,
                                                                        caplog) -> None:
    monkeypatch.setattr("faceberry.device.messaging.outbox.RETRY_DELETE_S", 0.0)
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    try:
        ids = [box.put("t", f"m{i}") for i in range(6)]
        # A disk that refuses writes (SQLITE_READONLY: what a card remounted read-only gives).
        box._db.execute("PRAGMA query_only = 1")
        with caplog.at_level("ERROR", logger="faceberry.device.messaging.outbox"):
            assert box.ack(ids[:3]) == 0  # never raises
            assert box.ack(ids[3:4]) == 0
        assert box.undeleted == 4 and len(box) == 6 == on_disk(path)[0]
        # Delivered rows are never handed out again by this process.
        assert [m.payload for m in box.after(0, 10)] == [b"m4", b"m5"]
        assert [m.payload for m in box.after(0, 1)] == [b"m4"]
        assert len([r for r in caplog.records if "cannot delete delivered messages" in r.getMessage()]) == 1
        assert box.stats()["outbox_undeleted"] == 4
        box._db.execute("PRAGMA query_only = 0")
        assert box.retry_deletes() == 4
        assert box.undeleted == 0 and len(box) == 2 == on_disk(path)[0]
        assert box.ack(ids[4:]) == 2 and len(box) == 0
    finally:
        box.close()


def test_a_failed_delete_left_at_stop_is_sent_again_by_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    ids = [box.put("t", f"m{i}") for i in range(3)]
    box._db.execute("PRAGMA query_only = 1")
    box.ack(ids[:2])
    box._db.execute("PRAGMA query_only = 1")
    box.close()  # the last try fails too: at least once, so the next start sends them again
    again = Outbox(path)
    try:
        assert payloads(again) == [b"m0", b"m1", b"m2"]
    finally:
        again.close()


# --- damaged files ---------------------------------------------------------------------------------------

def filled(path: Path, n: int = 300, size: int = 200, *, close: bool = True) -> Outbox:
    box = Outbox(path)
    for i in range(n):
        box.put("t/events", f"e{i:04d}-".encode() + b"x" * size)
    if close:
        box.close()
    return box


@pytest.mark.parametrize("how, everything", [("header", True), ("magic", True), ("middle", False),
                                             ("truncated", False)])
def test_a_damaged_outbox_is_set_aside_and_its_readable_rows_are_kept(tmp_path: Path, caplog, how: str,
                                                                     everything: bool) -> None:
    path = tmp_path / "outbox.sqlite3"
    filled(path)
    damage(path, how)
    with caplog.at_level("WARNING"):
        box = Outbox(path)
    try:
        got = payloads(box)
        assert box.set_aside is not None and box.set_aside.name.startswith("outbox.sqlite3.corrupt-")
        assert box.set_aside.is_file() and box.recovered == len(got) == box.salvaged
        # In order, and each one as it was written.
        numbers = [int(p[1:5]) for p in got]
        assert numbers == sorted(numbers) and all(p == f"e{k:04d}-".encode() + b"x" * 200
                                                    for p, k in zip(got, numbers, strict=True))
        if everything:
            assert numbers == list(range(300)) and box.unreadable == 0
        else:
            assert 0 < len(got) < 300 and box.unreadable > 0
        line, = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        assert str(path) in line and box.set_aside.name in line and f"{len(got)} messages were readable" in line
        assert "goes on" in line
        assert box.stats()["outbox_salvaged"] == len(got)
    finally:
        box.close()
    # The fresh file is whole: the next start checks it and sets nothing aside.
    again = Outbox(path)
    try:
        assert again.set_aside is None and len(again) == len(got)
    finally:
        again.close()


def test_a_damaged_overflow_page_is_not_delivered_as_junk(tmp_path: Path) -> None:
    # A snapshot-sized message spills onto overflow pages; one overwritten reads back without an error,
    # with the wrong bytes. The check names its cell: that message is counted lost, not delivered wrong.
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    written = [bytes([i % 251]) * 5000 for i in range(600)]
    for payload in written:
        box.put("t/snapshot", payload)
    box.close()
    damage(path, "middle")
    box = Outbox(path)
    try:
        got = payloads(box)
        assert box.set_aside is not None and box.unreadable >= 1
        assert set(got) <= set(written) and len(got) + box.unreadable == 600
    finally:
        box.close()


def test_damage_with_the_last_commits_still_in_the_wal_keeps_them(tmp_path: Path) -> None:
    # What a power cut leaves: the newest rows only in outbox.sqlite3-wal, and a damaged header.
    live = tmp_path / "live" / "outbox.sqlite3"
    box = filled(live, n=50, close=False)
    box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the first 50 in the file itself
    for i in range(50, 70):
        box.put("t/events", f"e{i:04d}-".encode() + b"x" * 200)
    path = tmp_path / "outbox.sqlite3"
    for suffix in ("", "-wal"):
        Path(f"{path}{suffix}").write_bytes(Path(f"{live}{suffix}").read_bytes())
    box.close()
    assert Path(f"{path}-wal").stat().st_size > 0
    damage(path, "magic")
    reopened = Outbox(path)
    try:
        # Page 1 is in the WAL (the file grew since the last checkpoint): SQLite reads it from there, and
        # the checkpoint at close writes it back whole. Set aside or not, every row is there.
        assert [int(p[1:5]) for p in payloads(reopened)] == list(range(70))
    finally:
        reopened.close()


def test_a_database_of_another_program_is_set_aside(tmp_path: Path, caplog) -> None:
    path = tmp_path / "o.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE outbox (a, b)")
        db.execute("INSERT INTO outbox VALUES (1, 2)")
    db.close()
    with caplog.at_level("WARNING"):
        box = Outbox(path)
    try:
        assert len(box) == 0 and box.set_aside is not None
        assert any("not a faceberry outbox" in r.getMessage() and "no faceberry message" in r.getMessage()
                   for r in caplog.records)
    finally:
        box.close()


def test_an_empty_file_is_an_empty_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"")
    box = Outbox(path)
    try:
        assert len(box) == 0 and box.set_aside is None
        box.put("t", b"x")
    finally:
        box.close()


def test_only_the_newest_damaged_copies_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    for _ in range(5):
        path.write_bytes(b"junk" * 1000)
        Outbox(path).close()
    assert len(list(tmp_path.glob("o.sqlite3.corrupt-*"))) == 3


def test_a_page_damaged_while_running_is_set_aside_and_salvaged_in_place(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = filled(path, close=False)
    try:
        box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        box._db.execute("PRAGMA cache_size = 1")  # no copy of the damaged page in memory
        box._db.execute("PRAGMA mmap_size = 0")
        first = box.after(0, 10)  # the sender had handed these over before the damage
        damage(path, "middle")
        got = first + box.after(first[-1].id, 1000)
        # Set aside and salvaged as at a start, while running: the readable rows, with their ids.
        assert box.set_aside is not None and 0 < len(got) < 300 and box.unreadable > 0
        numbers = [int(m.payload[1:5]) for m in got]
        assert numbers == sorted(numbers) and numbers[-1] == 299
        assert all(m.id == int(m.payload[1:5]) + 1 for m in got)
        assert box.ack([m.id for m in got]) == len(got) and len(box) == 0  # the acks find their rows
        assert box.put("t/events", b"next") > 300  # ids go on above the ones handed out
        assert len(on_disk_rows := box.after(0, 10)) == 1 and on_disk_rows[0].payload == b"next"
    finally:
        box.close()


@pytest.mark.broker
def test_a_damaged_outbox_is_delivered_once_not_at_every_start(mosquitto, tmp_path: Path) -> None:
    # The issue: mid-file damage replayed, the sender died at the first PUBACK, every restart re-delivered.
    path = tmp_path / "state" / "outbox.sqlite3"
    box = Outbox(path)
    for i in range(120):
        box.put("faceberry/damaged/events", json.dumps({"event_id": f"id-{i}", "pad": "x" * 300}))
    box.close()
    damage(path, "middle")
    sub = Subscriber(mosquitto.host, mosquitto.port, "faceberry/damaged/events")
    cfg = MqttConfig(host=mosquitto.host, port=mosquitto.port, keepalive=5, reconnect_min_delay=1,
                     reconnect_max_delay=1)
    try:
        for _ in range(2):
            pub = MqttPublisher(cfg, "damaged", outbox=path)
            readable = pub.outbox.recovered
            pub.start()
            try:
                assert pub.flush(20) and pub.pending == 0 and pub.fatal is None
            finally:
                pub.stop(timeout=5)
        ids = [json.loads(p)["event_id"] for _, p, _ in sub.messages]
        assert sub.wait_for(lambda m: len(m) >= readable, 10)
        assert 0 < len(ids) < 120 and len(ids) == len(set(ids))  # delivered once, the second start had nothing
        assert sorted(ids, key=lambda e: int(e[3:])) == ids
    finally:
        sub.close()


@pytest.mark.broker
def test_the_sender_survives_deletes_the_disk_refuses(mosquitto, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("faceberry.device.messaging.outbox.RETRY_DELETE_S", 0.2)
    sub = Subscriber(mosquitto.host, mosquitto.port, "faceberry/nodelete/events")
    cfg = MqttConfig(host=mosquitto.host, port=mosquitto.port, keepalive=5, reconnect_min_delay=1,
                     reconnect_max_delay=1)
    pub = MqttPublisher(cfg, "nodelete", outbox=tmp_path / "o.sqlite3")
    try:
        for i in range(10):
            assert pub.publish("faceberry/nodelete/events", f"e{i}")
        with pub.outbox._lock:
            pub.outbox._db.execute("PRAGMA query_only = 1")
        pub.start()
        assert sub.wait_for(lambda m: len(m) >= 10, 20)
        assert pub.flush(10)  # delivered, though still on disk
        assert pub.fatal is None and pub._sender.is_alive()
        assert pub.pending == 10 == pub.stats()["undeleted"] and pub.published == 10
        assert not pub.publish("faceberry/nodelete/events", "refused")  # a lost write: False, counted
        assert pub.stats()["lost"] == 1
        with pub.outbox._lock:
            pub.outbox._db.execute("PRAGMA query_only = 0")
        deadline = time.monotonic() + 10
        while pub.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.pending == 0 and pub._sender.is_alive()
        assert sorted(p for _, p, _ in sub.messages) == sorted(f"e{i}".encode() for i in range(10))  # once each
    finally:
        pub.stop(timeout=5)
        sub.close()
