"""Home Assistant MQTT discovery, as pure functions: which entities a device has, and their config payloads.

Per-entity discovery (`<discovery_prefix>/<component>/faceberry_<device_id>/<object_id>/config`, one retained
JSON each; the node id level lets a broker ACL confine a Pi to its own configs) works on every Home Assistant
release we support, unlike device-based discovery (2024.11+). Entities:

  event          "<device> face": one event per recognition; event_types = the people + `unknown`;
                 attributes score, track, bundle, event_id, stranger_id, stranger_count, stranger_first_seen
  sensor         "Last face": the last label, `stranger` for an unknown face (HA's own `unknown` state
                 means "no data")
  binary_sensor  "<person> present" (device_class presence) from the retained ON/OFF presence topic
  sensor         "<person> last seen" (device_class timestamp) from the retained person state
  image          "Last face" / "Last unknown face": only with homeassistant.images
  sensor         diagnostics: fps, detect/align/classify ms, dropped frames, outbox depth, CPU temperature
                 (when readable), bundle id, people enrolled
  sensor         "Library entries" (only with library.share): the shared library entries this device holds,
                 the newest as attributes, from the retained device state
  text + button  commands (only with homeassistant.commands): name the last unknown face, "wrong",
                 undo, forget
  sensor         "Last command" (only with homeassistant.commands): every command's result message, the
                 result JSON as attributes

Supported from Home Assistant 2024.1, the oldest tested; before 2023.8 (no MQTT event entity) nothing works.

Every entity is unavailable while the daemon's status topic says `offline`. An entity that disappears
(a person deleted, images turned off) gets an empty retained config, which removes it from Home Assistant.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from faceberry.classifier import UNKNOWN
from faceberry.device.messaging.topics import Topics, object_id, sanitize_label

# Kept importable from here for their callers (enroll, the tests, the benches).
from faceberry.device.messaging.topics import config_topic as config_topic
from faceberry.device.messaging.topics import ha_status_topic as ha_status_topic
from faceberry.device.messaging.topics import node_id as node_id
from faceberry.statefile import DamagedFileError, RateLimitedLog, describe_error, set_aside, write_atomic

log = logging.getLogger(__name__)

ON = "ON"
OFF = "OFF"
# "Last face" for an unknown face: HA renders a state `unknown` as its own "no data" state.
STRANGER = "stranger"
HA_STATE_MAX = 255  # Home Assistant refuses a longer state string
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")

# Diagnostics: (key in the diagnostics payload, entity name, unit, device_class, state_class, icon).
DIAGNOSTICS: tuple[tuple[str, str, str | None, str | None, str | None, str], ...] = (
    ("fps", "Frames per second", "fps", None, "measurement", "mdi:speedometer"),
    ("detect_ms", "Detect time", "ms", "duration", "measurement", "mdi:timer-outline"),
    ("align_ms", "Align time", "ms", "duration", "measurement", "mdi:timer-outline"),
    ("classify_ms", "Classify time", "ms", "duration", "measurement", "mdi:timer-outline"),
    ("dropped_frames", "Dropped frames", None, None, "total_increasing", "mdi:image-off-outline"),
    ("outbox_pending", "Outbox depth", None, None, "measurement", "mdi:tray-full"),
    # Messages the disk refused (full, read-only, failing): never delivered, so a user must see them.
    ("outbox_lost", "Messages lost", None, None, "total_increasing", "mdi:email-remove-outline"),
    ("cpu_temperature", "CPU temperature", "°C", "temperature", "measurement", "mdi:thermometer"),
    ("bundle_id", "Bundle", None, None, None, "mdi:package-variant-closed"),
    ("people", "People enrolled", None, None, "measurement", "mdi:account-group"),
)

# Icons by unique id suffix, for the entities whose device_class does not already give one (presence
# and timestamps keep Home Assistant's own, which follow the state).
ICONS: dict[str, str] = {
    "face": "mdi:face-recognition", "last_event": "mdi:face-recognition",
    "last_face_image": "mdi:face-man-profile", "last_unknown_image": "mdi:account-question",
    "last_command": "mdi:console-line", "name_last_unknown": "mdi:account-plus",
    "wrong": "mdi:account-cancel", "undo": "mdi:undo", "forget": "mdi:delete-forever",
}


# --- topics the daemon publishes for Home Assistant ------------------------------------------------------

def presence_topic(prefix: str, device_id: str, label: str) -> str:
    return Topics(prefix, device_id).presence(label)


def diagnostics_topic(prefix: str, device_id: str) -> str:
    return Topics(prefix, device_id).diagnostics


def image_topic(prefix: str, device_id: str, which: str) -> str:
    return Topics(prefix, device_id).image(which)


def command_topic(prefix: str, device_id: str) -> str:
    return Topics(prefix, device_id).command


def command_result_topic(prefix: str, device_id: str) -> str:
    return Topics(prefix, device_id).command_result


def cpu_temperature(path: Path = THERMAL_ZONE) -> float | None:
    """The SoC temperature in °C, or None where the kernel does not expose it (containers, most PCs)."""
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def diagnostics_payload(*, fps: float | None, ms_per_frame: dict[str, float], dropped_frames: int,
                        outbox_pending: int, bundle_id: str, people: int, cpu_temp: float | None,
                        ms_per_face: dict[str, float] | None = None, outbox_lost: int = 0) -> dict[str, Any]:
    """The JSON published on <prefix>/<device_id>/diagnostics at start, after a reload and at every stats
    interval. `detect_ms` is per frame (every frame is searched); `align_ms` and `classify_ms` are per face
    (`ms_per_face`: they run once per face found, so a mean over empty frames would say nothing). A value
    not measured yet (no frame, no face) is null, which the entity shows as unknown."""
    out: dict[str, Any] = {
        "schema": 1, "fps": None if fps is None else round(float(fps), 2), "dropped_frames": int(dropped_frames),
        "outbox_pending": int(outbox_pending), "outbox_lost": int(outbox_lost),
        "bundle_id": bundle_id, "people": int(people),
        "cpu_temperature": cpu_temp,
    }
    per_face = ms_per_face if ms_per_face is not None else ms_per_frame
    for stage, source in (("detect", ms_per_frame), ("align", per_face), ("classify", per_face)):
        value = source.get(stage)
        out[f"{stage}_ms"] = None if value is None else round(float(value), 2)
    return out


@functools.lru_cache(maxsize=1)
def placeholder_jpeg() -> bytes:
    """A plain grey JPEG, the same bytes every time: what the image topics carry when there is no face to
    show (after `forget`, at a start with images off). An empty retained payload would clear the topic,
    but Home Assistant's image entity takes it as a new picture it cannot serve (HTTP 500 from
    /api/image_proxy, a broken picture card); this one replaces the face just as well."""
    ok, jpeg = cv2.imencode(".jpg", np.full((96, 96, 3), 160, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])
    if not ok:  # OpenCV without a JPEG encoder cannot run the daemon's images either
        raise RuntimeError("OpenCV cannot encode a JPEG")
    return jpeg.tobytes()


# --- discovery ------------------------------------------------------------------------------------------------

_object_id = object_id  # enroll imports it under this name


def label_id(label: str) -> str:
    """A person's part of their entities' unique ids. A label with no ASCII letter or digit (张伟, Олег)
    would become nothing but `_` there, the same for every name of its length: it carries a short hash of
    its topic level. Every other label keeps the id it always had (Home Assistant keeps those entities)."""
    safe = sanitize_label(label)
    if any(c.isascii() and c.isalnum() for c in safe):
        return safe
    return f"{safe}_{hashlib.sha256(safe.encode('utf-8')).hexdigest()[:8]}"


def discovery(prefix: str, device_id: str, labels: Sequence[str], *, discovery_prefix: str = "homeassistant",
              images: bool = False, commands: bool = False, cpu_temp: bool = False,
              sw_version: str | None = None, library: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(config topic, config payload) for every entity of this device; the daemon publishes them retained.

    Per-entity discovery, not the device-based form (one config for all, 2024.11+): Home Assistant keeps
    both, with no deprecation of this one, and this one works on every version we support (docs/MQTT.md).
    """
    t = Topics(prefix, device_id, discovery_prefix)
    device: dict[str, Any] = {"identifiers": [f"faceberry_{device_id}"], "name": f"faceberry {device_id}",
                              "manufacturer": "faceberry", "model": "face recognition"}
    if sw_version:
        device["sw_version"] = sw_version
    common = {"availability_topic": t.status, "payload_available": "online",
              "payload_not_available": "offline", "device": device}
    out: list[tuple[str, dict[str, Any]]] = []

    def add(component: str, suffix: str, config: dict[str, Any]) -> None:
        uid = object_id(device_id, suffix)
        icon = {"icon": ICONS[suffix]} if suffix in ICONS and "icon" not in config else {}
        out.append((t.config(component, suffix), {"unique_id": uid, **config, **icon, **common}))

    people = [lab for lab in labels if lab != UNKNOWN]
    add("event", "face", {
        "name": "Face", "state_topic": t.events,
        "event_types": [*people, UNKNOWN],
        # HA's event entity wants `event_type` in the JSON; the other keys become the event's attributes.
        "value_template": ('{{ {"event_type": value_json.label, "score": value_json.score, '
                           '"track": value_json.track_id, "bundle": value_json.model, '
                           '"camera": value_json.get("camera"), '
                           '"event_id": value_json.event_id, "stranger_id": value_json.get("stranger_id"), '
                           '"stranger_count": value_json.get("stranger_count"), '
                           '"stranger_first_seen": value_json.get("stranger_first_seen")} | to_json }}'),
    })
    # The sensor older versions of faceberry published: kept, so dashboards built on it keep working.
    # A stranger shows as `stranger`: a state `unknown` is Home Assistant's "no data" (as after its own
    # restart, the events topic not being retained), and a card could not tell the two apart.
    add("sensor", "last_event", {
        "name": "Last face", "state_topic": t.events,
        "value_template": (f"{{{{ '{STRANGER}' if value_json.label == '{UNKNOWN}' else value_json.label }}}}"),
        "json_attributes_topic": t.events,
    })
    for label in people:
        safe = label_id(label)
        add("binary_sensor", f"{safe}_present", {
            "name": f"{label} present", "device_class": "presence",
            "state_topic": t.presence(label), "payload_on": ON, "payload_off": OFF,
        })
        add("sensor", safe, {
            "name": f"{label} last seen", "device_class": "timestamp",
            "state_topic": t.person(label), "value_template": "{{ value_json.last_seen }}",
            "json_attributes_topic": t.person(label),
        })
    if images:
        add("image", "last_face_image", {"name": "Last face image", "content_type": "image/jpeg",
                                         "image_topic": t.image("last_face")})
        add("image", "last_unknown_image", {"name": "Last unknown face image", "content_type": "image/jpeg",
                                            "image_topic": t.image("last_unknown")})
    diag = t.diagnostics
    for key, name, unit, device_class, state_class, icon in DIAGNOSTICS:
        if key == "cpu_temperature" and not cpu_temp:
            continue
        # null (not measured yet) renders as "None", which Home Assistant's MQTT sensor takes as no value.
        config: dict[str, Any] = {"name": name, "entity_category": "diagnostic", "state_topic": diag,
                                  "value_template": f"{{{{ value_json.{key} }}}}", "icon": icon}
        if unit:
            config["unit_of_measurement"] = unit
        if device_class:
            config["device_class"] = device_class
        if state_class:
            config["state_class"] = state_class
        add("sensor", key, config)
    if library:
        # From the device state (device/outputs/state.py): the same count on every device means they are in step.
        add("sensor", "library_entries", {
            "name": "Library entries", "entity_category": "diagnostic", "state_topic": t.state,
            "value_template": "{{ value_json.library.entries if value_json.library else None }}",
            "json_attributes_topic": t.state,
            "json_attributes_template": "{{ (value_json.library or {}) | to_json }}",
            "state_class": "measurement", "icon": "mdi:book-account-outline"})
    if commands:
        cmd = t.command
        events = t.events
        # The text box and the "wrong" button carry, as attributes, the face they act on (the last unknown
        # one, the last recognised one) and send its event id: a face decided between the look and the click
        # is not the one named or corrected. Without an event id (Home Assistant restarted since the face
        # was seen) the daemon takes the newest such face.
        add("text", "name_last_unknown", {
            "name": "Name the last unknown face", "command_topic": cmd, "min": 1, "max": 64, "mode": "text",
            "json_attributes_topic": events,
            "json_attributes_template": _kept_face_template("value_json.label == 'unknown'"),
            "command_template": ('{%- set e = this.attributes.get("event_id") if this and this.attributes else none -%}'
                                 '{"command": "name_last_unknown", "name": {{ value | to_json }}'
                                 '{% if e %}, "event_id": {{ e | to_json }}{% endif %}}'),
        })
        add("button", "wrong", {
            "name": "Last recognition was wrong", "command_topic": cmd,
            "payload_press": json.dumps({"command": "wrong"}, separators=(",", ":")),
            "json_attributes_topic": events,
            "json_attributes_template": _kept_face_template("value_json.label != 'unknown'"),
            "command_template": ('{%- set e = this.attributes.get("event_id") if this and this.attributes else none -%}'
                                 '{"command": "wrong"{% if e %}, "event_id": {{ e | to_json }}{% endif %}}'),
        })
        for suffix, name, payload in (
            ("undo", "Undo last correction", {"command": "undo"}),
            ("forget", "Forget stored faces and strangers", {"command": "forget"}),
        ):
            add("button", suffix, {"name": name, "command_topic": cmd,
                                   "payload_press": json.dumps(payload, separators=(",", ":"))})
        # Every command's answer where the user pressed the button: the message as the state (cut to what
        # HA accepts), the whole result as attributes. A sensor, not an event entity: the message is what a
        # dashboard card must show, and an event entity's state is only a timestamp.
        result = t.command_result
        state = f"(('ok: ' if value_json.ok else 'refused: ') ~ value_json.message)[:{HA_STATE_MAX}]"
        add("sensor", "last_command", {"name": "Last command", "state_topic": result,
                                       "json_attributes_topic": result, "value_template": f"{{{{ {state} }}}}"})
    return out


def _kept_face_template(keep: str) -> str:
    """A json_attributes_template over the events topic: an event for which `keep` is true becomes the
    entity's attributes (event_id, label, timestamp, stranger_id); any other event leaves them as they were
    (`this`, the entity's own state, is what Home Assistant's MQTT templates render with)."""
    fields = ("event_id", "label", "timestamp", "stranger_id")
    new = ", ".join(f'"{f}": value_json.get("{f}")' for f in fields)
    old = ", ".join(f'"{f}": a.get("{f}")' for f in fields)
    return ("{%- set a = this.attributes if this and this.attributes else {} -%}"
            f"{{%- if {keep} -%}}{{{{ {{{new}}} | to_json }}}}"
            f"{{%- else -%}}{{{{ {{{old}}} | to_json }}}}{{%- endif -%}}")


def removed(previous: Iterable[str], current: Iterable[str]) -> list[str]:
    """Config topics published before and not any more: each gets an empty retained payload."""
    now = set(current)
    return sorted(t for t in set(previous) if t not in now)


class DiscoveryLedger:
    """The config topics this device last published, kept in state_dir across restarts.

    A person deleted from the bundle while the daemon was stopped still has a retained config on the
    broker; only a record of what was published can tell which topics to clear. The same record moves an
    upgrade off the topics without a node id level: their empty configs go out before the new ones, and
    Home Assistant must process the removal first or it ignores the new config as "already exists".
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.topics: set[str] = set()
        self._failures = RateLimitedLog(log)
        if path is not None and (path.exists() or path.is_symlink()):
            try:
                self.topics = read_ledger(path)
            except (DamagedFileError, IsADirectoryError) as exc:
                set_aside(path, describe_error(exc) if isinstance(exc, DamagedFileError) else "a directory, not a "
                          "file", "entities of people removed while the daemon was stopped may stay in Home "
                          "Assistant (delete them there)")
            except OSError as exc:
                log.warning("cannot read the discovery record %s (%s); the daemon goes on without it", path,
                            describe_error(exc))

    def replace(self, topics: Iterable[str]) -> list[str]:
        """Record `topics` as published; returns the ones to clear."""
        new = set(topics)
        gone = removed(self.topics, new)
        self.topics = new
        if self.path is not None:
            try:
                write_atomic(self.path, json.dumps({"topics": sorted(new)}) + "\n")
            except OSError as exc:
                self._failures.fail("save", f"cannot record the discovery topics in {self.path}: "
                                    f"{describe_error(exc)}; check the free space in state_dir")
            else:
                self._failures.ok("save", f"the discovery topics are recorded again in {self.path}")
        return gone


def read_ledger(path: Path) -> set[str]:
    """The topics in a discovery record; DamagedFileError naming what is wrong, OSError if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedFileError("not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise DamagedFileError(f"not JSON: {exc.msg}") from exc
    except RecursionError as exc:
        raise DamagedFileError("JSON nested too deeply") from exc
    topics = data.get("topics") if isinstance(data, dict) else None
    if not isinstance(topics, list) or not all(isinstance(t, str) and t for t in topics):
        raise DamagedFileError('not a discovery record: no "topics" list of topic names')
    return set(topics)
