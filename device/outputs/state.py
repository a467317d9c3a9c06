"""The device's retained state, `<prefix>/<device_id>/state`: what `faceberry fleet status` reads.

One JSON object, retained at QoS 1, published whatever `events.homeassistant` says (the diagnostics topic is
Home Assistant's and only there with it), at start, after every reload and every `stats_interval`:

    {"schema": 1, "device_id": "front", "software": "0.1.0", "bundle_id": "gallery-…",
     "library": {"entries": 3, "newest": "2026-12-07T05:20:00.000Z", "newest_id": "back-17…"} | null,
     "cameras": {"door": {"state": "ok", "fps": 9.8, "dropped": 0}, "garage": {"state": "failed",
                 "reason": "…", "fps": 0.0, "dropped": 0}},
     "last_event": {"at": "2026-12-07T05:21:00.000Z", "label": "Ann", "camera": "door"} | null,
     "fps": 9.8, "at": "2026-12-07T05:21:30.000Z"}

`library` is null where library.share is off; `entries` counts the library entries this device holds
(its own and the ones it applied), so two devices in step show the same count and newest entry.
Not per event: the last event is published with the next stats report, as an event per frame would be
one more retained write to the outbox on the Pi's SD card for each face.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from faceberry.device.messaging.dispatcher import FrameDone, Publish, StatsReport
from faceberry.device.messaging.topics import Topics
from faceberry.device.outputs.events import encode, iso_utc

SCHEMA = 1
# What of a camera's stats the fleet view needs: the rest is in `faceberry status` on the device.
CAMERA_KEYS = ("state", "reason", "fps", "dropped")


def library_version(applied: Mapping[str, int]) -> dict[str, Any]:
    """The library as this device holds it, from {entry id: version (ns since the epoch)}: how many
    entries and the newest (null while there is none)."""
    if not applied:
        return {"entries": 0, "newest": None, "newest_id": None}
    newest_id, newest = max(applied.items(), key=lambda item: (item[1], item[0]))
    return {"entries": len(applied), "newest": iso_utc(newest / 1e9), "newest_id": newest_id}


def state_payload(*, device_id: str, software: str, bundle_id: str, cameras: Mapping[str, Mapping[str, Any]],
                  library: dict[str, Any] | None, last_event: dict[str, Any] | None, fps: float | None,
                  at: float) -> dict[str, Any]:
    """The JSON of `<prefix>/<device_id>/state` (the module's docstring shows it); `cameras` are the loop's
    per-camera stats, of which only CAMERA_KEYS are kept."""
    return {
        "schema": SCHEMA, "device_id": device_id, "software": software, "bundle_id": bundle_id,
        "library": library,
        "cameras": {name: {k: c[k] for k in CAMERA_KEYS if k in c} for name, c in cameras.items()},
        "last_event": last_event, "fps": None if fps is None else round(float(fps), 2), "at": iso_utc(at),
    }


class DeviceState:
    """Publishes the retained state with every stats report; remembers the last event in between.
    `library()` returns the applied library entries ({id: version}), None where the library is off."""

    def __init__(self, topics: Topics, publish: Publish, *, software: str,
                 library: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.topics = topics
        self.publish = publish
        self.software = software
        self.library = library
        self.last_event: dict[str, Any] | None = None

    def frame(self, msg: FrameDone) -> None:
        if msg.decided:
            event = msg.decided[-1].event
            self.last_event = {"at": event.get("timestamp") or iso_utc(msg.timestamp), "label": event.get("label"),
                               "camera": event.get("camera")}

    def stats(self, msg: StatsReport, now: float | None = None) -> None:
        if msg.final:  # the last stats report comes after the outbox closed: `offline` says the rest
            return
        payload = state_payload(
            device_id=self.topics.device_id, software=self.software, bundle_id=msg.bundle_id,
            cameras=msg.stats.get("cameras") or {},
            library=library_version(self.library()) if self.library is not None else None,
            last_event=self.last_event, fps=msg.fps, at=time.time() if now is None else now)
        self.publish(self.topics.state, encode(payload), retain=True, qos=1)
