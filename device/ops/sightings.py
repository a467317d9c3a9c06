"""The sightings log: every faceberry event from MQTT in a database, a daily summary per person, a CSV export.

`python -m device sightings run` subscribes to `faceberry/+/events` and writes each event into SQLite (a file,
the default) or PostgreSQL (`--db postgresql://…`), one row per `event_id`: events are delivered at least
once, and a redelivered event (the daemon's outbox replaying it, a bridge reconnecting) is the same row.
`summary` gives, per day and person, the first and last sighting, how many, and where; `export` writes the
events as CSV.

Nothing the broker delivered is lost: the session is persistent (clean_session false, a stable client id),
the subscription QoS 1, and a message is acknowledged (PUBACK) only after its row is committed. If the
database refuses a write, the logger acknowledges nothing more, disconnects (the broker keeps the messages
in the session) and reconnects once the database takes writes again. A payload that is not an event is
kept in the `rejected` table with the reason, then acknowledged, so it cannot block the queue.

SQLAlchemy Core gives both databases one code path (and psycopg the PostgreSQL connection); both are
imported only by the command that needs them, so `python -m device --help` works without them.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import IO, Any

from faceberry.contract import UNKNOWN
from faceberry.errors import UnavailableError, UsageError

log = logging.getLogger(__name__)

HELP = "log every event from MQTT into SQLite or PostgreSQL; daily summary per person; CSV export"
DEFAULT_TOPIC = "faceberry/+/events"
SCHEMA = "1"
# The ids the daemon writes (faceberry.device.messaging.commands' rule): UUIDs for events, "s-" + hex for strangers.
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
INSTALL_HINT = "pip install -r requirements-sightings.txt"


class SightingsError(UsageError):
    """Bad arguments or a database that cannot be used as given (exit 2)."""


class DatabaseUnavailableError(UnavailableError):
    """The database cannot be reached right now (exit 3: systemd retries)."""


class BadEventError(ValueError):
    """A message on an events topic that is not a faceberry event."""


def _sa() -> Any:
    try:
        import sqlalchemy
    except ModuleNotFoundError as exc:
        raise SightingsError(f"the sightings log needs SQLAlchemy, which {sys.executable} does not have; "
                             f"{INSTALL_HINT}") from exc
    return sqlalchemy


# --- events ----------------------------------------------------------------------------------------------

def parse_time(text: Any) -> datetime:
    """An event's ISO 8601 timestamp as an aware UTC datetime (a naive one is taken as UTC)."""
    if not isinstance(text, str):
        raise BadEventError(f"timestamp {text!r} is not a string")
    try:
        # Python 3.10's fromisoformat does not read the trailing Z the daemon writes.
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError as exc:
        raise BadEventError(f"timestamp {text!r} is not ISO 8601") from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _text(event: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = event.get(key, default)
    if value is None or isinstance(value, str):
        return value
    raise BadEventError(f"{key} {value!r} is not a string")


def _number(event: dict[str, Any], key: str, kind: type) -> Any:
    value = event.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadEventError(f"{key} {value!r} is not a number")
    return kind(value)


def parse_event(topic: str, payload: bytes, received_at: datetime | None = None) -> dict[str, Any]:
    """A database row for one event message (docs/MQTT.md, "Event"), or BadEventError saying what is wrong."""
    try:
        event = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEventError(f"not JSON ({exc})") from exc
    if not isinstance(event, dict):
        raise BadEventError("not a JSON object")
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or not _ID.match(event_id):
        raise BadEventError(f"event_id {event_id!r} is missing or not 1-64 characters of A-Z a-z 0-9 . _ : -")
    label = _text(event, "label")
    if not label:
        raise BadEventError("label is missing")
    levels = topic.split("/")
    # The topic names the device (<prefix>/<device>/events) should an old payload lack it.
    device_id = _text(event, "device_id", levels[-2] if len(levels) >= 2 else "") or ""
    stranger = _text(event, "stranger_id")
    return {
        "event_id": event_id,
        "seen_at": parse_time(event.get("timestamp")),
        "device_id": device_id[:64],
        "camera": (_text(event, "camera", "") or "")[:200],
        "label": label[:200],
        "stranger_id": stranger[:64] if stranger else None,
        "score": _number(event, "score", float),
        "track_id": _number(event, "track_id", int),
        "frames": _number(event, "frames", int),
        "model": (_text(event, "model") or "")[:200] or None,
        "previous": (_text(event, "previous") or "")[:200] or None,
        "source": _text(event, "source"),
        "topic": topic,
        "received_at": received_at or datetime.now(timezone.utc),
        # Kept whole: fields this version does not have columns for (a later schema's) are not lost.
        "payload": payload.decode("utf-8"),
    }


# --- the database ----------------------------------------------------------------------------------------

def database_url(db: str) -> str:
    """--db as a SQLAlchemy URL: a URL as given (postgresql:// gets the psycopg driver), else a SQLite file."""
    if "://" in db:
        if db.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + db.split("://", 1)[1]
        return db
    return "sqlite:///" + str(Path(db).expanduser().resolve())


def default_db() -> str:
    """`$STATE_DIRECTORY/sightings.sqlite3` under systemd, else ~/.local/state/faceberry/sightings.sqlite3."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state) if state else Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser() / "faceberry"
    return str(base / "sightings.sqlite3")


@dataclass(frozen=True)
class Sighting:
    event_id: str
    seen_at: datetime
    device_id: str
    camera: str
    label: str
    stranger_id: str | None
    score: float | None
    track_id: int | None
    frames: int | None
    model: str | None
    previous: str | None
    source: str | None
    received_at: datetime


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no zone (SQLAlchemy stores the UTC wall time we give it); PostgreSQL's timestamptz does.
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


class SightingsStore:
    """The `sightings` table (one row per event_id), `rejected` (what was not an event) and `meta`."""

    def __init__(self, db: str, create: bool = True) -> None:
        sa = _sa()
        self.url = database_url(db)
        self._open_engine(sa, db, create)
        meta = sa.MetaData()
        tz = sa.DateTime(timezone=True)
        self.sightings = sa.Table(
            "sightings", meta,
            sa.Column("event_id", sa.String(64), primary_key=True),
            sa.Column("seen_at", tz, nullable=False, index=True),
            sa.Column("device_id", sa.String(64), nullable=False),
            sa.Column("camera", sa.String(200), nullable=False),
            sa.Column("label", sa.String(200), nullable=False),
            sa.Column("stranger_id", sa.String(64)),
            sa.Column("score", sa.Float),
            sa.Column("track_id", sa.Integer),
            sa.Column("frames", sa.Integer),
            sa.Column("model", sa.String(200)),
            sa.Column("previous", sa.String(200)),
            sa.Column("source", sa.Text),
            sa.Column("topic", sa.Text, nullable=False),
            sa.Column("received_at", tz, nullable=False),
            sa.Column("payload", sa.Text, nullable=False),
        )
        self.rejected = sa.Table(
            "rejected", meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("received_at", tz, nullable=False),
            sa.Column("topic", sa.Text, nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("payload", sa.LargeBinary, nullable=False),
        )
        self.meta = sa.Table("meta", meta, sa.Column("key", sa.String(64), primary_key=True),
                             sa.Column("value", sa.Text, nullable=False))
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        self._insert = insert
        try:
            if create:
                meta.create_all(self.engine)
                with self.engine.begin() as conn:
                    conn.execute(insert(self.meta).values(key="schema", value=SCHEMA)
                                 .on_conflict_do_nothing(index_elements=["key"]))
            tables = set(sa.inspect(self.engine).get_table_names())
            found = None
            if {"sightings", "meta"} <= tables:
                with self.engine.connect() as conn:
                    found = conn.execute(sa.select(self.meta.c.value).where(self.meta.c.key == "schema")).scalar()
        except sa.exc.OperationalError as exc:
            raise DatabaseUnavailableError(f"cannot use the database {self.display}: {_first_line(exc)}; start it or "
                                      "fix --db") from exc
        except sa.exc.DatabaseError as exc:
            if self.dialect == "sqlite" and "not a database" in str(exc):
                raise SightingsError(f"{self.display} is not a SQLite database; give the sightings file with "
                                     "--db") from exc
            raise SightingsError(f"cannot use {self.display} as the sightings database: {_first_line(exc)}; give "
                                 "the sightings database with --db") from exc
        if found is None:
            raise SightingsError(f"{self.display} has no sightings tables; start `python -m device sightings run` "
                                 "with this --db first")
        if found != SCHEMA:
            raise SightingsError(f"{self.display} holds sightings schema {found!r}, this faceberry reads {SCHEMA!r}; "
                                 "use a faceberry of the same version")

    def _open_engine(self, sa: Any, db: str, create: bool) -> None:
        """self.engine and self.dialect for self.url; SightingsError naming the fix when it cannot be opened."""
        if self.url.startswith("sqlite:///"):
            path = Path(self.url[len("sqlite:///"):])
            if not create and not path.is_file():
                raise SightingsError(f"no sightings database at {path}; start `python -m device sightings run` "
                                     "first, or give its file with --db")
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.dialect = sa.engine.make_url(self.url).get_backend_name()
            if self.dialect not in ("sqlite", "postgresql"):
                raise SightingsError(f"--db {self.display}: {self.dialect} is not supported; use a SQLite file or "
                                     "postgresql://user@host/dbname")
            self.engine = sa.create_engine(self.url, pool_pre_ping=True)
        except ModuleNotFoundError as exc:  # the URL's driver (psycopg) is not installed
            raise SightingsError(f"--db {self.display}: the Python module {exc.name!r} is not installed; "
                                 f"{INSTALL_HINT}") from exc
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise SightingsError(f"--db {db!r} is neither a file name nor a database URL SQLAlchemy knows "
                                 f"({_first_line(exc)}); use a path or postgresql://user@host/dbname") from exc
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    @property
    def display(self) -> str:
        """The database's URL without its password, for logs and errors."""
        try:
            return _sa().engine.make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", self.url)

    def add(self, row: dict[str, Any]) -> bool:
        """Insert an event; False when its event_id is already there (a redelivery). Raises on a DB failure."""
        stmt = self._insert(self.sightings).values(**row).on_conflict_do_nothing(index_elements=["event_id"])
        with self.engine.begin() as conn:
            # psycopg reports no rowcount here (-1): RETURNING says whether the row went in (SQLite has it
            # from 3.35; before that its rowcount is right).
            if self.engine.dialect.insert_returning:
                return conn.execute(stmt.returning(self.sightings.c.event_id)).first() is not None
            return conn.execute(stmt).rowcount == 1

    def reject(self, topic: str, payload: bytes, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.rejected.insert().values(received_at=datetime.now(timezone.utc), topic=topic,
                                                       reason=reason, payload=bytes(payload)))

    def probe(self) -> None:
        """A write that commits (SQLite's write lock, PostgreSQL accepting writes): raises while it cannot."""
        sa = _sa()
        with self.engine.begin() as conn:
            conn.execute(sa.update(self.meta).where(self.meta.c.key == "schema").values(value=SCHEMA))

    def count(self) -> int:
        sa = _sa()
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.sightings)).scalar() or 0)

    def rejected_rows(self) -> list[tuple[str, str, bytes]]:
        with self.engine.connect() as conn:
            rows = conn.execute(self.rejected.select().order_by(self.rejected.c.id)).all()
        return [(r.topic, r.reason, bytes(r.payload)) for r in rows]

    def rows(self, start: datetime | None = None, end: datetime | None = None) -> Iterator[Sighting]:
        """Sightings with start <= seen_at < end (UTC), oldest first."""
        sa = _sa()
        t = self.sightings
        query = sa.select(*[t.c[f] for f in Sighting.__dataclass_fields__]).order_by(t.c.seen_at, t.c.event_id)
        if start is not None:
            query = query.where(t.c.seen_at >= start.astimezone(timezone.utc))
        if end is not None:
            query = query.where(t.c.seen_at < end.astimezone(timezone.utc))
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                values = row._asdict()
                values["seen_at"] = _utc(values["seen_at"])
                values["received_at"] = _utc(values["received_at"])
                yield Sighting(**values)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: `summary` and `export` read while `run` writes. synchronous FULL: a committed row survives a
    # power cut, which matters because the commit is what lets the broker forget the message.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return " ".join(text.split("\n")[0].split()) or type(exc).__name__


# --- the summary and the CSV -----------------------------------------------------------------------------

def local_zone() -> tzinfo:
    """The machine's time zone by name (days follow its DST changes), else its current UTC offset."""
    from zoneinfo import ZoneInfo

    candidates = [os.environ.get("TZ", "").lstrip(":")]
    link = os.path.realpath("/etc/localtime")
    if "zoneinfo/" in link:
        candidates.append(link.split("zoneinfo/", 1)[1])
    for name in candidates:
        if name:
            try:
                return ZoneInfo(name)
            except (KeyError, ValueError, OSError):
                continue
    return datetime.now().astimezone().tzinfo or timezone.utc


def zone_named(name: str | None) -> tzinfo:
    if not name:
        return local_zone()
    from zoneinfo import ZoneInfo

    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError):
        raise SightingsError(f"--tz {name!r} is not a time zone name; use an IANA name such as Europe/Paris "
                             "or UTC") from None


def _day(text: str, flag: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise SightingsError(f"{flag} {text!r} is not a date; use YYYY-MM-DD, e.g. 2026-01-31") from None


def day_bounds(first: date, last: date, zone: tzinfo) -> tuple[datetime, datetime]:
    """UTC [start, end) of the local days first..last (a 23- or 25-hour day at a DST change stays whole)."""
    start = datetime.combine(first, datetime.min.time(), tzinfo=zone)
    end = datetime.combine(last + timedelta(days=1), datetime.min.time(), tzinfo=zone)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


def _where(s: Sighting) -> str:
    return f"{s.device_id}/{s.camera}" if s.camera else s.device_id


def summarize(sightings: Iterable[Sighting], zone: tzinfo, by: str = "person",
              unknown: bool = True) -> list[dict[str, Any]]:
    """Per local day and person (`by="person"`) or per day, person and camera (`by="camera"`): first and last
    sighting, how many, and where. An `unknown` face with a stranger id is its own row, by that id."""
    if by not in ("person", "camera"):
        raise SightingsError(f"--by {by!r}: use person or camera")
    groups: dict[tuple, dict[str, Any]] = {}
    for s in sightings:
        if not unknown and s.label == UNKNOWN:
            continue
        local = s.seen_at.astimezone(zone)
        key: tuple = (local.date(), s.label, s.stranger_id or "")
        if by == "camera":
            key += (s.device_id, s.camera)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"day": local.date().isoformat(), "person": s.label,
                                   "stranger_id": s.stranger_id or "", "first": local, "first_where": _where(s),
                                   "last": local, "last_where": _where(s), "count": 0, "where": Counter()}
            if by == "camera":
                group.update(device_id=s.device_id, camera=s.camera)
        if local < group["first"]:
            group["first"], group["first_where"] = local, _where(s)
        if local >= group["last"]:
            group["last"], group["last_where"] = local, _where(s)
        group["count"] += 1
        group["where"][_where(s)] += 1
    out = []
    for group in sorted(groups.values(), key=lambda g: (g["day"], g["first"], g["person"], g["stranger_id"])):
        row = {"day": group["day"], "person": group["person"], "stranger_id": group["stranger_id"]}
        if by == "camera":
            row.update(device_id=group["device_id"], camera=group["camera"])
        row.update(first_seen=group["first"].isoformat(timespec="seconds"),
                   last_seen=group["last"].isoformat(timespec="seconds"), count=group["count"])
        if by == "person":
            row.update(first_where=group["first_where"], last_where=group["last_where"],
                       cameras=" ".join(f"{w}:{n}" for w, n in sorted(group["where"].items())))
        out.append(row)
    return out


EXPORT_COLUMNS = ["event_id", "timestamp", "local_time", "day", "device_id", "camera", "label", "stranger_id",
                  "score", "track_id", "frames", "model", "previous", "source", "received_at"]


def export_rows(sightings: Iterable[Sighting], zone: tzinfo) -> Iterator[dict[str, Any]]:
    from faceberry.device.outputs.events import iso_utc

    for s in sightings:
        local = s.seen_at.astimezone(zone)
        yield {"event_id": s.event_id, "timestamp": iso_utc(s.seen_at.timestamp()),
               "local_time": local.isoformat(timespec="milliseconds"), "day": local.date().isoformat(),
               "device_id": s.device_id, "camera": s.camera, "label": s.label, "stranger_id": s.stranger_id or "",
               "score": "" if s.score is None else s.score, "track_id": "" if s.track_id is None else s.track_id,
               "frames": "" if s.frames is None else s.frames, "model": s.model or "",
               "previous": s.previous or "", "source": s.source or "",
               "received_at": iso_utc(s.received_at.timestamp())}


def _cell(value: Any) -> Any:
    # A name typed into Home Assistant ends up here: a spreadsheet would run "=…" as a formula (OWASP's
    # CSV injection advice: make such a text cell start with a quote).
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_csv(rows: Iterable[dict[str, Any]], columns: list[str], out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
        n += 1
    return n


def write_table(rows: list[dict[str, Any]], out: IO[str]) -> None:
    if not rows:
        out.write("no sightings\n")
        return
    shown = []
    for row in rows:
        person = row["person"] + (f" ({row['stranger_id']})" if row["stranger_id"] else "")
        first, last = row["first_seen"][11:19], row["last_seen"][11:19]
        if "camera" in row:
            shown.append([row["day"], person, f"{row['device_id']}/{row['camera']}", first, last, str(row["count"])])
        else:
            shown.append([row["day"], person, first, last, str(row["count"]), row["cameras"]])
    header = (["day", "person", "where", "first", "last", "count"] if "camera" in rows[0]
              else ["day", "person", "first", "last", "count", "where"])
    widths = [max(len(r[i]) for r in [header, *shown]) for i in range(len(header))]
    for line in [header, *shown]:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


# --- the subscriber --------------------------------------------------------------------------------------

def default_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-") or "host"
    return f"faceberry-sightings-{host}"[:64]


class SightingsLogger:
    """A persistent-session QoS 1 subscriber that commits each event before acknowledging it."""

    def __init__(self, store: SightingsStore, *, host: str, port: int, topics: list[str], client_id: str,
                 username: str | None = None, password: str | None = None, tls: bool = False,
                 cafile: str | None = None, keepalive: int = 30) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.store = store
        self.host, self.port, self.topics, self.keepalive = host, port, topics, keepalive
        self.client_id = client_id
        # clean_session false + a stable client id: the broker queues what arrives while we are away.
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                                  protocol=paho.MQTTv311)
        # PUBACK only after the commit: paho's automatic ack would confirm a message the database refused.
        self.client.manual_ack_set(True)
        self.client.reconnect_delay_set(1, 30)
        if username:
            self.client.username_pw_set(username, password)
        if tls or cafile:
            self.client.tls_set(ca_certs=cafile or None)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.db_down = threading.Event()
        self.connected = False
        self.connects = 0
        self.received = self.stored = self.duplicates = self.rejected = 0
        self._db_error: str | None = None
        self._said: dict[str, float] = {}
        self._stopping = False
        self.failed = False

    # Each distinct problem once a minute, not once per retry.
    def _say(self, level: int, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._said.get(key, -1e9) >= 60:
            self._said[key] = now
            log.log(level, "%s", message)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            fix = ("give --username and --password-file" if "authori" in str(reason).lower() or
                   "password" in str(reason).lower() else "check --client-id and the broker's log")
            self._say(logging.ERROR, f"refused {reason}", f"the broker {self.host}:{self.port} refused the "
                      f"connection ({reason}); {fix}")
            return
        self.connected = True
        self.connects += 1
        if not flags.session_present and self.connects > 1:
            log.warning("the broker %s:%s did not keep this logger's session (client id %s): events published while "
                        "it was away were not queued for it; give the broker persistence (mosquitto: "
                        "`persistence true`) and do not let sessions expire", self.host, self.port, self.client_id)
        log.info("connected to %s:%s as %s (%s session)", self.host, self.port, self.client_id,
                 "resumed" if flags.session_present else "new")
        # Subscribing again on a resumed session is harmless and covers a broker that lost it.
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._say(logging.WARNING, "unreachable", f"cannot reach the broker {self.host}:{self.port}; retrying "
                  "(is it running? --host, --port)")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # Our own disconnects (a refused write, the stop) are logged where they are decided.
        if self.connected and not self.db_down.is_set() and not self._stopping:
            log.warning("lost the broker %s:%s (%s); reconnecting", self.host, self.port, reason)
        self.connected = False

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        refused = [t for t, r in zip(self.topics, reasons, strict=False) if r.is_failure]
        if refused:
            self._say(logging.ERROR, "subscribe", f"the broker refused the subscription to {', '.join(refused)}; "
                      "let this user read them in the broker's ACL")
            return
        log.info("subscribed to %s at QoS 1", ", ".join(self.topics))
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self.db_down.is_set():
            return  # not acknowledged: the broker sends it again once we reconnect
        sa = _sa()
        try:
            try:
                row = parse_event(msg.topic, bytes(msg.payload))
            except BadEventError as exc:
                self.store.reject(msg.topic, bytes(msg.payload), str(exc))
                self.rejected += 1
                log.warning("kept a message on %s that is not a faceberry event in the rejected table: %s",
                            msg.topic, exc)
            else:
                if self.store.add(row):
                    self.stored += 1
                    log.debug("stored %s: %s at %s/%s", row["event_id"], row["label"], row["device_id"],
                              row["camera"])
                else:
                    self.duplicates += 1
                    log.debug("already stored: %s (a redelivery)", row["event_id"])
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            self._db_error = _first_line(exc)
            log.error("the database %s refused a write (%s): acknowledging nothing more and disconnecting, so "
                      "the broker keeps the events; retrying until it takes writes again", self.store.display,
                      self._db_error)
            self.db_down.set()
            client.disconnect()
            return
        except Exception:
            # A bug, not the database: stop (not acknowledged, so the broker keeps the message) rather
            # than leave paho's thread dead and the process looking alive.
            log.exception("cannot log the message on %s; stopping", msg.topic)
            self.failed = True
            self.db_down.set()
            client.disconnect()
            return
        self.received += 1
        if msg.qos:
            client.ack(msg.mid, msg.qos)

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, self.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for_database(self, stop: threading.Event) -> bool:
        """After a refused write: probe with backoff until the database takes writes, then reconnect."""
        sa = _sa()
        self.client.loop_stop()
        delay = 1.0
        started = time.monotonic()
        while not stop.wait(delay):
            try:
                self.store.probe()
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                self._say(logging.WARNING, "db-wait", f"the database {self.store.display} still refuses writes "
                          f"({_first_line(exc)}); retrying")
                delay = min(delay * 2, 30.0)
                continue
            log.info("the database takes writes again after %.0f s; reconnecting to the broker",
                     time.monotonic() - started)
            self.db_down.clear()
            self.start()
            return True
        return False

    def stats(self) -> str:
        return (f"sightings: {'connected' if self.connected else 'disconnected'}, received {self.received}, "
                f"stored {self.stored}, duplicates {self.duplicates}, rejected {self.rejected}")


# --- the command -----------------------------------------------------------------------------------------

def _db_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, metavar="PATH|URL",
                        help=f"a SQLite file, or postgresql://user@host/dbname (password: ~/.pgpass or PGPASSWORD) "
                             f"(default: $FACEBERRY_SIGHTINGS_DB or {default_db()})")


def _days_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--day", metavar="YYYY-MM-DD", help="one local day")
    parser.add_argument("--from", dest="first", metavar="YYYY-MM-DD", help="the first local day of a range")
    parser.add_argument("--to", dest="last", metavar="YYYY-MM-DD", help="the last local day of a range (included)")
    parser.add_argument("--tz", metavar="ZONE",
                        help="the time zone days begin in, e.g. Europe/Paris (default: this machine's)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sightings_command", metavar="ACTION", required=True,
                                help="run (subscribe and log), summary (per day and person) or export (CSV)")
    run_p = sub.add_parser("run", help="subscribe to the events and write every one into the database",
                           description="Subscribe to faceberry events (persistent session, QoS 1) and write each "
                                       "one into the database, once per event_id, before acknowledging it.")
    _db_flag(run_p)
    run_p.add_argument("--host", default="localhost", help="the MQTT broker (default: localhost)")
    run_p.add_argument("--port", type=int, default=None, help="its port (default: 1883, 8883 with TLS)")
    run_p.add_argument("--topic", action="append", default=None,
                       help=f"a topic filter to log, repeatable (default: {DEFAULT_TOPIC})")
    run_p.add_argument("--client-id", default=None,
                       help="the MQTT client id; the broker keeps this logger's queue under it, so keep it the same "
                            "from one start to the next and give every logger its own "
                            f"(default: {default_client_id()})")
    run_p.add_argument("--username", default=None, help="the broker user, if it asks for one")
    run_p.add_argument("--password-file", default=None, help="a file holding that user's password")
    run_p.add_argument("--tls", action="store_true", help="connect with TLS (the system's CAs unless --cafile)")
    run_p.add_argument("--cafile", default=None, help="the CA certificate of the broker (implies --tls)")
    run_p.add_argument("--stats-interval", type=float, default=300.0,
                       help="seconds between two stats lines in the log (default: 300)")

    summary_p = sub.add_parser("summary", help="first and last sighting and count per day and person",
                               description="Per local day and person: first and last sighting, how many events, "
                                           "and where (device/camera).")
    _db_flag(summary_p)
    _days_flags(summary_p)
    summary_p.add_argument("--by", choices=("person", "camera"), default="person",
                           help="one row per person and day (default), or per person, camera and day")
    summary_p.add_argument("--no-unknown", action="store_true", help="leave out faces nobody is named for")
    summary_p.add_argument("--csv", action="store_true", help="write CSV instead of a table")
    summary_p.add_argument("--out", default="-", help="a file to write to (default: standard output)")

    export_p = sub.add_parser("export", help="every event as CSV, one row per event_id",
                              description="Every logged event as CSV (one row per event_id), oldest first; all of "
                                          "them unless days are given.")
    _db_flag(export_p)
    _days_flags(export_p)
    export_p.add_argument("--out", default="-", help="a file to write to (default: standard output)")


def _chosen_days(args: argparse.Namespace, zone: tzinfo, default_today: bool) -> tuple[date, date] | None:
    if args.day and (args.first or args.last):
        raise SightingsError("--day and --from/--to together: give one day or a range")
    if args.day:
        one = _day(args.day, "--day")
        return one, one
    if args.first or args.last:
        today = datetime.now(zone).date()
        first = _day(args.first, "--from") if args.first else date(1970, 1, 1)
        last = _day(args.last, "--to") if args.last else today
        if last < first:
            raise SightingsError(f"--to {last} is before --from {first}")
        return first, last
    if default_today:
        today = datetime.now(zone).date()
        return today, today
    return None


class _Output:
    """Standard output, or a file written whole and renamed into place (no half CSV on an error)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.tmp: Path | None = None

    def __enter__(self) -> IO[str]:
        if self.target == "-":
            return sys.stdout
        path = Path(self.target)
        if not path.parent.is_dir():
            raise SightingsError(f"--out {path}: the folder {path.parent} does not exist")
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.fh = open(self.tmp, "w", encoding="utf-8", newline="")
        return self.fh

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if self.tmp is None:
            sys.stdout.flush()
            return
        self.fh.close()
        if kind is None:
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)


def _db_arg(args: argparse.Namespace) -> str:
    return args.db or os.environ.get("FACEBERRY_SIGHTINGS_DB") or default_db()


def _read_password(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise SightingsError(f"--password-file {path}: cannot read it ({exc.strerror or exc})") from None


def serve(args: argparse.Namespace) -> int:
    store = SightingsStore(_db_arg(args))
    logger = SightingsLogger(
        store, host=args.host, port=args.port or (8883 if (args.tls or args.cafile) else 1883),
        topics=args.topic or [DEFAULT_TOPIC], client_id=args.client_id or default_client_id(),
        username=args.username, password=_read_password(args.password_file), tls=args.tls, cafile=args.cafile)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("logging %s into %s (%d events there)", ", ".join(logger.topics), store.display, store.count())
    logger.start()
    next_stats = time.monotonic() + args.stats_interval
    try:
        while not stop.wait(0.2):
            if logger.failed:
                return 1
            if logger.db_down.is_set():
                logger.wait_for_database(stop)
            if time.monotonic() >= next_stats:
                log.info("%s", logger.stats())
                next_stats = time.monotonic() + args.stats_interval
    finally:
        logger.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped; %s; %d events in %s", logger.stats(), store.count(), store.display)
        store.close()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.sightings_command == "run":
        return serve(args)
    zone = zone_named(args.tz)
    store = SightingsStore(_db_arg(args), create=False)
    try:
        days = _chosen_days(args, zone, default_today=args.sightings_command == "summary")
        bounds = day_bounds(*days, zone) if days else (None, None)
        rows = store.rows(*bounds)
        with _Output(args.out) as out:
            if args.sightings_command == "export":
                written = write_csv(export_rows(rows, zone), EXPORT_COLUMNS, out)
                log.info("exported %d events", written)
                return 0
            summary = summarize(rows, zone, by=args.by, unknown=not args.no_unknown)
            if args.csv:
                columns = list(summary[0]) if summary else (
                    ["day", "person", "stranger_id", "device_id", "camera", "first_seen", "last_seen", "count"]
                    if args.by == "camera" else ["day", "person", "stranger_id", "first_seen", "last_seen", "count",
                                                 "first_where", "last_where", "cameras"])
                write_csv(summary, columns, out)
            else:
                write_table(summary, out)
        return 0
    finally:
        store.close()
