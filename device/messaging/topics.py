"""Every MQTT topic the daemon publishes or reads, assembled in one place from the config.

`Topics(prefix, device_id, discovery_prefix)` is built once by the composition root (device/app.py) and
handed to whoever publishes: the outputs ask it for their topics instead of formatting strings, so a
topic's shape changes here and nowhere else. The module-level functions of device/outputs/events.py and
device/outputs/homeassistant.py (`events_topic`, `presence_topic` …) are kept for their callers and delegate here.

    <prefix>/<device_id>/status                 online/offline (retained, the last will)
    <prefix>/<device_id>/events                 one JSON event per decision
    <prefix>/<device_id>/person/<label>         retained last-seen state
    <prefix>/<device_id>/snapshot/<label>       JPEG crop (events.snapshots)
    <prefix>/<device_id>/bundle                 retained: the bundle serving and how the last load went
    <prefix>/<device_id>/presence/<label>       retained ON/OFF (Home Assistant)
    <prefix>/<device_id>/diagnostics            retained JSON (Home Assistant)
    <prefix>/<device_id>/state                  retained JSON: bundle, library, cameras, last event (fleet status)
    <prefix>/<device_id>/image/<which>          retained JPEG: last_face, last_unknown
    <prefix>/<device_id>/command                commands in
    <prefix>/<device_id>/command/result         their answers
    <prefix>/library/<entry_id>                 retained: the face library every device shares (library.share)
    <prefix>/strangers/<stranger_id>            retained: stranger identities every device shares (library.strangers)
    <discovery_prefix>/status                   Home Assistant's birth message (read)
    <discovery_prefix>/<component>/faceberry_<device_id>/<object_id>/config   discovery configs
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# MQTT forbids nothing but NUL in topic names, yet + and # are wildcards for subscribers and / splits
# levels: a label containing them would land on another topic (or match the wrong filter).
_UNSAFE = re.compile(r"[+#/\x00-\x1f\x7f\s]+")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
IMAGES = ("last_face", "last_unknown")


def sanitize_label(label: str) -> str:
    """A label safe as one topic level: wildcards, slashes, control characters and spaces become '_'."""
    cleaned = _UNSAFE.sub("_", str(label)).strip("_")
    if cleaned in ("", ".", ".."):
        return "_"
    return cleaned


def valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID.match(device_id))


def id_chars(raw: str) -> str:
    """Discovery node and object ids allow [a-zA-Z0-9_-]: device ids may contain '.', labels anything
    sanitized. isalnum() alone lets 'ë' or 'ß' through, and Home Assistant ignores a config whose object id
    has one."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "_-" else "_" for c in raw)


def object_id(device_id: str, suffix: str) -> str:
    """An entity's unique id and the last level of its config topic: never changed, or Home Assistant
    would see new entities (and lose their entity ids, areas, history)."""
    return id_chars(f"faceberry_{device_id}_{suffix}")


def node_id(device_id: str) -> str:
    """The discovery topic's node level, `faceberry_<device_id>`: one topic level per device, so a broker
    ACL can give a Pi its own discovery configs and nobody else's (`homeassistant/+/<node_id>/+/config`)."""
    return id_chars(f"faceberry_{device_id}")


def ha_status_topic(discovery_prefix: str) -> str:
    """Home Assistant's birth/last-will topic: `online` means it (re)started and wants discovery again."""
    return f"{discovery_prefix.strip('/')}/status"


def config_topic(discovery_prefix: str, component: str, device_id: str, suffix: str) -> str:
    """`<discovery_prefix>/<component>/<node_id>/<object_id>/config`: Home Assistant's discovery topic with
    its optional node id level (supported by every version we support)."""
    return f"{discovery_prefix.strip('/')}/{component}/{node_id(device_id)}/{object_id(device_id, suffix)}/config"


@dataclass(frozen=True)
class Topics:
    """The topics of one device. Raises ValueError at construction for a prefix with a wildcard or an
    invalid device_id (the config refuses both earlier, with the field's name)."""

    prefix: str
    device_id: str
    discovery_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        prefix = self.prefix.strip("/")
        if not prefix or "+" in prefix or "#" in prefix:
            raise ValueError(f"topic prefix {prefix!r} is empty or contains a wildcard")
        if not valid_device_id(self.device_id):
            raise ValueError(f"device_id {self.device_id!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")

    @property
    def base(self) -> str:
        return f"{self.prefix.strip('/')}/{self.device_id}"

    # --- the device's own topics ---------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def bundle(self) -> str:
        return f"{self.base}/bundle"

    @property
    def diagnostics(self) -> str:
        return f"{self.base}/diagnostics"

    @property
    def state(self) -> str:
        """Retained: what `faceberry fleet status` reads (device/outputs/state.py)."""
        return f"{self.base}/state"

    @property
    def command(self) -> str:
        return f"{self.base}/command"

    @property
    def command_result(self) -> str:
        return f"{self.base}/command/result"

    def person(self, label: str) -> str:
        return f"{self.base}/person/{sanitize_label(label)}"

    def snapshot(self, label: str) -> str:
        return f"{self.base}/snapshot/{sanitize_label(label)}"

    def presence(self, label: str) -> str:
        """Retained `ON`/`OFF`: the person was seen within homeassistant.presence_timeout."""
        return f"{self.base}/presence/{sanitize_label(label)}"

    def image(self, which: str) -> str:
        """Retained JPEG: `last_face` (any decided face) or `last_unknown`."""
        if which not in IMAGES:
            raise ValueError(f"image must be last_face or last_unknown, not {which!r}")
        return f"{self.base}/image/{which}"

    # --- shared by every device ---------------------------------------------------------------------------------

    @property
    def library_filter(self) -> str:
        """Every library entry, of every device (device/messaging/library.py)."""
        return f"{self.prefix.strip('/')}/library/#"

    def library(self, entry_id: str) -> str:
        return f"{self.prefix.strip('/')}/library/{sanitize_label(entry_id)}"

    # --- Home Assistant's ---------------------------------------------------------------------------------------

    @property
    def ha_status(self) -> str:
        return ha_status_topic(self.discovery_prefix)

    def config(self, component: str, suffix: str) -> str:
        return config_topic(self.discovery_prefix, component, self.device_id, suffix)

    # --- stranger identities, shared by every device (device/messaging/stranger_sync.py) -----------------------

    @property
    def strangers_filter(self) -> str:
        return f"{self.prefix.strip('/')}/strangers/#"

    def stranger(self, stranger_id: str) -> str:
        return f"{self.prefix.strip('/')}/strangers/{sanitize_label(stranger_id)}"
