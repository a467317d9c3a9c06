"""The daemon's files in state_dir, written and refused one way: tmp + rename, and a damaged file set aside.

`write_atomic` writes beside the target and renames over it, so a reader (or the next start after a
power cut) sees the old file or the new one, never half of one. `set_aside` renames a file the daemon
cannot use to `<name>.corrupt-<UTC time>` beside it, with one WARNING line naming the file, why, what was
lost and that the daemon goes on without it; the newest `KEEP_ASIDE` copies per file are kept (a failing
SD card must not fill the disk with them). `RateLimitedLog` is the one-line-per-kind-of-failure rule for
failures that repeat at every event (a full disk) or at every attempt (the MQTT connection).

Used by the outbox, the corrections, the stranger memory, the recent-faces store, the Home Assistant
discovery ledger and the status file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

KEEP_ASIDE = 3  # damaged copies kept per file, newest first
ASIDE_MARK = ".corrupt-"
REPEAT_S = 300.0  # a failure that persists is logged again at most this often


class DamagedFileError(ValueError):
    """A state file's content is not what its reader expects (raised by the readers, caught at load)."""


def write_atomic(path: Path, data: bytes | str | Callable[[IO[bytes]], None], *, fsync: bool = False,
                 overwrite_if_full: bool = False) -> None:
    """Replace `path` with `data` (bytes, text as UTF-8, or a function writing to a binary file) atomically.

    Raises OSError (ENOSPC, EROFS …) with `path` unchanged and no temporary file left behind.
    `overwrite_if_full`: on a full disk, text no longer than the file already there is written over it in
    place, padded with spaces (its blocks are already allocated): a reader may then meet a torn file, which
    for a status file is better than one that stops changing just when the disk is full.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if (overwrite_if_full and isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                and not callable(data) and _overwrite(path, data.encode("utf-8") if isinstance(data, str) else data)):
            return
        raise


def _overwrite(path: Path, raw: bytes) -> bool:
    try:
        st = path.stat()
        # Within the blocks the file already has (its last block is allocated whole): no new space needed.
        if len(raw) > max(st.st_size, st.st_blocks * 512):
            return False
        with open(path, "r+b") as fh:
            fh.write(raw.ljust(st.st_size, b" "))
        return True
    except OSError:
        return False


def aside_name(path: Path, now: float | None = None) -> Path:
    # To the millisecond, so names sort in the order the copies were made (the pruning relies on it).
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    candidate = path.with_name(f"{path.name}{ASIDE_MARK}{stamp}")
    n = 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}{ASIDE_MARK}{stamp}-{n:03d}")
    return candidate


def move_aside(path: Path, *, companions: tuple[str, ...] = ()) -> Path:
    """Rename `path` (and the files named `path` + each suffix in `companions`, e.g. SQLite's `-wal`) to
    `<name>.corrupt-<UTC time>` beside it, keeping the newest KEEP_ASIDE such copies. Raises OSError."""
    path = Path(path)
    target = aside_name(path)
    os.replace(path, target)
    for suffix in companions:
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            with contextlib.suppress(OSError):
                os.replace(extra, target.with_name(target.name + suffix))
    _prune_aside(path, companions)
    return target


def report_aside(path: Path, target: Path | None, reason: str, lost: str, error: OSError | None = None) -> None:
    """The one WARNING line for a damaged file: which, why, where it went (or why it stayed), what was lost."""
    reason = " ".join(str(reason).split())[:300] or "unreadable"
    if target is None:
        log.warning("%s is damaged (%s) and cannot be moved aside (%s): %s; the daemon goes on without it; "
                    "move or delete the file by hand", path, reason,
                    (error.strerror if error is not None else None) or error, lost)
    else:
        log.warning("%s is damaged (%s): moved aside to %s; %s; the daemon goes on without it", path, reason,
                    target.name, lost)


def set_aside(path: Path, reason: str, lost: str, *, companions: tuple[str, ...] = ()) -> Path | None:
    """Move a damaged `path` (a file, or a directory where a file should be) out of the daemon's way, with
    one WARNING line (see `report_aside`). Returns the new path, or None when it could not be moved (the
    caller goes on without the file anyway)."""
    try:
        target = move_aside(path, companions=companions)
    except OSError as exc:
        report_aside(path, None, reason, lost, exc)
        return None
    report_aside(path, target, reason, lost)
    return target


def _prune_aside(path: Path, companions: tuple[str, ...] = ()) -> None:
    copies = sorted((p for p in path.parent.glob(f"{path.name}{ASIDE_MARK}*")
                     if not any(p.name.endswith(suffix) for suffix in companions)),
                    key=lambda p: p.name, reverse=True)  # the name holds the UTC time it was set aside
    for old in copies[KEEP_ASIDE:]:
        try:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
            for suffix in companions:
                old.with_name(old.name + suffix).unlink(missing_ok=True)
        except OSError:
            pass


def describe_error(exc: BaseException) -> str:
    """An exception as a short phrase for a log line: never a bare class name."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if not text:
        return name
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return text if isinstance(exc, DamagedFileError) else f"{name}: {text}"[:300]


class RateLimitedLog:
    """One line per kind of failure: the first at once, then at most one per `repeat_s` saying how many
    were not logged. `ok(kind)` after a success says once that a logged failure is over; a failure that
    comes back within `repeat_s` is counted quietly (a disk at the edge of full flaps at every event)."""

    def __init__(self, logger: logging.Logger, repeat_s: float = REPEAT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.repeat_s = float(repeat_s)
        self.clock = clock
        self._last: dict[str, float] = {}  # kind -> when it was last logged
        self._open: set[str] = set()  # kinds logged and not yet reported over
        self._quiet: dict[str, int] = {}  # failures of each kind since the last line
        self.counts: dict[str, int] = {}  # failures of each kind in all
        self.attempts = 0  # failures of any kind since the last all_clear()
        self._since: float | None = None  # when the first of them happened

    def fail(self, kind: str, message: str, level: int = logging.WARNING) -> bool:
        """Count one failure of `kind`; log `message` if due. Returns whether it was logged."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self.clock()
        self.attempts += 1
        if self._since is None:
            self._since = now
        last = self._last.get(kind)
        if last is not None and now - last < self.repeat_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return False
        quiet = self._quiet.pop(kind, 0)
        suffix = f" ({quiet} more like it since the last line)" if quiet else ""
        self.logger.log(level, "%s%s", message, suffix)
        self._last[kind] = now
        self._open.add(kind)
        return True

    def ok(self, kind: str, message: str) -> None:
        """The failure of `kind` is over: say so, once per logged failure."""
        if kind in self._open:
            self._open.discard(kind)
            self.logger.info("%s", message)

    def all_clear(self) -> str | None:
        """Everything works again (a connection came back): "after N failed attempts over T s" for the caller's
        own line, or None if nothing failed; and forget the failures, so the next one is logged at once."""
        if not self.attempts:
            return None
        line = f"after {self.attempts} failed attempts over {self.clock() - (self._since or 0):.0f} s"
        self.attempts, self._since = 0, None
        self._last.clear()
        self._quiet.clear()
        self._open.clear()
        return line
