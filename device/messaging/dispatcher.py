"""The messaging layer between the frame loop and its outputs (Frigate's frigate/comms/dispatcher.py is the
model).

The frame loop (device/loop.py) knows one `Dispatcher` and hands it notifications: `Started`, one
`FrameDone` per frame (the people seen and the decisions made), `Tick` every loop turn, `StatsReport`,
`Reloaded`, `Stopping`. The outputs (events, presence, images, diagnostics, Home Assistant discovery, face
memory, stranger memory) subscribe to the notifications they care about, in the order the composition root
(device/app.py) subscribes them, and publish on their own topics (device/messaging/topics.py) through a `Publish`
callable: the MQTT communicator (device/messaging/mqtt.py's MqttPublisher and its outbox). Only the dispatcher calls
a subscriber; no output knows the loop, and the loop knows no output.

Commands come in through the same layer: the communicator hands each message on a subscribed topic to its
handler (device/messaging/command_runner.py), which runs it on its own thread. What a command needs from the loop (a
reload after an enrolment) it asks for with a `ReloadRequests` ticket, served between two frames.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

log = logging.getLogger(__name__)


class Publish(Protocol):
    """Store one message for the broker (faceberry.device.messaging.mqtt.MqttPublisher.publish); False if it could not
    be."""

    def __call__(self, topic: str, payload: bytes | str, retain: bool = False, qos: int | None = None) -> bool: ...


class Communicator(Protocol):
    """What the dispatcher needs from the broker side (faceberry.device.messaging.mqtt.MqttPublisher)."""

    state: str

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def close(self) -> None: ...

    def fatal_error(self) -> Exception | None: ...

    def stats(self) -> dict[str, Any]: ...


class Worker(Protocol):
    """A thread of the messaging layer (the command runner): started before the broker connects, stopped
    before it disconnects."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


# --- what travels ------------------------------------------------------------------------------------------------

@dataclass
class FaceSample:
    """What one observation carries to its track's decision."""

    crop: np.ndarray  # the aligned crop (snapshots)
    vector: np.ndarray | None  # the classifier's output for it
    region: np.ndarray | None = None  # the frame around the face with a margin, when faces are remembered


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did: `ok` (the bundle at `path` serves now) or refused with `error`."""

    ok: bool
    bundle_id: str  # the bundle serving after the reload (the old one when refused)
    path: str  # the bundle directory that was tried (cfg.bundle with its links resolved)
    error: str | None = None
    at: float = 0.0  # Unix time


@dataclass(frozen=True)
class Started:
    """The daemon starts: before the broker connection, so what is written now precedes `online`."""

    labels: tuple[str, ...]  # the people the bundle knows (no `unknown`)
    bundle: ReloadResult  # the bundle serving


@dataclass(frozen=True)
class Reloaded:
    """A reload was tried (`result.ok` or refused); labels and threshold are those serving now."""

    result: ReloadResult
    labels: tuple[str, ...]
    threshold: float


@dataclass(frozen=True)
class Seen:
    """A decided track seen in this frame."""

    label: str
    score: float


@dataclass
class Decided:
    """One event: a decision that passed the unknown filter and the cooldown. `event` is the payload of the
    events topic; outputs ahead of the events output may add fields to it (the stranger memory does)."""

    event: dict[str, Any]
    track_id: int
    samples: tuple[FaceSample, ...]  # the track's last samples, newest last


@dataclass(frozen=True)
class FrameDone:
    """One processed frame: who is in view, and the events it decided."""

    index: int
    timestamp: float  # Unix time of capture
    seen: tuple[Seen, ...]
    decided: tuple[Decided, ...]


@dataclass(frozen=True)
class Tick:
    """Every loop turn, frames or not (presence timeouts, Home Assistant's `online`)."""


@dataclass(frozen=True)
class StatsReport:
    """The daemon's statistics: at start, every stats interval, after a reload, and at the end (`final`,
    after the communicator stopped: nothing may be published any more)."""

    stats: dict[str, Any]
    fps: float | None  # None before the first frame
    bundle_id: str
    people: int
    final: bool = False


@dataclass(frozen=True)
class Stopping:
    """A clean stop, before the broker connection ends."""


M = TypeVar("M")


@dataclass
class Dispatcher:
    """One fan-out from the frame loop to the outputs, and the lifecycle of the communicator and workers."""

    communicator: Communicator
    workers: list[Worker] = field(default_factory=list)
    _handlers: dict[type, list[Callable[[Any], None]]] = field(default_factory=lambda: defaultdict(list))
    _stats: list[tuple[str, Callable[[], dict[str, Any] | None]]] = field(default_factory=list)

    def subscribe(self, kind: type[M], handler: Callable[[M], None]) -> None:
        """Call `handler(message)` for every message of type `kind`, after the handlers subscribed before."""
        self._handlers[kind].append(handler)

    def notify(self, message: object) -> None:
        """Hand `message` to its subscribers, in order, in the caller's thread. An output's exception goes to
        the caller: the loop's own failures end the daemon, as they always did."""
        for handler in self._handlers.get(type(message), ()):
            handler(message)

    def add_stats(self, key: str, provider: Callable[[], dict[str, Any] | None]) -> None:
        """`provider()` gives the stats section `key` (None: leave it out)."""
        self._stats.append((key, provider))

    def stats(self) -> dict[str, Any]:
        """The communicator's stats as `mqtt`, and each provider's section."""
        out: dict[str, Any] = {}
        for key, provider in self._stats:
            section = provider()
            if section is not None:
                out[key] = section
        out["mqtt"] = self.communicator.stats()
        return out

    @property
    def state(self) -> str:
        return self.communicator.state

    def fatal_error(self) -> Exception | None:
        return self.communicator.fatal_error()

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self.communicator.start()

    def stop(self, timeout: float = 5.0) -> None:
        for worker in self.workers:
            worker.stop()
        self.communicator.stop(timeout=timeout)

    def abort(self) -> None:
        """The daemon ends before it started (the camera failed): close the communicator's outbox."""
        self.communicator.close()


class ReloadRequests:
    """Reload requests from any thread (SIGHUP, a command after an enrolment), served by the frame loop
    between two frames. A counter lets a caller wait for the reload that follows its request; requests made
    before the loop gets to them are served by one reload (it loads whatever `current` points to then)."""

    def __init__(self) -> None:
        # RLock: the SIGHUP handler runs in the main thread, which may hold the lock at that moment.
        self._cond = threading.Condition(threading.RLock())
        self._wanted = threading.Event()
        self._requests = 0
        self._done = 0
        self._closed = False
        self.last: ReloadResult | None = None

    def request(self) -> int:
        """Ask for a reload; safe from any thread or a signal handler. Returns a ticket for `wait`."""
        with self._cond:
            self._requests += 1
            ticket = self._requests
        self._wanted.set()
        return ticket

    def wait(self, ticket: int, timeout: float | None = None) -> ReloadResult | None:
        """The result of the reload that served `ticket` (or a later one); None if not done in time or the
        loop has stopped."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done >= ticket or self._closed, timeout):
                return None
            return self.last if self._done >= ticket else None

    def serve(self, reload: Callable[[], ReloadResult]) -> ReloadResult | None:
        """In the frame loop: run `reload` if a reload was asked for, and answer the waiting tickets."""
        if not self._wanted.is_set():
            return None
        self._wanted.clear()
        with self._cond:
            serving = self._requests
        result = reload()
        with self._cond:
            self.last = result
            self._done = max(self._done, serving)
            self._cond.notify_all()
        return result

    def close(self) -> None:
        """The loop stops: nobody will serve a request any more; waiters get None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
