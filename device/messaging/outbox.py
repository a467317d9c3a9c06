"""The durable outbox: every MQTT message is written to disk before the broker is asked to take it.

A SQLite database (stdlib `sqlite3`, WAL mode) in the daemon's state directory holds one row per message
not yet acknowledged by the broker. The MQTT layer (`faceberry.device.messaging.mqtt`) appends a row, hands it to paho
once it
is connected, and deletes the row only when the broker's PUBACK arrives. Whatever is still in the file
when the process dies (SIGKILL, a crash, a power cut within the sync policy) is handed to the broker again,
in order, by the next start: delivery is at least once, and subscribers de-duplicate by `event_id`.

Why SQLite: one file, atomic appends and deletes, crash-safe without our own journal format, in the
standard library, and readable with the `sqlite3` shell when someone wants to look inside.

Retained messages (person state, discovery) are coalesced: only the latest per topic is worth keeping, so
a new retained message replaces an older one for the same topic that is still waiting.

Bounded by a count and a byte total; beyond either the OLDEST rows are dropped (a stale event is worth
less than a fresh one) and counted in `dropped`.

A full or failing disk never makes it lie or die: a write that fails is rolled back, counted in `lost`
and raised as `OutboxWriteError`; `count`/`bytes` are read back from the file after any failure, so they
are what a restart would find; a delete (an acknowledgement) that fails is kept in memory and retried, and
never raises. Each kind of failure is logged once, then at most every `statefile.REPEAT_S`.

A damaged file (a power cut on an SD card: the header, a page in the middle, a truncated file, another
program's database) is found at open (`PRAGMA quick_check`, and the schema), its readable rows are copied
into a fresh outbox, and the damaged file is moved aside (`<name>.corrupt-<time>`) with one line saying
how many messages were kept and how many could not be read. The cost of the check is in docs/MQTT.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from faceberry.errors import EXIT_USAGE, FaceberryError
from faceberry.statefile import RateLimitedLog, move_aside, report_aside

log = logging.getLogger(__name__)

SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}
COLUMNS = ("id", "topic", "payload", "qos", "retain", "created")
# Salvage probes the ids of a damaged file one by one; beyond this many (never met: ids of waiting rows
# span about max_messages) only the newest are tried.
SALVAGE_MAX_IDS = 1_000_000
# While deletes fail (a full disk), they are retried at most this often.
RETRY_DELETE_S = 5.0
# Pages the write-ahead log grows to before it is checkpointed (and the size its file is cut back to).
WAL_PAGES = 256
# After a failed write the counters are read back from the file at most this often (a table scan).
RECOUNT_S = 1.0


class OutboxError(FaceberryError):
    """The outbox file cannot be used (not writable, corrupt, locked by another daemon)."""


class StateDirError(OutboxError):
    """The configured state_dir cannot be written: a setup error that a restart does not mend, so the unit
    must not restart the daemon every few seconds for it (RestartPreventExitStatus=2)."""

    exit_code = EXIT_USAGE


class OutboxWriteError(OutboxError):
    """A message could not be written (a full or failing disk): it is lost, and counted in `Outbox.lost`."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class _DamagedError(Exception):
    """The file is not a usable outbox: its content, not the disk or a lock, is the problem."""


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


def is_damage(exc: BaseException) -> bool:
    """Whether an sqlite3 error says the file's content is broken (not the disk, a lock or the rights)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc).lower()
    return (name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB" or "malformed" in text
            or "not a database" in text)


def failure_kind(exc: BaseException) -> tuple[str, str]:
    """(kind, what to do) for a failed read or write of the outbox."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name.startswith("SQLITE_FULL") or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return "full", "state_dir's file system is full: free space there"
    if name.startswith("SQLITE_READONLY") or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        return "read-only", ("the outbox became read-only (an SD card that fails is remounted read-only): check "
                             "the card and the rights on state_dir")
    if is_damage(exc):
        return "damaged", ("the outbox file is damaged: restart the daemon, which sets it aside and keeps what "
                           "is readable")
    if name.startswith("SQLITE_IOERR") or isinstance(exc, OSError):
        return "io", "the disk under state_dir fails (I/O error): check the SD card and the kernel log"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "busy", "another program holds the outbox locked (a sqlite3 shell?): close it"
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return "access", "make state_dir and the files in it writable by the service user"
    return "other", "see the error"


class Outbox:
    """A bounded, ordered, on-disk FIFO of MQTT messages; safe to use from several threads.

    `path` is the database file; a `<path>.lock` beside it is held (flock) for the life of the object so
    two daemons can never share one outbox (each would deliver and delete the other's messages).
    """

    def __init__(self, path: str | Path, max_messages: int = 10_000, max_bytes: int = 50_000_000,
                 sync: str = "normal", check: bool = True) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"outbox sync must be one of {sorted(SYNC_MODES)}, got {sync!r}")
        self.path = Path(path)
        self.max_messages = max(1, int(max_messages))
        self.max_bytes = max(1, int(max_bytes))
        self.sync = sync
        self.check = bool(check)
        self.count = 0
        self.bytes = 0
        self.dropped = 0  # rows removed by the bounds, never delivered
        self.dropped_bytes = 0
        self.coalesced = 0  # retained rows replaced by a newer one for the same topic
        self.accepted = 0  # rows appended by this process
        self.acked = 0  # rows deleted after the broker acknowledged them
        self.lost = 0  # messages that could not be written (a full or failing disk): never stored
        self.lost_bytes = 0
        self.salvaged = 0  # rows copied out of a damaged file at open
        self.unreadable = 0  # rows of a damaged file that could not be read (lost)
        self.set_aside: Path | None = None  # where a damaged file went
        self.failures = RateLimitedLog(log)
        self._undeleted: set[int] = set()  # acknowledged, but the DELETE failed: never sent again, retried
        self._retry_at = 0.0
        self._relieve_at = 0.0
        self._recount_at = 0.0
        self._stale = False  # a failure's read-back was skipped (rate limit): refresh() does it
        self._top_id = 0  # the highest id this process has handed out or read
        self._live_recovery_at = 0.0
        self._unreadable_ids: set[int] = set()  # rows that failed to read while the daemon ran
        self._failing: dict[str, str] = {}  # operation -> the kind of failure last logged for it
        self._lock = threading.Lock()
        self._lockfile: IO[str] | None = None
        self._db: sqlite3.Connection | None = None
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
            try:
                self._db = self._open()
            except _DamagedError as damage:
                self._replace_damaged(str(damage))
        except (sqlite3.Error, OSError, _DamagedError) as exc:
            self.close()
            hint = failure_kind(exc)[1]
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}; {hint}") from exc
        except BaseException:
            self.close()
            raise
        self.recovered = int(self.count)  # left by an earlier run (or salvaged): replayed first

    # --- open, check, salvage -----------------------------------------------------------------------------

    def _connect(self, path: Path) -> sqlite3.Connection:
        # The MQTT network thread deletes acknowledged rows while the frame loop appends: one
        # connection shared under our own lock (sqlite3 objects are not safe to use concurrently).
        return sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)

    def _open(self) -> sqlite3.Connection:
        """A connection to a checked outbox at self.path (created if absent); _DamagedError if its content is bad."""
        db = self._connect(self.path)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit is in the WAL file (the OS page cache) when it returns, so it
            # survives the process dying; only a power cut can lose commits since the last checkpoint.
            # FULL fsyncs the WAL on every commit. The cost is measured in docs/MQTT.md.
            db.execute(f"PRAGMA synchronous={SYNC_MODES[self.sync]}")
            # The WAL is folded back every WAL_PAGES pages and its file cut back to that size after: SQLite's
            # default (1,000 pages, a 4 MB file that never shrinks) is space a nearly full card needs.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            if self.check:
                # Reads every page once (cost in docs/MQTT.md): damage found now is salvaged now, not
                # met by the sender thread halfway through a replay.
                rows = [str(r[0]) for r in db.execute("PRAGMA quick_check(20)").fetchall()]
                if rows != ["ok"]:
                    problems = [line.strip() for line in "\n".join(rows).splitlines()
                                if line.strip() and "*** in database" not in line]
                    more = f" and {len(problems) - 1} more problems" if len(problems) > 1 else ""
                    raise _DamagedError(f"quick_check: {problems[0] if problems else 'failed'}{more}")
            try:
                db.executescript(_SCHEMA)
                columns = tuple(r[1] for r in db.execute("PRAGMA table_info(outbox)").fetchall())
            except sqlite3.OperationalError as exc:
                if (getattr(exc, "sqlite_errorname", "") or "") != "SQLITE_ERROR":
                    raise  # locked, read-only, a full disk: the disk's problem, not the file's
                raise _DamagedError(f"not a faceberry outbox: {exc}") from exc
            if columns != COLUMNS:
                raise _DamagedError(f"not a faceberry outbox: its table has the columns {', '.join(columns)}")
            self.count, self.bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        except _DamagedError:
            db.close()
            raise
        except sqlite3.Error as exc:
            db.close()
            if is_damage(exc):
                raise _DamagedError(str(exc)) from exc
            raise
        return db

    def _replace_damaged(self, reason: str) -> None:
        """Move the damaged file aside, copy its readable rows into a fresh outbox, say so in one line.

        Rows keep their ids and the fresh file's ids go on above the highest this process has seen, so
        the MQTT layer's place in the queue and its messages in flight stay right when this happens while
        the daemon runs (`_recover_live`).
        """
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        for companion in ("-shm", "-journal"):  # rebuilt by SQLite; a stale one must not meet the fresh file
            self.path.with_name(self.path.name + companion).unlink(missing_ok=True)
        try:
            aside = move_aside(self.path, companions=("-wal", "-shm"))
        except OSError as exc:
            report_aside(self.path, None, reason, "its undelivered messages cannot be sent", exc)
            raise OutboxError(f"the outbox {self.path} is damaged ({reason}) and cannot be moved aside: "
                              f"{exc}; stop the daemon and move the file away") from exc
        self.set_aside = aside
        rows, unreadable = salvage(aside)
        Path(f"{aside}-shm").unlink(missing_ok=True)  # left by the salvage's read-only connection
        rows = [r for r in rows if r[0] not in self._undeleted]  # delivered already
        self._undeleted.clear()
        self._unreadable_ids.clear()
        self.count = self.bytes = 0
        self._db = self._open()
        kept = 0
        if rows or self._top_id:
            try:
                kept = self._insert_salvaged(rows)
            except sqlite3.Error as exc:
                self._recount()
                log.error("cannot copy the %d readable messages of %s into the fresh outbox: %s; %s; they stay "
                          "in %s", len(rows), aside.name, exc, failure_kind(exc)[1], aside)
        self.salvaged = kept
        self.unreadable = max(unreadable, 0) + (len(rows) - kept)
        if reason.startswith("not a faceberry outbox") and not rows:
            lost = "it held no faceberry message"
        elif unreadable < 0 and not rows:
            lost = "none of its messages could be read: they are lost"
        elif not rows and not unreadable:
            lost = "it held no message"
        else:
            lost = f"{kept} messages were readable and are sent first"
            if self.unreadable:
                lost += f", {self.unreadable} could not be read and are lost"
            elif unreadable < 0:
                lost += ", an unknown number could not be read"
        report_aside(self.path, aside, reason, lost + "; a fresh outbox is in its place")

    def _insert_salvaged(self, rows: list[tuple[Any, ...]]) -> int:
        cur = self._db.cursor()  # type: ignore[union-attr]
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT INTO outbox (id, topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?, ?)",
                            rows)
            self.count = len(rows)
            self.bytes = sum(len(r[2]) for r in rows)
            # New ids go on above every id handed out before (AUTOINCREMENT reads its floor from here).
            floor = max([self._top_id, *(int(r[0]) for r in rows)])
            cur.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            cur.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (floor,))
            if rows and (self.count > self.max_messages or self.bytes > self.max_bytes):
                self._enforce_bounds(cur, keep=max(int(r[0]) for r in rows))
            cur.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return int(self.count)

    # --- writing ------------------------------------------------------------------------------------------

    def _rollback(self) -> None:
        # A COMMIT that failed (SQLITE_FULL, an I/O error) may already have been rolled back by SQLite:
        # an explicit ROLLBACK then raises "no transaction is active".
        db = self._db
        if db is not None and db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.debug("outbox rollback failed: %s", exc)

    def _recount(self, force: bool = False) -> None:
        """Read count and bytes back from the file: after a failure they must be what a restart finds.

        The counters were already put back to their value before the failed transaction; the read-back
        covers a COMMIT that failed after its data reached the disk. It scans the table, so while a full
        disk fails every event it runs at most every RECOUNT_S (`refresh()` forces it, e.g. at stop).
        """
        now = time.monotonic()
        if not force and now < self._recount_at:
            self._stale = True
            return
        self._recount_at = now + RECOUNT_S
        self._stale = False
        try:
            self.count, self.bytes = self._db.execute(  # type: ignore[union-attr]
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        except sqlite3.Error as exc:
            # The snapshot taken before the failed transaction stays: it was what the file held.
            self._report("read", exc)

    def refresh(self) -> None:
        """Read the counters back from the file now if a failure since the last read-back left them unread."""
        with self._lock:
            if self._stale and self._db is not None:
                self._recount(force=True)

    def _relieve(self) -> None:
        # A full disk: the WAL may hold megabytes that a checkpoint folds into pages the file already has
        # (delivered rows free them), and TRUNCATE gives back. Tried at most every RETRY_DELETE_S.
        now = time.monotonic()
        if self._db is None or now < self._relieve_at:
            return
        self._relieve_at = now + RETRY_DELETE_S
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.debug("outbox checkpoint on a full disk failed: %s", exc)

    def _report(self, op: str, exc: BaseException) -> str:
        failure, hint = failure_kind(exc)
        if failure == "full":
            self._relieve()
        what = {"write": "cannot write a message to the outbox", "delete": "cannot delete delivered messages from "
                "the outbox", "read": "cannot read the outbox"}[op]
        consequence = {"write": "the message is lost (counted in the stats as lost); the daemon goes on",
                       "delete": "they are kept in memory and never sent again by this process; the delete is "
                       "retried, and a restart before it succeeds sends them once more",
                       "read": "the daemon goes on"}[op]
        line = f"{what} {self.path}: {exc}; {hint}; {consequence}"
        self.failures.fail(f"{op}-{failure}", line, logging.ERROR)
        self._failing[op] = f"{op}-{failure}"
        return line

    def _recovered(self, op: str) -> None:
        key = self._failing.pop(op, None)
        if key is not None:
            self.failures.ok(key, {"write": f"the outbox {self.path} takes messages again ({self.lost} lost in all)",
                                   "delete": f"the outbox {self.path} deletes delivered messages again",
                                   "read": f"the outbox {self.path} reads again"}[op])

    def put(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, _retry: bool = False) -> int:
        """Append a message (durably, per the sync policy); returns its id. May drop the oldest rows.

        Raises OutboxWriteError when the disk refuses it: the message is lost and counted in `lost`; the
        outbox is as it was before the call.
        """
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        with self._lock:
            if self._db is None:
                self.lost += 1
                self.lost_bytes += len(data)
                raise OutboxWriteError(f"the outbox {self.path} is closed; the message is lost", "closed")
            before = (self.count, self.bytes, self.coalesced, self.dropped, self.dropped_bytes)
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
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
                self._top_id = max(self._top_id, row_id)
                self.count += 1
                self.bytes += len(data)
                if self.count > self.max_messages or self.bytes > self.max_bytes:
                    self._enforce_bounds(cur, keep=row_id)
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self.count, self.bytes, self.coalesced, self.dropped, self.dropped_bytes = before
                if is_damage(exc) and not _retry and self._recover_live(str(exc)):
                    self._lock.release()
                    try:
                        return self.put(topic, data, qos, retain, _retry=True)
                    finally:
                        self._lock.acquire()
                self._recount()
                self.lost += 1
                self.lost_bytes += len(data)
                line = self._report("write", exc)
                raise OutboxWriteError(line, failure_kind(exc)[0]) from exc
            except BaseException:
                self._rollback()
                self.count, self.bytes, self.coalesced, self.dropped, self.dropped_bytes = before
                raise
            if self._failing:
                self._recovered("write")
            self.accepted += 1
            return row_id

    def _enforce_bounds(self, cur: sqlite3.Cursor, keep: int) -> None:
        # Oldest first, in one statement per batch; the message just added is never its own victim
        # (one message bigger than max_bytes is kept alone rather than refused).
        while self.count > self.max_messages or self.bytes > self.max_bytes:
            excess = max(self.count - self.max_messages, 1)
            rows = cur.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE id != ? ORDER BY id "
                               "LIMIT ?) RETURNING id, LENGTH(payload)", (keep, excess)).fetchall()
            if not rows:
                break
            freed = sum(r[1] for r in rows)
            self.count -= len(rows)
            self.bytes -= freed
            self.dropped += len(rows)
            self.dropped_bytes += freed
            self._undeleted.difference_update(r[0] for r in rows)

    # --- reading ------------------------------------------------------------------------------------------

    def after(self, last_id: int, limit: int) -> list[Message]:
        """Up to `limit` messages with an id above `last_id`, oldest first.

        Rows acknowledged but not yet deleted are left out. Rows that cannot be read (a page damaged
        while the daemon runs) are skipped, counted in `unreadable` and reported; never raises sqlite3.Error.
        """
        with self._lock:
            if self._db is None:
                return []
            query = "SELECT id, topic, payload, qos, retain, created FROM outbox WHERE id > ? ORDER BY id LIMIT ?"
            try:
                rows = self._db.execute(query, (int(last_id), int(limit) + len(self._undeleted))).fetchall()
            except sqlite3.Error as exc:
                self._report("read", exc)
                if not is_damage(exc):
                    return []
                rows = None
                if self._recover_live(str(exc)):
                    with contextlib.suppress(sqlite3.Error):
                        rows = self._db.execute(query, (int(last_id), int(limit) + len(self._undeleted))).fetchall()
                if rows is None:
                    rows = self._probe_after(int(last_id), int(limit))
            if rows:
                self._top_id = max(self._top_id, int(rows[-1][0]))
        out = [Message(r[0], r[1], bytes(r[2]), int(r[3]), bool(r[4]), float(r[5])) for r in rows
               if r[0] not in self._undeleted]
        return out[:int(limit)]

    def _recover_live(self, reason: str) -> bool:
        """The file was found damaged while the daemon runs: set it aside and go on with its readable rows
        in a fresh file, as at a start (at most once a minute). Returns whether it was done."""
        now = time.monotonic()
        if now < self._live_recovery_at or self._db is None:
            return False
        self._live_recovery_at = now + 60.0
        try:
            self._replace_damaged(f"found while running: {reason}")
        except (OutboxError, sqlite3.Error, OSError) as exc:
            log.error("cannot replace the damaged outbox %s: %s; restart the daemon", self.path, exc)
            if self._db is None:
                with contextlib.suppress(sqlite3.Error, OSError):
                    self._db = self._open()
            return False
        return True

    def _probe_after(self, last_id: int, limit: int) -> list[tuple[Any, ...]]:
        # One lookup per id: a damaged page costs the rows on it, not every row after it.
        try:
            top = int(self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")  # type: ignore[union-attr]
                      .fetchone()[0])
        except (sqlite3.Error, TypeError):
            return []
        rows: list[tuple[Any, ...]] = []
        row_id = last_id
        while row_id < top and len(rows) < limit:
            row_id += 1
            if row_id in self._unreadable_ids:
                continue
            try:
                row = self._db.execute("SELECT id, topic, payload, qos, retain, created FROM outbox "  # type: ignore[union-attr]
                                       "WHERE id = ?", (row_id,)).fetchone()
            except sqlite3.Error:
                self._unreadable_ids.add(row_id)
                self.unreadable += 1
                continue
            if row is not None:
                rows.append(row)
        return rows

    # --- acknowledging ------------------------------------------------------------------------------------

    def ack(self, ids: list[int]) -> int:
        """Delete delivered messages (ids already gone, e.g. coalesced or dropped, are ignored).

        Never raises for the disk: when the DELETE fails the ids are kept in memory (left out of `after`,
        so never sent again by this process) and retried with the next ack or `retry_deletes`.
        """
        with self._lock:
            return self._delete({int(i) for i in ids} | self._undeleted)

    def _delete(self, wanted: set[int]) -> int:
        if not wanted:
            return 0
        if self._db is None:
            self._undeleted |= wanted
            return 0
        before = (self.count, self.bytes)
        cur = self._db.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            deleted = 0
            for row_id in sorted(wanted):
                row = cur.execute("DELETE FROM outbox WHERE id = ? RETURNING LENGTH(payload)", (row_id,)).fetchone()
                if row is not None:
                    deleted += 1
                    self.count -= 1
                    self.bytes -= row[0]
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self.count, self.bytes = before
            self._recount()
            self._undeleted |= wanted
            self._retry_at = time.monotonic() + RETRY_DELETE_S
            self._report("delete", exc)
            return 0
        except BaseException:
            self._rollback()
            self.count, self.bytes = before
            raise
        if self._failing:
            self._recovered("delete")
        self._undeleted.clear()
        self.acked += deleted
        return deleted

    def retry_deletes(self) -> int:
        """Retry the deletes that failed, at most every RETRY_DELETE_S; returns how many rows went."""
        if not self._undeleted or time.monotonic() < self._retry_at:
            return 0
        return self.ack([])

    @property
    def undeleted(self) -> int:
        """Messages delivered whose row the disk would not delete yet (still on disk: a restart resends them)."""
        return len(self._undeleted)

    def __len__(self) -> int:
        return int(self.count)

    def stats(self) -> dict[str, int]:
        return {"outbox": int(self.count), "outbox_bytes": int(self.bytes), "outbox_dropped": self.dropped,
                "outbox_coalesced": self.coalesced, "outbox_recovered": self.recovered,
                "outbox_lost": self.lost, "outbox_undeleted": self.undeleted, "outbox_salvaged": self.salvaged,
                "outbox_unreadable": self.unreadable}

    def close(self) -> None:
        with self._lock:
            db = self._db
            if db is not None:
                # One last try: what stays is sent once more by the next start.
                self._delete(set(self._undeleted))
                try:
                    # Folds the WAL back into the main file, so a stopped daemon leaves one tidy file.
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.debug("outbox checkpoint failed: %s", exc)
                db.close()
                self._db = None
            if self._lockfile is not None:
                self._lockfile.close()  # releases the flock
                self._lockfile = None


# --- salvage ------------------------------------------------------------------------------------------------

def salvage(path: Path) -> tuple[list[tuple[Any, ...]], int]:
    """The readable rows of a damaged outbox file, oldest first, and how many rows could not be read
    (-1: unknown, the table itself could not be found).

    All rows in one query when that works (damage in an index or a free page); else one lookup per id
    between the lowest and highest id, so a damaged page costs only its own rows. When the header or the
    schema page is damaged, or the file was cut short, the same is tried on copies with the first page
    repaired (see `_repaired_copies`); the copy that gives the most rows wins.
    """
    best: tuple[list[tuple[Any, ...]], int] | None = None
    try:
        best = _salvage(path)
    except sqlite3.Error:
        best = None
    if best is not None and best[1] == 0:
        return best
    for repaired in _repaired_copies(path):
        try:
            found = _salvage(repaired)
        except sqlite3.Error:
            found = None
        finally:
            for companion in ("", "-wal", "-shm"):
                Path(f"{repaired}{companion}").unlink(missing_ok=True)
        if found is not None and (best is None or len(found[0]) > len(best[0])):
            best = found
    return best if best is not None else ([], -1)


def _salvage(path: Path) -> tuple[list[tuple[Any, ...]], int] | None:
    """(rows, unreadable) of one file, or None when its outbox table cannot be found."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        # A row whose page the check names may read without an error and still be wrong (an overflow page
        # overwritten: the bytes come back, not the message): those are not delivered.
        suspects = _suspect_rows(db, path)
        try:
            rows = db.execute(f"{_SELECT} ORDER BY id").fetchall()
            good = [_clean(r) for r in rows if _valid(r) and r[0] not in suspects]
            return good, len(rows) - len(good)
        except sqlite3.Error as exc:
            if not is_damage(exc):
                return None  # no such table (another program's database), a wrong column: nothing of ours
        low = high = None
        for query in ("SELECT MIN(id), MAX(id) FROM outbox",
                      "SELECT MIN(id), (SELECT seq FROM sqlite_sequence WHERE name = 'outbox') FROM outbox",
                      "SELECT 1, seq FROM sqlite_sequence WHERE name = 'outbox'"):
            try:
                low, high = db.execute(query).fetchone() or (None, None)
            except sqlite3.Error:
                continue
            if high is not None:
                break
        if high is None:
            return None
        low = max(int(low or 1), int(high) - SALVAGE_MAX_IDS)
        rows, unreadable = [], 0
        for row_id in range(low, int(high) + 1):
            try:
                row = db.execute(f"{_SELECT} WHERE id = ?", (row_id,)).fetchone()
            except sqlite3.Error:
                unreadable += 1
                continue
            if row is None:
                continue  # an id acknowledged and deleted before the damage
            if _valid(row) and row_id not in suspects:
                rows.append(_clean(row))
            else:
                unreadable += 1
        return rows, unreadable
    finally:
        db.close()


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's variable-length integer at `at`: (value, offset after it)."""
    value = 0
    for i in range(9):
        byte = data[at + i]
        if i == 8:
            return (value << 8) | byte, at + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return value, at + 9


def _suspect_rows(db: sqlite3.Connection, path: Path) -> set[int]:
    """Row ids on the table leaf cells that `PRAGMA quick_check` reports as damaged ("On tree page P cell C")."""
    try:
        problems = "\n".join(str(r[0]) for r in db.execute("PRAGMA quick_check(1000)").fetchall())
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    except sqlite3.Error:
        return set()
    cells = {(int(p), int(c)) for p, c in re.findall(r"On tree page (\d+) cell (\d+)", problems)}
    out: set[int] = set()
    try:
        with open(path, "rb") as fh:
            for page_no, cell in cells:
                fh.seek((page_no - 1) * page_size)
                page = fh.read(page_size)
                base = 100 if page_no == 1 else 0
                if len(page) < base + 8 or page[base] != 0x0D:  # only a table leaf's cells are rows
                    continue
                if cell >= int.from_bytes(page[base + 3:base + 5], "big"):
                    continue
                pointer = int.from_bytes(page[base + 8 + 2 * cell:base + 10 + 2 * cell], "big")
                _, at = _varint(page, pointer)  # the payload's size, then the row id
                out.add(_varint(page, at)[0])
    except (OSError, IndexError):
        pass
    return out


_SELECT = "SELECT id, topic, payload, qos, retain, created FROM outbox"


def _valid(row: tuple[Any, ...]) -> bool:
    _, topic, payload, qos, retain, created = row
    return (isinstance(topic, str) and bool(topic) and isinstance(payload, (bytes, str)) and qos in (0, 1, 2)
            and retain in (0, 1) and isinstance(created, (int, float)))


def _clean(row: tuple[Any, ...]) -> tuple[Any, ...]:
    row_id, topic, payload, qos, retain, created = row
    return (int(row_id), topic, payload.encode("utf-8") if isinstance(payload, str) else bytes(payload), qos, retain,
            created)


SQLITE_MAGIC = b"SQLite format 3\x00"
PAGE_SIZES = (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512)


def _repaired_copies(path: Path) -> list[Path]:
    """Copies of a damaged outbox with its first page mended, for `salvage` to read.

    The file is padded to whole pages and the header's page count made the file's (a file cut short
    otherwise reads as "malformed" from its first page on). Two mends of page 1: its own b-tree with a
    good header (damage confined to the first 100 bytes), and a fresh outbox's page 1 (every outbox is
    created by the same statements, so its schema page is the same; the rows live on the pages after it).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return []
    sizes = list(PAGE_SIZES)
    if head[:16] == SQLITE_MAGIC:
        stated = int.from_bytes(head[16:18], "big")
        stated = 65536 if stated == 1 else stated
        if stated in sizes:
            sizes.remove(stated)
            sizes.insert(0, stated)
    page_size = next((s for s in sizes if size > s), None)
    if page_size is None:
        return []
    pages = -(-size // page_size)
    wal = Path(f"{path}-wal")
    out: list[Path] = []
    try:
        template = _template_page(path, page_size)
    except (OSError, sqlite3.Error):
        return []
    own = bytearray(template[:100]) + bytearray(head[100:page_size].ljust(page_size - 100, b"\0"))
    for name, first in (("own", own), ("template", bytearray(template))):
        first[28:32] = pages.to_bytes(4, "big")  # the page count: the file's, not the header's
        first[32:40] = bytes(8)  # no freelist: its pages are not ours to trust
        if wal.is_file():
            first[18:20] = b"\x02\x02"  # WAL mode: the frames in the -wal copy are read too
        copy = path.with_name(f".{path.name}.{name}")
        try:
            with open(path, "rb") as src, open(copy, "wb") as dst:
                src.seek(page_size)
                dst.write(first)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.truncate(pages * page_size)
            if wal.is_file():
                with open(wal, "rb") as src, open(f"{copy}-wal", "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        except OSError:
            for p in (copy, Path(f"{copy}-wal")):
                p.unlink(missing_ok=True)
            continue
        out.append(copy)
    return out


def _template_page(path: Path, page_size: int) -> bytes:
    """Page 1 of a fresh, empty outbox with this page size."""
    template = path.with_name(f".{path.name}.template")
    for companion in ("", "-wal", "-shm", "-journal"):
        Path(f"{template}{companion}").unlink(missing_ok=True)
    try:
        db = sqlite3.connect(str(template), isolation_level=None)
        try:
            db.execute(f"PRAGMA page_size={page_size}")
            db.executescript(_SCHEMA)
        finally:
            db.close()
        return template.read_bytes()[:page_size]
    finally:
        template.unlink(missing_ok=True)


def default_state_dir() -> Path:
    """Where a daemon not started by systemd keeps its state when the configured directory is unusable."""
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "faceberry"
