"""MQTT payloads, as pure functions (the topics are device/messaging/topics.py's; the functions below delegate there).

Topics (prefix defaults to "faceberry"):
    <prefix>/<device_id>/status           "online" (retained) / "offline" (retained, also the last will)
    <prefix>/<device_id>/events           one JSON event per decided (or changed) track identity
    <prefix>/<device_id>/person/<label>   retained JSON last-seen state, for presence automations
    <prefix>/<device_id>/snapshot/<label> JPEG face crop, only when snapshots are enabled (off by default)
    <prefix>/<device_id>/bundle           retained JSON: the bundle serving now, and how the last load went

Every JSON payload carries `schema` so subscribers can tell versions apart.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import cv2

from faceberry.contract import UNKNOWN
from faceberry.device.messaging.dispatcher import Decided, FrameDone, Publish, Reloaded, ReloadResult, Started
from faceberry.device.messaging.topics import Topics
from faceberry.device.messaging.topics import (
    sanitize_label as sanitize_label,  # re-exported: enroll imports it from here
)
from faceberry.device.messaging.topics import valid_device_id as valid_device_id  # and the config this

SCHEMA_VERSION = 1
ONLINE = "online"
OFFLINE = "offline"

def status_topic(prefix: str, device_id: str) -> str:
    return Topics(prefix, device_id).status


def events_topic(prefix: str, device_id: str) -> str:
    return Topics(prefix, device_id).events


def person_topic(prefix: str, device_id: str, label: str) -> str:
    return Topics(prefix, device_id).person(label)


def snapshot_topic(prefix: str, device_id: str, label: str) -> str:
    return Topics(prefix, device_id).snapshot(label)


def bundle_topic(prefix: str, device_id: str) -> str:
    return Topics(prefix, device_id).bundle


def iso_utc(timestamp: float) -> str:
    """Unix time → ISO 8601 UTC with milliseconds, e.g. 2026-01-31T08:15:02.123Z."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def event_payload(
    *,
    device_id: str,
    camera: str,
    label: str,
    score: float,
    bbox: Sequence[float],
    track_id: int,
    frames: int,
    model: str,
    timestamp: float,
    previous: str | None = None,
    event_id: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The JSON object published on <prefix>/<device_id>/events.

    `bbox` is [x1, y1, x2, y2] in frame pixels; `frames` is how many frames voted for the decision;
    `previous` is the track's former label when this event is a change of identity, else null;
    `source` is the file the deciding frame came from (folder and video-file cameras), else null.
    """
    return {
        "schema": SCHEMA_VERSION,
        "event_id": event_id or str(uuid.uuid4()),
        "device_id": device_id,
        "camera": camera,
        "timestamp": iso_utc(timestamp),
        "label": label,
        "score": round(float(score), 4),
        "bbox": [round(float(v), 1) for v in bbox],
        "track_id": int(track_id),
        "frames": int(frames),
        "model": model,
        "previous": previous,
        "source": source,
    }


def person_state_payload(event: dict[str, Any]) -> dict[str, Any]:
    """Retained last-seen state for <prefix>/<device_id>/person/<label>, derived from an event."""
    return {
        "schema": SCHEMA_VERSION,
        "label": event["label"],
        "device_id": event["device_id"],
        "camera": event["camera"],
        "last_seen": event["timestamp"],
        "score": event["score"],
        "event_id": event["event_id"],
        "model": event["model"],
    }


def bundle_status_payload(*, bundle_id: str, state: str, at: float, error: str | None = None,
                          path: str | None = None) -> dict[str, Any]:
    """Retained JSON for <prefix>/<device_id>/bundle, published at start and after every reload.

    `bundle_id` is the bundle serving now; `state` is "loaded" (the bundle at `path` took over) or
    "refused" (the bundle at `path` failed its checks: `error` says why and the fix, `bundle_id` keeps
    serving); `at` is when, as ISO 8601 UTC.
    """
    if state not in ("loaded", "refused"):
        raise ValueError(f"bundle state must be 'loaded' or 'refused', not {state!r}")
    return {"schema": SCHEMA_VERSION, "bundle_id": bundle_id, "state": state, "error": error,
            "path": path, "at": iso_utc(at)}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")


class Cooldown:
    """Per-label rate limit: a label may fire again only `seconds` after it last fired.

    A person standing in front of the camera keeps being re-detected (tracks are lost and found);
    without this the broker would see an event every few seconds.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds < 0:
            raise ValueError("cooldown must be >= 0 seconds")
        self.seconds = float(seconds)
        self.clock = clock
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def ready(self, label: str) -> bool:
        last = self._last.get(label)
        return last is None or self.clock() - last >= self.seconds

    def fire(self, label: str) -> bool:
        """True (and the label's clock restarts) if the label may fire now; False counts a suppression."""
        if self.ready(label):
            self._last[label] = self.clock()
            return True
        self.suppressed += 1
        return False


# --- the outputs that own these topics (subscribed by device/app.py) --------------------------------------------

# Seconds between two refreshes of a person's retained last-seen state while they stay in view, at least.
STATE_REFRESH_MIN_S = 1.0


class EventsOutput:
    """The events topic, each person's retained last-seen state, and snapshots (events.snapshots).

    While a decided person stays in view, their retained last-seen state is refreshed, but no more often than
    the event cooldown, and never per frame (cooldown 0 made it 30 retained writes a second to the outbox on a
    Pi's SD card, measured on a video). That covers people whose new track fell within the cooldown: no event,
    but they are still present.
    """

    def __init__(self, topics: Topics, publish: Publish, *, cooldown: float, snapshots: bool) -> None:
        self.topics = topics
        self.publish = publish
        self.snapshots = snapshots
        self.state_refresh = Cooldown(max(cooldown, STATE_REFRESH_MIN_S))
        self._last_event: dict[str, dict[str, Any]] = {}  # per label, for presence refreshes

    def frame(self, msg: FrameDone) -> None:
        for decided in msg.decided:
            self._emit(decided)
        for seen in msg.seen:
            event = self._last_event.get(seen.label)
            if event is None or not self.state_refresh.fire(seen.label):
                continue
            state = person_state_payload({**event, "timestamp": iso_utc(msg.timestamp), "score": round(seen.score, 4)})
            self.publish(self.topics.person(seen.label), encode(state), retain=True)

    def _emit(self, decided: Decided) -> None:
        event, label = decided.event, decided.event["label"]
        self.publish(self.topics.events, encode(event))
        self.publish(self.topics.person(label), encode(person_state_payload(event)), retain=True)
        self.state_refresh.fire(label)
        self._last_event[label] = event
        if self.snapshots and decided.samples:
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(decided.samples[-1].crop, cv2.COLOR_RGB2BGR))
            if ok:
                self.publish(self.topics.snapshot(label), jpeg.tobytes())

    def reloaded(self, msg: Reloaded) -> None:
        if not msg.result.ok:
            return
        # Presence refreshes repeat the last event: keep people the new bundle still knows.
        self._last_event = {label: {**event, "model": msg.result.bundle_id} for label, event in
                            self._last_event.items() if label in msg.labels or label == UNKNOWN}


class BundleStatusOutput:
    """The retained bundle topic: the bundle serving, at start and after every reload."""

    def __init__(self, topics: Topics, publish: Publish) -> None:
        self.topics = topics
        self.publish = publish

    def _publish(self, result: ReloadResult) -> None:
        payload = bundle_status_payload(bundle_id=result.bundle_id, state="loaded" if result.ok else "refused",
                                        error=result.error, path=result.path, at=result.at)
        self.publish(self.topics.bundle, encode(payload), retain=True, qos=1)

    def started(self, msg: Started) -> None:
        self._publish(msg.bundle)

    def reloaded(self, msg: Reloaded) -> None:
        self._publish(msg.result)
