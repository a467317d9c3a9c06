"""A bounded inbox served by one thread of its own: what paho's network thread hands over without waiting.

The command runner and the face library each own one: paho's callbacks put work in (a full inbox is the
owner's to answer), the thread runs it, and `drain()` runs what is queued in the caller's thread (a test's,
when the thread is not started).
"""

from __future__ import annotations

import contextlib
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
