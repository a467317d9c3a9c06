"""The durable outbox: every MQTT message is written to disk before the broker is asked to take it.

A SQLite database (stdlib `sqlite3`, WAL mode) in the daemon's state directory holds one row per message
not yet acknowledged by the broker. The MQTT layer (`device.mqtt`) appends a row, hands it to paho once it
is connected, and deletes the row only when the broker's PUBACK arrives. Whatever is still in the file
when the process dies (SIGKILL, a crash, a power cut within the sync policy) is handed to the broker again,
in order, by the next start: delivery is at least once, and subscribers de-duplicate by `event_id`.

Why SQLite: one file, atomic appends and deletes, crash-safe without our own journal format, in the
standard library, and readable with the `sqlite3` shell when someone wants to look inside.

Retained messages (person state, discovery) are coalesced: only the latest per topic is worth keeping, so
a new retained message replaces an older one for the same topic that is still waiting.

Bounded by a count and a byte total; beyond either the OLDEST rows are dropped (a stale event is worth
less than a fresh one) and counted in `dropped`. The caller logs a summary; this module never logs per
message.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from device.errors import FaceberryError

log = logging.getLogger(__name__)

SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}


class OutboxError(FaceberryError):
    """The outbox file cannot be used (not writable, corrupt, locked by another daemon)."""


@dataclass(frozen=True)
class Message:
    id: int  # increasing: the order messages were accepted in
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float  # Unix time it was accepted


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_retained ON outbox (topic) WHERE retain = 1;
"""


class Outbox:
    """A bounded, ordered, on-disk FIFO of MQTT messages; safe to use from several threads.

    `path` is the database file; a `<path>.lock` beside it is held (flock) for the life of the object so
    two daemons can never share one outbox (each would deliver and delete the other's messages).
    """

    def __init__(self, path: str | Path, max_messages: int = 10_000, max_bytes: int = 50_000_000,
                 sync: str = "normal") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"outbox sync must be one of {sorted(SYNC_MODES)}, got {sync!r}")
        self.path = Path(path)
        self.max_messages = max(1, int(max_messages))
        self.max_bytes = max(1, int(max_bytes))
        self.sync = sync
        self.dropped = 0  # rows removed by the bounds, never delivered
        self.dropped_bytes = 0
        self.coalesced = 0  # retained rows replaced by a newer one for the same topic
        self.accepted = 0  # rows appended by this process
        self.acked = 0  # rows deleted after the broker acknowledged them
        self._lock = threading.Lock()
        self._lockfile: IO[str] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lockfile = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise OutboxError(f"cannot create the outbox {self.path}: {exc}; make state_dir writable by the "
                              "service user (the systemd unit's StateDirectory= does it)") from exc
        try:
            fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            self._lockfile = None
            raise OutboxError(f"the outbox {self.path} is in use by another faceberry daemon; give each daemon "
                              "its own state_dir or device_id") from exc
        try:
            # The MQTT network thread deletes acknowledged rows while the frame loop appends: one
            # connection shared under our own lock (sqlite3 objects are not safe to use concurrently).
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit is in the WAL file (the OS page cache) when it returns, so it
            # survives the process dying; only a power cut can lose commits since the last checkpoint.
            # FULL fsyncs the WAL on every commit. The cost is measured in docs/MQTT.md.
            self._db.execute(f"PRAGMA synchronous={SYNC_MODES[sync]}")
            self._db.executescript(_SCHEMA)
            self.count, self.bytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}; if the file is corrupt, stop the "
                              "daemon and move it away (its undelivered messages are lost)") from exc
        self.recovered = int(self.count)  # left by an earlier run: replayed first

    def put(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int:
        """Append a message (durably, per the sync policy); returns its id. May drop the oldest rows."""
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if retain:
                    replaced = cur.execute(
                        "DELETE FROM outbox WHERE retain = 1 AND topic = ? RETURNING LENGTH(payload)",
                        (topic,)).fetchall()
                    self.coalesced += len(replaced)
                    self.count -= len(replaced)
                    self.bytes -= sum(r[0] for r in replaced)
                cur.execute("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?)",
                            (topic, data, int(qos), int(bool(retain)), time.time()))
                row_id = int(cur.lastrowid or 0)
                self.count += 1
                self.bytes += len(data)
                if self.count > self.max_messages or self.bytes > self.max_bytes:
                    self._enforce_bounds(cur, keep=row_id)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                # The counters may have moved inside the failed transaction: read them back.
                self.count, self.bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
                raise
            self.accepted += 1
            return row_id

    def _enforce_bounds(self, cur: sqlite3.Cursor, keep: int) -> None:
        # Oldest first, in one statement per batch; the message just added is never its own victim
        # (one message bigger than max_bytes is kept alone rather than refused).
        while self.count > self.max_messages or self.bytes > self.max_bytes:
            excess = max(self.count - self.max_messages, 1)
            rows = cur.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE id != ? ORDER BY id "
                               "LIMIT ?) RETURNING LENGTH(payload)", (keep, excess)).fetchall()
            if not rows:
                break
            freed = sum(r[0] for r in rows)
            self.count -= len(rows)
            self.bytes -= freed
            self.dropped += len(rows)
            self.dropped_bytes += freed

    def after(self, last_id: int, limit: int) -> list[Message]:
        """Up to `limit` messages with an id above `last_id`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, created FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (int(last_id), int(limit))).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), int(r[3]), bool(r[4]), float(r[5])) for r in rows]

    def ack(self, ids: list[int]) -> int:
        """Delete delivered messages (ids already gone, e.g. coalesced or dropped, are ignored)."""
        if not ids:
            return 0
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                deleted = 0
                for row_id in ids:
                    row = cur.execute("DELETE FROM outbox WHERE id = ? RETURNING LENGTH(payload)",
                                      (int(row_id),)).fetchone()
                    if row is not None:
                        deleted += 1
                        self.count -= 1
                        self.bytes -= row[0]
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self.acked += deleted
            return deleted

    def __len__(self) -> int:
        return int(self.count)

    def stats(self) -> dict[str, int]:
        return {"outbox": int(self.count), "outbox_bytes": int(self.bytes), "outbox_dropped": self.dropped,
                "outbox_coalesced": self.coalesced, "outbox_recovered": self.recovered}

    def close(self) -> None:
        with self._lock:
            db = getattr(self, "_db", None)
            if db is not None:
                try:
                    # Folds the WAL back into the main file, so a stopped daemon leaves one tidy file.
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.debug("outbox checkpoint failed: %s", exc)
                db.close()
                self._db = None  # type: ignore[assignment]
            if self._lockfile is not None:
                self._lockfile.close()  # releases the flock
                self._lockfile = None


def default_state_dir() -> Path:
    """Where a daemon not started by systemd keeps its state when the configured directory is unusable."""
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "faceberry"
