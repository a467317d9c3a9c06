"""Stranger identities shared by every device: the same stranger keeps one `stranger_id` on every camera of every
device (`library.strangers`; device/memory/strangers.py keeps the strangers, this module carries them).

When the stranger memory starts a new stranger, it hands it to `StrangerSync.share`, which publishes one entry,
retained at QoS 1, on `<prefix>/strangers/<stranger_id>` (beside the face library's `<prefix>/library/…`, not
under the device's own topics). A stranger seen again is shared again at most every `share_interval` (a tenth
of memory.stranger_retention, at most an hour), so every device's last_seen follows the fleet's and every
device expires the stranger about when the others do. Every device subscribes to `<prefix>/strangers/#`; paho's
thread only queues what arrives, and this module's own thread verifies each entry (schema, checksum, the
embedder's sha256, bounded sizes, the id its topic names) and hands it to `StrangerMemory.adopt`, which adds it,
updates the one it has, or merges it with the one it has of the same person by the rule in
device/memory/strangers.py (the earlier first_seen keeps its id, then the smaller id; the other becomes its
alias, published as an alias entry on the loser's topic so every device follows the merge). A stranger
expired or forgotten is cleared from the broker (an empty retained message), and a device receiving that
clear forgets the stranger too.

The entries, `schema` 1 (docs/MQTT.md, "Shared strangers"):

    {"schema": 1, "op": "stranger", "id": "s-1a2b3c4d", "dim": 128, "centroid": "<base64 of dim little-endian
     float32, unit length>", "count": 3, "first_seen": 1796620800.25, "last_seen": 1796621000.5,
     "embedder": "<sha256 of the classifier file>", "origin": "<device_id>", "at": "2026-12-07T05:20:00Z",
     "checksum": "<sha256 hex of the canonical JSON of every other key>"}
    {"schema": 1, "op": "alias", "id": "s-5e6f7a8b", "alias_of": "s-1a2b3c4d", "origin": "<device_id>",
     "at": "…", "checksum": "…"}
"""

from __future__ import annotations

import base64
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from faceberry.device.memory.strangers import SharedStranger, Stranger, StrangerMemory
from faceberry.device.messaging.dispatcher import Publish
from faceberry.device.messaging.library import floats_b64, signed, stamp, verified
from faceberry.device.messaging.topics import Topics
from faceberry.device.messaging.worker import Entries, Shares

log = logging.getLogger(__name__)

SCHEMA = 1
OP_STRANGER = "stranger"
OP_ALIAS = "alias"
# One centroid of at most MAX_DIM floats, in base64, and a few keys: anything larger is not one of ours.
MAX_BYTES = 64 * 1024
MAX_DIM = 4096
MAX_COUNT = 10**9
INBOX_SIZE = 1024
# A peer's clock this far ahead would keep its strangers from ever expiring: refused, naming the clocks.
MAX_CLOCK_AHEAD_S = 86400.0
STRANGER_ID = re.compile(r"^s-[0-9a-f]{8,32}$")


class StrangerEntryError(ValueError):
    """An entry that is not usable; the message names the problem."""


@dataclass(frozen=True)
class Entry:
    stranger: SharedStranger
    embedder: str | None  # None for an alias: ids mean the same whatever the embedder
    origin: str


def encode_stranger(stranger: Stranger, embedder: str, origin: str, at: datetime | None = None) -> bytes:
    """The entry sharing `stranger` (its centroid, never the faces it was made of)."""
    centroid = np.ascontiguousarray(stranger.centroid, dtype="<f4").reshape(-1)
    return signed({
        "schema": SCHEMA, "op": OP_STRANGER, "id": stranger.stranger_id, "dim": int(centroid.shape[0]),
        "centroid": floats_b64(centroid), "count": int(stranger.count),
        "first_seen": float(stranger.first_seen), "last_seen": float(stranger.last_seen), "embedder": embedder,
        "origin": origin, "at": stamp(at)})


def encode_alias(loser: str, winner: str, origin: str, at: datetime | None = None) -> bytes:
    """The entry saying that stranger `loser` is stranger `winner` (the merge rule decided)."""
    return signed({"schema": SCHEMA, "op": OP_ALIAS, "id": loser, "alias_of": winner, "origin": origin,
                    "at": stamp(at)})


def _id(value: Any, key: str) -> str:
    if not isinstance(value, str) or not STRANGER_ID.match(value):
        raise StrangerEntryError(f"{key} {str(value)[:40]!r} is not a stranger id (s- and 8-32 hex digits)")
    return value


def decode_entry(payload: bytes, now: float | None = None) -> Entry:
    """The entry in `payload`, verified; raises StrangerEntryError naming what is wrong."""
    body = verified(payload, MAX_BYTES, SCHEMA, StrangerEntryError)
    op = body.get("op")
    sid = _id(body.get("id"), "id")
    origin = str(body.get("origin", ""))
    if op == OP_ALIAS:
        winner = _id(body.get("alias_of"), "alias_of")
        if winner == sid:
            raise StrangerEntryError(f"{sid} is an alias of itself")
        return Entry(SharedStranger(sid, None, 0, 0.0, 0.0, alias_of=winner), None, origin)
    if op != OP_STRANGER:
        raise StrangerEntryError(f"op {op!r} is not {OP_STRANGER!r} or {OP_ALIAS!r}")
    try:
        dim, count, embedder = int(body["dim"]), int(body["count"]), str(body["embedder"])
        first, last = float(body["first_seen"]), float(body["last_seen"])
        raw = base64.b64decode(body["centroid"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise StrangerEntryError(f"missing or malformed key ({type(exc).__name__}: {exc})") from exc
    if not (0 < dim <= MAX_DIM) or len(raw) != 4 * dim:
        raise StrangerEntryError(f"a centroid of {len(raw)} bytes does not hold dim {dim} float32")
    if not 0 < count <= MAX_COUNT:
        raise StrangerEntryError(f"count {count} is not 1-{MAX_COUNT}")
    centroid = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    norm = float(np.linalg.norm(centroid)) if np.all(np.isfinite(centroid)) else math.nan
    if not math.isfinite(norm) or norm < 1e-6:
        raise StrangerEntryError("the centroid holds NaN or infinity, or is zero")
    if not (math.isfinite(first) and math.isfinite(last)) or first > last:
        raise StrangerEntryError(f"first_seen {first} and last_seen {last} are not finite times in order")
    now = time.time() if now is None else now
    if last > now + MAX_CLOCK_AHEAD_S:
        raise StrangerEntryError(f"last_seen is {(last - now) / 3600:.0f} h ahead of this device's clock (the "
                                 f"{origin or 'publishing'} device's clock is wrong: check NTP on both)")
    return Entry(SharedStranger(sid, centroid / norm, count, first, last), embedder, origin)


class StrangerSync(Shares):
    """The stranger memory's `Sharing`: publishes this device's strangers and adopts the other devices'.
    `embedder()` is the sha256 of the classifier file of the bundle serving now (None: unknown)."""

    def __init__(self, topics: Topics, publish: Publish, memory: StrangerMemory,
                 embedder: Callable[[], str | None], forgotten: Callable[[str], Any] | None = None) -> None:
        """`forgotten(stranger_id)`: called when another device cleared a stranger this device knew (the recent
        faces stored under that id go too: a stranger forgotten on one device leaves no crop on another)."""
        self.topics = topics
        self.publish = publish
        self.memory = memory
        self.embedder = embedder
        self.forgotten = forgotten
        self.entries = Entries("strangers", "stranger", INBOX_SIZE, MAX_BYTES, self.apply, log)
        self.stats = {"strangers_shared": 0, "strangers_adopted": 0, "strangers_refused": 0}

    def attach(self) -> StrangerSync:
        """From now on the memory's new, merged, expired and forgotten strangers are shared."""
        self.memory.sharing = self
        return self

    # --- the memory's changes, out (the frame loop's or the command runner's thread, the memory locked) ----------

    def share(self, stranger: Stranger) -> None:
        embedder = self.embedder()
        if embedder is None:
            self._once("no-embedder", logging.WARNING, "strangers: not shared: the bundle's embedder is unknown")
            return
        self.publish(self.topics.stranger(stranger.stranger_id),
                     encode_stranger(stranger, embedder, self.topics.device_id), retain=True, qos=1)
        self.stats["strangers_shared"] += 1

    def alias(self, loser: str, winner: str) -> None:
        self.publish(self.topics.stranger(loser), encode_alias(loser, winner, self.topics.device_id), retain=True,
                     qos=1)

    def remove(self, stranger_ids: list[str]) -> None:
        # An empty retained message clears the entry: gone for devices started later, forgotten by the others.
        for sid in stranger_ids:
            self.publish(self.topics.stranger(sid), b"", retain=True, qos=1)
        if stranger_ids:
            log.info("strangers: cleared %d shared entr%s (%s)", len(stranger_ids),
                     "y" if len(stranger_ids) == 1 else "ies", ", ".join(stranger_ids[:5]))

    # --- paho's and this module's threads: receive, start, stop and drain (Shares) --------------------------------

    def _refuse(self, topic: str, why: str) -> None:
        self.stats["strangers_refused"] += 1
        self._once(f"refused:{topic}", logging.WARNING, "stranger entry on %s refused: %s; nothing applied (clear "
                   "it: mosquitto_pub -r -n -t %s)", topic, why, topic)

    def apply(self, topic: str, payload: bytes) -> bool:
        """Verify one entry and hand it to the memory; True if the memory took it (or a clear) in."""
        sid = topic.rsplit("/", 1)[-1]
        if topic != self.topics.stranger(sid) or not STRANGER_ID.match(sid):
            self._refuse(topic, "not a stranger's topic (<prefix>/strangers/<stranger_id>; is a device named "
                         "'strangers'? rename it)")
            return False
        if not payload:
            # Cleared by the device that forgot it or saw it expire: forgotten here too.
            if self.memory.drop(sid):
                if self.forgotten is not None:
                    self.forgotten(sid)
                log.info("strangers: %s forgotten (cleared by another device)", sid)
                return True
            return False
        try:
            entry = decode_entry(payload)
        except StrangerEntryError as exc:
            self._refuse(topic, str(exc))
            return False
        if entry.stranger.stranger_id != sid:
            self._refuse(topic, f"its id {entry.stranger.stranger_id!r} is not its topic's")
            return False
        if entry.embedder is not None and self.entries.foreign(entry.embedder, self.embedder()):
            return False
        known = self.memory.adopt(entry.stranger)
        if known is not None and entry.origin != self.topics.device_id:
            self.stats["strangers_adopted"] += 1
            log.debug("strangers: %s from %s is %s here", sid, entry.origin, known)
        return known is not None
