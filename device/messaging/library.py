"""One face library for every device: the people enrolled by a command, shared over MQTT.

When a device enrols someone from a command (`name_last_unknown`, `name_stranger`), the command runner hands
the enrolment's embeddings to `Library.share`, which publishes one entry, retained at QoS 1, on
`<prefix>/library/<entry id>` (not under the device's own topics: every device reads the same library).
Every device with `library.share` subscribes to `<prefix>/library/#`; paho's thread only queues what arrives,
and the library's own thread verifies each entry (schema, checksum, the embedder it was made with) and
applies the ones it has not applied yet: it enrols the embeddings into its bundle the way `enroll` does
(the threshold recalibrated on the stranger cohort), then asks the frame loop for a reload through the same
ticket the command runner uses, without a restart. Enrolments are serialised with the command runner's by the
lock both hold (`enroll_lock`): two at once would each switch `current` to a version without the other.

The ids applied are kept in state_dir (`library-<device_id>.json`), so a restart does not apply an entry again;
a device that was offline catches up when it connects, because the entries are retained. A device's own
entries come back to it and are already applied. The same label from two devices is the same person: the
second entry's embeddings are merged with the first's (the gallery entry becomes their centroid).

The entry, `schema` 1 (docs/MQTT.md, "The library"):

    {"schema": 1, "id": "<origin>-<version>", "op": "enrol", "label": "Ann", "dim": 128, "count": 2,
     "embeddings": "<base64 of count×dim little-endian float32>", "embedder": "<sha256 of the classifier file>",
     "origin": "<device_id>", "version": <ns since the epoch>, "at": "2026-12-07T05:20:00Z",
     "checksum": "<sha256 hex of the canonical JSON of every other key>"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.device.messaging.dispatcher import Publish, ReloadRequests
from faceberry.device.messaging.topics import Topics
from faceberry.device.messaging.worker import Inbox
from faceberry.statefile import write_atomic

log = logging.getLogger(__name__)

SCHEMA = 1
OP_ENROL = "enrol"
# An entry is a few embeddings: anything far larger is not one of ours.
MAX_BYTES = 1 << 20
MAX_COUNT = 256
MAX_DIM = 4096
INBOX_SIZE = 1024
# How long an application waits for the frame loop to load the new bundle.
RELOAD_WAIT_S = 120.0

# Enrols (label, embeddings (n, dim)) into the device's bundle, merging with the label's entry if any; returns
# enroll's summary. Raises what faceberry.device.recognition.enroll.enroll raises.
EnrollEmbeddings = Callable[[str, np.ndarray], dict[str, Any]]


class LibraryError(ValueError):
    """An entry that is not usable; the message names the problem."""


@dataclass(frozen=True)
class Entry:
    id: str
    label: str
    embeddings: np.ndarray  # (count, dim) float32
    embedder: str
    origin: str
    version: int


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def checksum(body: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces, UTF-8) of every key but `checksum`."""
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "checksum"})).hexdigest()


def encode_entry(label: str, embeddings: np.ndarray, embedder: str, origin: str, version: int | None = None,
                 at: datetime | None = None) -> tuple[str, bytes]:
    """(entry id, payload) of an enrolment of `label` with `embeddings` (n, dim)."""
    emb = np.asarray(embeddings, dtype="<f4")
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or not len(emb):
        raise LibraryError(f"embeddings must be (count, dim), not {emb.shape}")
    version = time.time_ns() if version is None else int(version)
    entry_id = f"{origin}-{version}"
    body: dict[str, Any] = {
        "schema": SCHEMA, "id": entry_id, "op": OP_ENROL, "label": label, "dim": int(emb.shape[1]),
        "count": int(emb.shape[0]), "embeddings": base64.b64encode(np.ascontiguousarray(emb).tobytes()).decode(),
        "embedder": embedder, "origin": origin, "version": version,
        "at": (at or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    body["checksum"] = checksum(body)
    return entry_id, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_entry(payload: bytes) -> Entry:
    """The entry in `payload`, verified; raises LibraryError naming what is wrong."""
    if len(payload) > MAX_BYTES:
        raise LibraryError(f"{len(payload)} bytes, more than {MAX_BYTES}")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LibraryError(f"not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise LibraryError("not a JSON object")
    if body.get("schema") != SCHEMA:
        raise LibraryError(f"schema {body.get('schema')!r} is not {SCHEMA} (a newer faceberry wrote it; upgrade)")
    if not isinstance(body.get("checksum"), str) or body["checksum"] != checksum(body):
        raise LibraryError("checksum mismatch (altered or damaged on the way)")
    try:
        label, embedder, origin = str(body["label"]), str(body["embedder"]), str(body["origin"])
        dim, count, version, entry_id = int(body["dim"]), int(body["count"]), int(body["version"]), str(body["id"])
        op = body["op"]
        raw = base64.b64decode(body["embeddings"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise LibraryError(f"missing or malformed key ({type(exc).__name__}: {exc})") from exc
    if op != OP_ENROL:
        raise LibraryError(f"op {op!r} is not {OP_ENROL!r}")
    if not (0 < dim <= MAX_DIM and 0 < count <= MAX_COUNT) or len(raw) != 4 * dim * count:
        raise LibraryError(f"embeddings of {len(raw)} bytes do not hold count {count} × dim {dim} float32")
    emb = np.frombuffer(raw, dtype="<f4").reshape(count, dim).astype(np.float32)
    if not np.all(np.isfinite(emb)):
        raise LibraryError("embeddings hold NaN or infinity")
    if not label.strip():
        raise LibraryError("empty label")
    return Entry(entry_id, label, emb, embedder, origin, version)


class Applied:
    """The ids of the entries this device applied (or refused for good), in state_dir: a restart applies
    nothing twice."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.ids: dict[str, int] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.ids = {str(k): int(v) for k, v in data["applied"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("%s is unreadable (%s): library entries will be applied again (the same person "
                            "merged with themself)", path, exc)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self.ids

    def add(self, entry_id: str, version: int) -> None:
        self.ids[entry_id] = version
        if self.path is not None:
            try:
                write_atomic(self.path, json.dumps({"applied": self.ids}, indent=1), fsync=True)
            except OSError as exc:
                log.warning("could not record library entry %s in %s (%s): a restart applies it again",
                            entry_id, self.path, exc)


class Library:
    """Shares this device's enrolments and applies the other devices'. `embedder()` is the sha256 of the
    classifier file of the bundle serving now (None: no bundle that enrols)."""

    def __init__(self, topics: Topics, publish: Publish, *, state: Path | None, enroll: EnrollEmbeddings,
                 reloads: ReloadRequests, embedder: Callable[[], str | None], enroll_lock: threading.Lock) -> None:
        self.topics = topics
        self.publish = publish
        self.enroll = enroll
        self.reloads = reloads
        self.embedder = embedder
        self.enroll_lock = enroll_lock
        self.applied = Applied(state)
        self.inbox = Inbox("library", INBOX_SIZE, self._apply_logged)
        self._said: set[str] = set()  # one log line per refused entry (or other embedder) per process
        self.stats = {"library_applied": 0, "library_refused": 0}

    # --- this device's enrolments -----------------------------------------------------------------------------

    def share(self, label: str, embeddings: np.ndarray, embedder: str) -> str:
        """Publish an enrolment this device made (already in its bundle: recorded as applied first, so its
        echo from the broker is ignored). Returns the entry id."""
        entry_id, payload = encode_entry(label, embeddings, embedder, self.topics.device_id)
        self.applied.add(entry_id, int(entry_id.rsplit("-", 1)[1]))
        self.publish(self.topics.library(entry_id), payload, retain=True, qos=1)
        log.info("library: shared %s as entry %s", label, entry_id)
        return entry_id

    # --- paho's thread --------------------------------------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if not payload:
            return  # an entry cleared from the broker
        try:
            self.inbox.put_nowait(topic, payload[: MAX_BYTES + 1])
        except queue.Full:
            self._once(f"full:{topic}", logging.WARNING, "library entry on %s dropped: %d waiting (it is retained: "
                       "the next reconnection or restart brings it again)", topic, INBOX_SIZE)

    # --- the library's thread -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.inbox.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.inbox.stop(timeout)

    def _apply_logged(self, topic: str, payload: bytes) -> None:
        try:
            self.apply(topic, payload)
        except Exception:  # an entry must never take the daemon down
            log.exception("library entry on %s could not be applied", topic)

    def drain(self) -> None:
        """Apply every queued entry now, in the calling thread (a test's, when the thread does not run)."""
        self.inbox.drain(self.apply)

    def _once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)

    def apply(self, topic: str, payload: bytes) -> bool:
        """Verify and apply one entry; True if it was enrolled now."""
        from faceberry.bundle import BundleError
        from faceberry.device.recognition.enroll import EnrollError
        from faceberry.runtime import ModelError

        digest = hashlib.sha256(payload).hexdigest()
        try:
            entry = decode_entry(payload)
        except LibraryError as exc:
            self.stats["library_refused"] += 1
            self._once(digest, logging.WARNING, "library entry on %s refused: %s; nothing applied (clear it: "
                       "mosquitto_pub -r -n -t %s)", topic, exc, topic)
            return False
        if entry.id in self.applied:
            return False
        if topic.rsplit("/", 1)[-1] != entry.id:
            self.stats["library_refused"] += 1
            self._once(digest, logging.WARNING, "library entry on %s refused: its id %r is not its topic's; nothing "
                       "applied", topic, entry.id)
            return False
        mine = self.embedder()
        if mine is None or entry.embedder != mine:
            # Not recorded: the same entry applies once this device serves a bundle with that embedder.
            self._once(f"embedder:{entry.embedder}", logging.WARNING,
                       "library entries made with embedder %s… are ignored: this device's is %s (embeddings of "
                       "another model mean nothing here; deploy the same bundle to every device)",
                       entry.embedder[:12], (mine or "none")[:12])
            return False
        try:
            with self.enroll_lock:
                summary = self.enroll(entry.label, entry.embeddings)
        except (EnrollError, BundleError, ModelError) as exc:
            self.stats["library_refused"] += 1
            log.warning("library entry %s (%s from %s) not enrolled: %s", entry.id, entry.label, entry.origin, exc)
            self.applied.add(entry.id, entry.version)  # refused for good: the same bundle refuses it again
            return False
        result = self.reloads.wait(self.reloads.request(), RELOAD_WAIT_S)
        self.applied.add(entry.id, entry.version)
        self.stats["library_applied"] += 1
        serving = result.bundle_id if result is not None and result.ok else None
        log.info("library: enrolled %s from %s (entry %s, %d embedding(s)); %s", entry.label, entry.origin,
                 entry.id, len(entry.embeddings),
                 f"serving bundle {serving}" if serving else f"bundle {summary.get('bundle_id')} not loaded yet")
        return True
