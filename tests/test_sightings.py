"""The sightings log: one row per event_id in SQLite and in PostgreSQL, the daily summary, the CSV export, and
`python -m device sightings run` against a real mosquitto losing nothing across its own restart, the broker's
restart and a database that refuses writes for a while."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from faceberry.device.outputs.events import encode, event_payload
from tests.plugins.processes import free_port
from tests.plugins.sightings import TOPIC, Logger, publish, stored_ids, wait_rows

sa = pytest.importorskip("sqlalchemy", reason="the sightings log needs SQLAlchemy: "
                                              "pip install -r requirements-sightings.txt")

from faceberry.device.ops.sightings import (  # noqa: E402 - after the skip: the module's tests need SQLAlchemy
    EXPORT_COLUMNS,
    BadEventError,
    SightingsStore,
    day_bounds,
    export_rows,
    parse_event,
    summarize,
    write_csv,
)

ROOT = Path(__file__).resolve().parent.parent
PARIS = ZoneInfo("Europe/Paris")


def event(label: str = "alice", at: str = "2026-01-31T08:15:02.123Z", device: str = "front-door",
          camera: str = "door", **extra) -> dict:
    moment = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    payload = event_payload(device_id=device, camera=camera, label=label, score=0.97, bbox=[1, 2, 30, 40],
                            track_id=1, frames=3, model="faceberry-test", timestamp=moment)
    payload.update(extra)
    return payload


# --- PostgreSQL, where its server is installed (apt's postgresql) -------------------------------------------

def _pg_bin() -> Path | None:
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / "initdb").is_file():
            return base
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class Postgres:
    """A throwaway PostgreSQL cluster on a loopback port (trust authentication), stoppable and restartable."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # Not under pytest's 0700 tmp_path: as root, the server runs as the `postgres` user, which must write here.
        self.root = Path(tempfile.mkdtemp(prefix="faceberry-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "faceberry", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self.as_user, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{tool} failed: {proc.stderr[-800:]}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, dbname: str) -> str:
        return f"postgresql://faceberry@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="faceberry", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="module")
def postgres() -> Postgres:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server is not installed (apt install postgresql): the PostgreSQL cases need one")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -r requirements-sightings.txt")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: initdb refuses root")
    server = Postgres(bindir)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "sightings.sqlite3")
    server = request.getfixturevalue("postgres")
    return server.create_database(f"t{time.time_ns()}")


# --- the store ------------------------------------------------------------------------------------------

def test_one_row_per_event_id_and_the_whole_payload_kept(db) -> None:
    store = SightingsStore(db)
    try:
        first = event(stranger_id=None, future_field={"kept": True})
        assert store.add(parse_event(TOPIC, encode(first)))
        # At least once: the outbox replaying it, a bridge reconnecting. The same event is the same row.
        assert not store.add(parse_event(TOPIC, encode(first)))
        assert store.add(parse_event(TOPIC, encode(event(at="2026-01-31T09:00:00.000Z"))))
        assert store.count() == 2
        with store.engine.connect() as conn:
            payload = conn.execute(sa.select(store.sightings.c.payload)
                                   .where(store.sightings.c.event_id == first["event_id"])).scalar()
        assert json.loads(payload)["future_field"] == {"kept": True}
        got = list(store.rows())
        assert got[0].event_id == first["event_id"]
        assert got[0].seen_at == datetime(2026, 1, 31, 8, 15, 2, 123000, tzinfo=timezone.utc)
    finally:
        store.close()
    # The schema is created once: opening it again (as summary and export do) finds the rows.
    again = SightingsStore(db, create=False)
    assert again.count() == 2
    again.close()


def test_the_daily_summary_follows_the_local_day_per_person_and_camera(db) -> None:
    store = SightingsStore(db)
    events = [
        # 00:30 in Paris on the 31st (23:30 UTC the day before): the 31st's first sighting.
        event("alice", "2026-01-30T23:30:00.000Z", camera="door"),
        event("alice", "2026-01-31T07:00:00.000Z", device="back-door", camera="garden"),
        event("alice", "2026-01-31T17:45:10.000Z", camera="door"),
        event("bob", "2026-01-31T12:00:00.000Z", camera="door"),
        event("unknown", "2026-01-31T13:00:00.000Z", stranger_id="s-0000000a"),
        event("unknown", "2026-01-31T14:00:00.000Z", stranger_id="s-0000000a"),
        event("unknown", "2026-01-31T15:00:00.000Z", stranger_id="s-0000000b"),
        event("alice", "2026-01-31T23:10:00.000Z"),  # 00:10 on Feb 1st in Paris
    ]
    for e in events:
        store.add(parse_event(TOPIC, encode(e)))
    rows = list(store.rows(*day_bounds(date(2026, 1, 31), date(2026, 1, 31), PARIS)))
    assert len(rows) == 7
    people = summarize(rows, PARIS)
    alice = next(r for r in people if r["person"] == "alice")
    assert alice == {"day": "2026-01-31", "person": "alice", "stranger_id": "",
                     "first_seen": "2026-01-31T00:30:00+01:00", "last_seen": "2026-01-31T18:45:10+01:00",
                     "count": 3, "first_where": "front-door/door", "last_where": "front-door/door",
                     "cameras": "back-door/garden:1 front-door/door:2"}
    strangers = {r["stranger_id"]: r["count"] for r in people if r["person"] == "unknown"}
    assert strangers == {"s-0000000a": 2, "s-0000000b": 1}
    assert [r["person"] for r in summarize(rows, PARIS, unknown=False)] == ["alice", "bob"]
    per_camera = summarize(rows, PARIS, by="camera")
    assert {(r["person"], r["device_id"], r["camera"], r["count"]) for r in per_camera if r["person"] == "alice"} == {
        ("alice", "front-door", "door", 2), ("alice", "back-door", "garden", 1)}
    # In UTC the 30th's sighting is another day's.
    utc_rows = list(store.rows(*day_bounds(date(2026, 1, 31), date(2026, 1, 31), timezone.utc)))
    assert next(r for r in summarize(utc_rows, timezone.utc) if r["person"] == "alice")["count"] == 3
    store.close()


def test_a_day_at_a_dst_change_is_whole() -> None:
    start, end = day_bounds(date(2026, 3, 29), date(2026, 3, 29), PARIS)
    assert (end - start).total_seconds() == 23 * 3600


def test_the_export_is_csv_a_spreadsheet_opens_without_running_a_name(tmp_path) -> None:
    store = SightingsStore(str(tmp_path / "s.sqlite3"))
    store.add(parse_event(TOPIC, encode(event("=HYPERLINK(\"http://x\")", "2026-01-31T08:00:00.000Z"))))
    store.add(parse_event(TOPIC, encode(event("alice", "2026-01-31T09:00:00.000Z"))))
    out = io.StringIO()
    assert write_csv(export_rows(store.rows(), PARIS), EXPORT_COLUMNS, out) == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["label"] for r in rows] == ["'=HYPERLINK(\"http://x\")", "alice"]
    assert rows[1]["timestamp"] == "2026-01-31T09:00:00.000Z"
    assert rows[1]["local_time"] == "2026-01-31T10:00:00.000+01:00"
    assert list(rows[0]) == EXPORT_COLUMNS
    store.close()


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"label": "alice", "timestamp": "2026-01-31T08:00:00Z"}).encode(), "event_id"),
    (json.dumps({"event_id": "a b", "label": "x", "timestamp": "2026-01-31T08:00:00Z"}).encode(), "event_id"),
    (json.dumps({"event_id": "e1", "timestamp": "2026-01-31T08:00:00Z"}).encode(), "label is missing"),
    (json.dumps({"event_id": "e1", "label": "x", "timestamp": "yesterday"}).encode(), "not ISO 8601"),
    (json.dumps({"event_id": "e1", "label": "x", "timestamp": "2026-01-31T08:00:00Z", "score": "hi"}).encode(),
     "score"),
])
def test_what_is_not_an_event_is_named(payload: bytes, reason: str) -> None:
    with pytest.raises(BadEventError, match=reason):
        parse_event(TOPIC, payload)


# --- `python -m device sightings run` against a real mosquitto --------------------------------------------

def batch(n: int, start_minute: int) -> list[dict]:
    return [event("alice" if i % 2 else "bob", f"2026-01-31T09:{start_minute + i:02d}:00.000Z") for i in range(n)]


@pytest.mark.broker
def test_run_logs_every_event_once_across_its_own_restart_and_the_brokers(mosquitto_factory, tmp_path) -> None:
    broker = mosquitto_factory(persistent=True)
    db = str(tmp_path / "log" / "sightings.sqlite3")
    logger = Logger(broker, db, "faceberry-sightings-test1")
    try:
        assert logger.wait_log("subscribed to faceberry/+/events"), logger.log
        first = batch(10, 0)
        # Every event twice (a redelivery), and a message that is no event, which must not stop the log.
        publish(broker, [encode(e) for e in first] + [encode(e) for e in first[:5]] + [b"not json"])
        want = {e["event_id"] for e in first}
        assert set(wait_rows(db, want)) == want
        assert logger.wait_log("duplicates 5"), logger.log
        assert logger.stop() == 0, logger.log

        # The logger away: the broker queues for its session, and keeps the queue across its own restart.
        away = batch(10, 10)
        publish(broker, [encode(e) for e in away])
        broker.stop()
        broker.start()
        logger = Logger(broker, db, "faceberry-sightings-test1")
        assert logger.wait_log("resumed session"), logger.log
        want |= {e["event_id"] for e in away}
        assert set(wait_rows(db, want)) == want

        # The broker restarting under a running logger: it reconnects by itself.
        broker.stop()
        broker.start()
        assert logger.wait_log("resumed session", count=2), logger.log
        after = batch(10, 20)
        publish(broker, [encode(e) for e in after])
        want |= {e["event_id"] for e in after}
        got = wait_rows(db, want)
        assert set(got) == want and len(got) == len(want) == 30
    finally:
        rc = logger.stop()
    assert rc == 0, logger.log
    assert "lost the broker" in logger.log
    store = SightingsStore(db, create=False)
    rejected = store.rejected_rows()
    store.close()
    assert [(t, p) for t, _, p in rejected] == [(TOPIC, b"not json")]


@pytest.mark.broker
def test_a_refused_write_is_not_acknowledged_and_arrives_once_the_database_takes_writes(mosquitto_factory,
                                                                                        tmp_path) -> None:
    broker = mosquitto_factory(persistent=True)
    db = str(tmp_path / "sightings.sqlite3")
    logger = Logger(broker, db, "faceberry-sightings-test2")
    try:
        assert logger.wait_log("subscribed to"), logger.log
        # Another program holding SQLite's write lock longer than the logger's busy timeout (5 s).
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        events = batch(8, 0)
        publish(broker, [encode(e) for e in events[:4]])
        assert logger.wait_log("refused a write", timeout=30), logger.log
        publish(broker, [encode(e) for e in events[4:]])  # queued by the broker while the logger waits
        assert stored_ids(db) == []  # nothing committed, so nothing acknowledged
        blocker.execute("ROLLBACK")
        blocker.close()
        assert logger.wait_log("takes writes again", timeout=60), logger.log
        want = {e["event_id"] for e in events}
        got = wait_rows(db, want)
        assert set(got) == want and len(got) == 8
    finally:
        rc = logger.stop()
    assert rc == 0, logger.log


@pytest.mark.broker
def test_run_into_postgresql_survives_the_database_going_away(mosquitto_factory, postgres) -> None:
    broker = mosquitto_factory(persistent=True)
    # Trust authentication takes any password: this one is only there to be kept out of the log.
    db = postgres.create_database("outage").replace("faceberry@", "faceberry:s3cret@")
    logger = Logger(broker, db, "faceberry-sightings-test3")
    try:
        assert logger.wait_log("subscribed to"), logger.log
        before = batch(5, 0)
        publish(broker, [encode(e) for e in before])
        assert len(wait_rows(db, {e["event_id"] for e in before})) == 5
        postgres.stop()
        during = batch(5, 10)
        publish(broker, [encode(e) for e in during])
        assert logger.wait_log("refused a write", timeout=30), logger.log
        postgres.start()
        assert logger.wait_log("takes writes again", timeout=60), logger.log
        want = {e["event_id"] for e in before + during}
        got = wait_rows(db, want)
        assert set(got) == want and len(got) == 10
    finally:
        rc = logger.stop()
    assert rc == 0, logger.log
    assert "s3cret" not in logger.log and "postgresql+psycopg://faceberry:***@127.0.0.1" in logger.log


# --- summary and export on the command line -------------------------------------------------------------

def device_cli(*argv: str) -> subprocess.CompletedProcess:
    if argv[0] != sys.executable:
        argv = (sys.executable, "-m", "device", *argv)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_summary_and_export_commands(tmp_path) -> None:
    db = str(tmp_path / "sightings.sqlite3")
    store = SightingsStore(db)
    for e in [event("alice", "2026-01-31T07:30:00.000Z"), event("alice", "2026-01-31T16:00:00.000Z", camera="garage"),
              event("unknown", "2026-01-31T10:00:00.000Z", stranger_id="s-0000000a"),
              event("bob", "2026-02-01T08:00:00.000Z")]:
        store.add(parse_event(TOPIC, encode(e)))
    store.close()

    table = device_cli(sys.executable, "-m", "device", "sightings", "summary", "--db", db, "--day", "2026-01-31",
                       "--tz", "Europe/Paris")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["day", "person", "first", "last", "count", "where"]
    assert lines[1].split() == ["2026-01-31", "alice", "08:30:00", "17:00:00", "2", "front-door/door:1",
                                "front-door/garage:1"]
    assert "unknown (s-0000000a)" in lines[2]

    out = tmp_path / "summary.csv"
    proc = device_cli("sightings", "summary", "--db", db, "--day", "2026-01-31", "--tz", "Europe/Paris", "--csv",
                      "--by", "camera", "--no-unknown", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [(r["person"], r["camera"], r["count"]) for r in rows] == [("alice", "door", "1"), ("alice", "garage", "1")]

    export = tmp_path / "january.csv"
    proc = device_cli(sys.executable, "-m", "device", "sightings", "export", "--db", db, "--from", "2026-01-01",
                      "--to", "2026-01-31", "--tz", "Europe/Paris", "--out", str(export))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(export.open(encoding="utf-8")))
    assert [r["label"] for r in rows] == ["alice", "unknown", "alice"]  # bob is February's
    everything = device_cli("sightings", "export", "--db", db)
    assert len(list(csv.DictReader(io.StringIO(everything.stdout)))) == 4


@pytest.mark.parametrize(("args", "message"), [
    (["summary", "--db", "{tmp}/absent.sqlite3"], "no sightings database at"),
    (["summary", "--db", "{db}", "--tz", "Mars/Olympus"], "is not a time zone name"),
    (["summary", "--db", "{db}", "--day", "2026-13-01"], "is not a date; use YYYY-MM-DD"),
    (["export", "--db", "{db}", "--from", "2026-02-01", "--to", "2026-01-01"], "is before --from"),
    (["export", "--db", "{tmp}/not-a-db.txt"], "is not a SQLite database"),
    (["export", "--db", "{db}", "--out", "{tmp}/no/such/folder.csv"], "does not exist"),
    (["export", "--db", "mysql://x@y/z"], "--db"),
])
def test_bad_input_is_one_line_with_the_fix(tmp_path, args: list[str], message: str) -> None:
    db = tmp_path / "s.sqlite3"
    SightingsStore(str(db)).close()
    (tmp_path / "not-a-db.txt").write_text("hello " * 2000)
    proc = device_cli("sightings", *[a.format(tmp=tmp_path, db=db) for a in args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "absent.sqlite3").exists()  # reading never creates an empty database
