"""A bounded inbox served by one thread of its own: what paho's network thread hands over without waiting.

The command runner owns one: paho's callbacks put work in (a full inbox is the owner's to answer), the thread
runs it, and `drain()` runs what is queued in the caller's thread (a test's, when the thread is not started).
The face library and the shared strangers each own an `Entries`: retained entries of one kind, through an inbox;
both are `Shares`, received, started, stopped and drained through it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class Inbox:
    def __init__(self, name: str, size: int, handle: Callable[..., None],
                 before: Callable[[], None] = lambda: None) -> None:
        """`handle(*item)` runs each item; `before()` runs each time the thread wakes up and before a drain."""
        self.name = name
        self.handle = handle
        self.before = before
        self.queue: queue.Queue[Any] = queue.Queue(size)
        self._thread: threading.Thread | None = None

    def put_nowait(self, *item: Any) -> None:
        """Queue one item; queue.Full when the inbox is full."""
        self.queue.put_nowait(item)

    def qsize(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Let the item being handled finish (up to `timeout`), then end the thread. False if it was still
        running at the timeout (what was queued behind it is not handled)."""
        if self._thread is None:
            return True
        with contextlib.suppress(queue.Full):
            self.queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        finished = not self._thread.is_alive()
        self._thread = None
        return finished

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            self.before()
            if item is _STOP:
                return
            self.handle(*item)

    def drain(self, handle: Callable[..., None] | None = None) -> None:
        """Handle everything queued now, in the calling thread (with `handle` instead, if given)."""
        self.before()
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                (handle or self.handle)(*item)


class Entries:
    """Retained entries of one kind (the library's, the shared strangers'), from paho's thread to a thread of their
    own: each cut at `max_bytes` + 1 (the owner refuses what is larger), `apply(topic, payload)` run for each and
    never fatal, a full inbox said once per topic (the entry is retained: the next reconnection brings it again).
    `once` is the owner's one-line-per-key log, in the owner's logger."""

    def __init__(self, name: str, what: str, size: int, max_bytes: int, apply: Callable[[str, bytes], object],
                 log: logging.Logger) -> None:
        self.what = what  # "library", "stranger": how the log lines name an entry ("library entry")
        self.size = size
        self.max_bytes = max_bytes
        self.apply = apply
        self.log = log
        self.inbox = Inbox(name, size, self._apply_logged)
        self._said: set[str] = set()

    def receive(self, topic: str, payload: bytes) -> None:
        try:
            self.inbox.put_nowait(topic, payload[: self.max_bytes + 1])
        except queue.Full:
            self.once(f"full:{topic}", logging.WARNING, "%s entry on %s dropped: %d waiting (it is retained: the next "
                      "reconnection or restart brings it again)", self.what, topic, self.size)

    def once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log.log(level, msg, *args)

    def foreign(self, embedder: str | None, mine: str | None) -> bool:
        """True when an entry made with `embedder` means nothing to this device, whose embedder is `mine` (None:
        unknown); said once per embedder."""
        if mine is not None and embedder == mine:
            return False
        self.once(f"embedder:{embedder}", logging.WARNING,
                  "%s entries made with embedder %s… are ignored: this device's is %s (embeddings of another model "
                  "mean nothing here; deploy the same bundle to every device)", self.what, (embedder or "none")[:12],
                  (mine or "none")[:12])
        return True

    def start(self) -> None:
        self.inbox.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.inbox.stop(timeout)

    def drain(self) -> None:
        """Apply every queued entry now, in the calling thread (a test's, when the thread does not run)."""
        self.inbox.drain(self.apply)

    def _apply_logged(self, topic: str, payload: bytes) -> None:
        try:
            self.apply(topic, payload)
        except Exception:  # an entry must never take the daemon down
            self.log.exception("%s entry on %s could not be applied", self.what, topic)


class Shares:
    """What the face library and the shared strangers both are: the owner of an `Entries` (`entries`), received,
    started, stopped and drained through it."""

    entries: Entries

    # --- paho's thread --------------------------------------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.entries.receive(topic, payload)

    # --- the entries' thread --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.entries.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.entries.stop(timeout)

    def drain(self) -> None:
        """Apply every queued entry now, in the calling thread (a test's, when the thread does not run)."""
        self.entries.drain()

    def _once(self, key: str, level: int, msg: str, *args: Any) -> None:
        self.entries.once(key, level, msg, *args)  # one line per refused entry (or other embedder) per process
