"""The daemon's Home Assistant outputs: presence, discovery, diagnostics and face images.

Each is a subscriber of the dispatcher (device/messaging/dispatcher.py), subscribed by the composition root
(device/app.py) only when its setting is on, and publishes on its own topics (device/messaging/topics.py) through the
`publish` callable it was given. None knows the frame loop. Commands are device/messaging/command_runner.py's; the
remembered faces and strangers are device/memory/facestore.py's and device/memory/strangers.py's.

What each part publishes is in docs/MQTT.md and the README's Home Assistant section.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import cv2

from faceberry.contract import UNKNOWN
from faceberry.device import __version__
from faceberry.device.messaging.dispatcher import FrameDone, Publish, Reloaded, Started, StatsReport, Stopping, Tick
from faceberry.device.messaging.topics import Topics
from faceberry.device.outputs import homeassistant as ha
from faceberry.device.outputs.events import encode

log = logging.getLogger(__name__)


class Presence:
    """Each person's retained ON/OFF presence: ON when seen, OFF after homeassistant.presence_timeout."""

    def __init__(self, topics: Topics, publish: Publish, *, timeout: float) -> None:
        self.topics = topics
        self.publish = publish
        self.timeout = timeout
        self.labels: tuple[str, ...] = ()
        self._present: dict[str, float] = {}  # label -> monotonic time last seen, while ON

    def _set(self, label: str, on: bool) -> None:
        self.publish(self.topics.presence(label), ha.ON if on else ha.OFF, retain=True, qos=1)

    def started(self, msg: Started) -> None:
        """Before the publisher connects: nobody is present yet as far as this process knows. The OFFs
        written to the outbox replace (coalesce) any ON a previous run left undelivered there, which would
        otherwise reach the broker after `online`: a false arrival. `now` puts the same OFFs on the broker
        ahead of `online` itself."""
        self.labels = msg.labels
        for label in self.labels:
            self._set(label, False)

    def frame(self, msg: FrameDone) -> None:
        now = time.monotonic()
        for seen in msg.seen:
            if seen.label == UNKNOWN:
                continue
            if seen.label not in self._present:
                self._set(seen.label, True)
            self._present[seen.label] = now

    def tick(self, msg: Tick) -> None:
        if self._present:
            now = time.monotonic()
            for label in [lab for lab, at in self._present.items() if now - at > self.timeout]:
                del self._present[label]
                self._set(label, False)

    def reloaded(self, msg: Reloaded) -> None:
        if not msg.result.ok:
            return
        self.labels = msg.labels
        for label in list(self._present):
            if label not in self.labels:
                del self._present[label]
        for label in self.labels:
            if label not in self._present:
                self._set(label, False)

    def stopping(self, msg: Stopping) -> None:
        """At a clean stop, before the publisher's `offline`: nobody is reported present by a stopped
        daemon, so its retained ONs must not wait on the broker for the next `online`."""
        for label in list(self._present):
            del self._present[label]
            self._set(label, False)

    def now(self) -> list[tuple[str, bytes]]:
        """Every person's presence as this process knows it now (ON for those seen, OFF for the rest),
        published by the MQTT layer straight ahead of `online` (and of a clean stop's `offline`): Home
        Assistant sees the device available only once the retained presence is right, so a restart or a
        reconnection never shows an arrival (`unavailable → on → off`) that did not happen. Runs in paho's
        thread: reads a copy of what the frame loop keeps."""
        present = dict(self._present)
        return [(self.topics.presence(label), (ha.ON if label in present else ha.OFF).encode())
                for label in self.labels]


class Discovery:
    """Home Assistant's discovery configs: at every connection, when Home Assistant says `online`, and
    after a reload (the people may have changed). Entities that disappear get an empty retained config."""

    def __init__(self, topics: Topics, publish: Publish, *, ledger: ha.DiscoveryLedger, images: bool,
                 commands: bool, cpu_temp: bool, library: bool = False,
                 announce: Callable[[], object] | None = None) -> None:
        self.topics = topics
        self.announce = announce  # the device's presence states and `online` again, when Home Assistant starts
        self.library = library
        self.publish = publish
        self.ledger = ledger
        self.images = images
        self.commands = commands
        self.cpu_temp = cpu_temp
        self.labels: tuple[str, ...] = ()
        self._lock = threading.Lock()  # paho's thread (on connect) and the frame loop both publish it
        self._ha_online = False  # Home Assistant said `online` since the last tick: publish once

    def started(self, msg: Started) -> None:
        self.labels = msg.labels

    def publish_all(self) -> None:
        configs = ha.discovery(self.topics.prefix, self.topics.device_id, self.labels,
                               discovery_prefix=self.topics.discovery_prefix, images=self.images,
                               commands=self.commands, cpu_temp=self.cpu_temp, sw_version=__version__,
                               library=self.library)
        with self._lock:
            for topic in self.ledger.replace(t for t, _ in configs):
                self.publish(topic, b"", retain=True, qos=1)  # an empty retained config removes the entity
                log.info("home assistant: removed the entity %s", topic)
            for topic, config in configs:
                self.publish(topic, encode(config), retain=True, qos=1)

    def ha_status(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Home Assistant's birth message (paho's thread): retained or not (it usually is); a flood of
        `online` is one publication at the next tick."""
        if payload.strip() == b"online":
            self._ha_online = True

    def tick(self, msg: Tick) -> None:
        if self._ha_online:
            self._ha_online = False
            log.info("home assistant is online: publishing discovery and availability again")
            self.publish_all()
            if self.announce is not None:
                self.announce()

    def reloaded(self, msg: Reloaded) -> None:
        if msg.result.ok:
            self.labels = msg.labels
            self.publish_all()


class Diagnostics:
    """The retained diagnostics topic: at start, every stats interval and after a reload."""

    def __init__(self, topics: Topics, publish: Publish, *, cpu_temp: bool) -> None:
        self.topics = topics
        self.publish = publish
        self.cpu_temp = cpu_temp

    def stats(self, msg: StatsReport) -> None:
        if msg.final:  # the last stats line comes after the outbox closed
            return
        s = msg.stats
        payload = ha.diagnostics_payload(
            fps=msg.fps, ms_per_frame=s["ms_per_frame"], ms_per_face=s.get("ms_per_face", {}),
            dropped_frames=s["dropped"], outbox_pending=s["mqtt"]["pending"], outbox_lost=s["mqtt"].get("lost", 0),
            bundle_id=msg.bundle_id, people=msg.people, cpu_temp=ha.cpu_temperature() if self.cpu_temp else None)
        self.publish(self.topics.diagnostics, encode(payload), retain=True, qos=1)


class Images:
    """The retained last face and last unknown face (homeassistant.images)."""

    def __init__(self, topics: Topics, publish: Publish, *, enabled: bool, discovery: bool) -> None:
        self.topics = topics
        self.publish = publish
        self.enabled = enabled
        self.discovery = discovery

    def started(self, msg: Started) -> None:
        if not self.enabled:
            # Face crops retained by a run that had images on would stay on the broker for anyone to read.
            self.clear("last_face", "last_unknown")

    def clear(self, *which: str) -> None:
        """Replace the pictures (a `forget` command: they are stored faces too). With discovery on, by the
        placeholder, never emptied: Home Assistant's image entity would take an empty retained message as a
        picture it cannot serve. Without it no image entity exists, and an empty retained message leaves
        nothing on the broker."""
        payload = ha.placeholder_jpeg() if self.discovery else b""
        for name in which:
            self.publish(self.topics.image(name), payload, retain=True, qos=1)

    def frame(self, msg: FrameDone) -> None:
        if not self.enabled:
            return
        for decided in msg.decided:
            if not decided.samples:
                continue
            last = decided.samples[-1]
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(last.region if last.region is not None else last.crop,
                                                         cv2.COLOR_RGB2BGR))
            if ok:
                self.publish(self.topics.image("last_face"), jpeg.tobytes(), retain=True, qos=1)
                if decided.event["label"] == UNKNOWN:
                    self.publish(self.topics.image("last_unknown"), jpeg.tobytes(), retain=True, qos=1)
