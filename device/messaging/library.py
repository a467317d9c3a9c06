"""One face library for every device: the people named, forgotten and corrected by a command, shared over MQTT.

When a device enrols someone from a command (`name_last_unknown`, `name_stranger`), forgets a person
(`forget` with `name`) or stores a correction (`wrong`), the command runner hands it to the library, which
publishes one entry, retained at QoS 1, on `<prefix>/library/<entry id>` (not under the device's own topics:
every device reads the same library). Every device with `library.share` subscribes to `<prefix>/library/#`;
paho's thread only queues what arrives, and the library's own thread verifies each entry (schema, checksum, the
embedder it was made with) and applies the ones it has not applied yet, then asks the frame loop for a reload
through the same ticket the command runner uses, without a restart. Bundle changes are serialised with the
command runner's by the lock both hold (`enroll_lock`): two at once would each switch `current` to a version
without the other's change.

Ops: `enrol` (label + embeddings), `forget` (label only: a tombstone), `correct` (label + the embeddings of a
face that is not that person: a hard negative, device/memory/corrections.py).

**The rule (deterministic, whatever order entries arrive in)**: every entry has a key (`version`, `origin`):
nanoseconds at the origin, then its device id to break ties. Per label, what a device serves is a pure function
of the entries it holds (`resolve`): the last `forget` of the label voids every enrolment with a smaller key
(and the bundle's own entry for that label, as deployed); the label's gallery entry is the centroid of the
embeddings of its live enrolments, taken in key order; no live enrolment, no person. Per subject (the
`stranger_id` a command named), only the enrolment with the greatest key is live: the same stranger named
"Ann" on one device and "Anne" on another is whoever was named last. Corrections add up (a set of negatives:
order does not matter). So a forget and an enrol of one person on two devices, or two names for one stranger,
end the same on every device, and a device started later computes the same from the retained entries.

**A forgotten person stays forgotten**: the forget entry is kept retained (a tombstone, without embeddings),
and the device that forgets also clears from the broker the retained enrolments it voided (an empty retained
message on each) so the embeddings of a forgotten person do not stay on the broker. A device that never sees a
clear (it was off, or the clear crossed a bridge after the enrolment) still holds the tombstone, whose key is
greater: the enrolment stays void. Tombstones are never cleared (they are a few hundred bytes).

The device's library state is kept in state_dir (`library-<device_id>.json`): the ids applied (a restart
applies nothing twice; the entries are retained, so a device that was offline catches up when it connects) and
per label the keys and live embeddings the rule needs. A device's own entries come back to it and are already
applied.

The entry, `schema` 1 (docs/MQTT.md, "The library"):

    {"schema": 1, "id": "<origin>-<version>", "op": "enrol", "label": "Ann", "dim": 128, "count": 2,
     "embeddings": "<base64 of count×dim little-endian float32>", "embedder": "<sha256 of the classifier file>",
     "origin": "<device_id>", "version": <ns since the epoch>, "at": "2026-12-07T05:20:00Z",
     "subject": "s-3f2a9c1e" (optional), "checksum": "<sha256 hex of the canonical JSON of every other key>"}

A `forget` entry has no `dim`, `count`, `embeddings` or `embedder`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.device.memory.corrections import Negatives
from faceberry.device.messaging.dispatcher import Publish, ReloadRequests
from faceberry.device.messaging.topics import Topics
from faceberry.device.messaging.worker import Entries, Shares
from faceberry.statefile import write_atomic

log = logging.getLogger(__name__)

SCHEMA = 1
OP_ENROL = "enrol"
OP_FORGET = "forget"
OP_CORRECT = "correct"
OP_UNCORRECT = "uncorrect"
OPS = (OP_ENROL, OP_FORGET, OP_CORRECT, OP_UNCORRECT)
WITH_EMBEDDINGS = (OP_ENROL, OP_CORRECT)
# An entry is a few embeddings: anything far larger is not one of ours.
MAX_BYTES = 1 << 20
MAX_COUNT = 256
MAX_DIM = 4096
INBOX_SIZE = 1024
# How long an application waits for the frame loop to load the new bundle.
RELOAD_WAIT_S = 120.0

# Sets the gallery entry of `label` to the centroid of `embeddings` (n, dim) (not merged with the bundle's
# entry: the library computes the person from every live entry); returns enroll's summary. Raises what
# faceberry.device.recognition.enroll.enroll raises.
EnrollEmbeddings = Callable[[str, np.ndarray], dict[str, Any]]
# Removes `label` from the bundle (enroll.unenroll); raises EnrollError when it is not enrolled.
Unenroll = Callable[[str], dict[str, Any]]
# The gallery rows of `label` in the bundle serving now (None: not enrolled).
GalleryRows = Callable[[str], "np.ndarray | None"]

Key = tuple[int, str]


class LibraryError(ValueError):
    """An entry that is not usable; the message names the problem."""


@dataclass(frozen=True)
class Entry:
    id: str
    label: str
    embeddings: np.ndarray | None  # (count, dim) float32; None for a forget
    embedder: str | None
    origin: str
    version: int
    op: str = OP_ENROL
    subject: str | None = None

    @property
    def key(self) -> Key:
        return (self.version, self.origin)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def checksum(body: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces, UTF-8) of every key but `checksum`."""
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "checksum"})).hexdigest()


def signed(body: dict[str, Any]) -> bytes:
    """The payload of an entry (the library's, the shared strangers'): `body` with its checksum, compact JSON."""
    body["checksum"] = checksum(body)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def verified(payload: bytes, max_bytes: int, schema: int, error: type[ValueError]) -> dict[str, Any]:
    """The JSON object of an entry, its size, schema and checksum checked; raises `error` naming what is wrong."""
    if len(payload) > max_bytes:
        raise error(f"{len(payload)} bytes, more than {max_bytes}")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise error("not a JSON object")
    if body.get("schema") != schema:
        raise error(f"schema {body.get('schema')!r} is not {schema} (a newer faceberry wrote it; upgrade)")
    if not isinstance(body.get("checksum"), str) or body["checksum"] != checksum(body):
        raise error("checksum mismatch (altered or damaged on the way)")
    return body


def stamp(at: datetime | None = None) -> str:
    """An entry's `at` (the library's, the shared strangers'): UTC to the second."""
    return (at or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


def floats_b64(rows: np.ndarray) -> str:
    """Embeddings in an entry (the library's, the shared strangers'): base64 of little-endian float32."""
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode()


def _rows(text: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(-1, dim).astype(np.float32)


def encode_entry(label: str, embeddings: np.ndarray | None, embedder: str | None, origin: str,
                 version: int | None = None, at: datetime | None = None, op: str = OP_ENROL,
                 subject: str | None = None) -> tuple[str, bytes]:
    """(entry id, payload) of an entry: `embeddings` (n, dim) and `embedder` for enrol and correct, neither for
    forget; `subject` the stranger (or event) it is about on its origin."""
    if op not in OPS:
        raise LibraryError(f"op {op!r} is not one of {', '.join(OPS)}")
    version = time.time_ns() if version is None else int(version)
    entry_id = f"{origin}-{version}"
    body: dict[str, Any] = {"schema": SCHEMA, "id": entry_id, "op": op, "label": label}
    if op in WITH_EMBEDDINGS:
        emb = np.asarray(embeddings, dtype="<f4")
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2 or not len(emb):
            raise LibraryError(f"embeddings must be (count, dim), not {emb.shape}")
        body.update({"dim": int(emb.shape[1]), "count": int(emb.shape[0]), "embeddings": floats_b64(emb),
                     "embedder": embedder})
    body.update({"origin": origin, "version": version,
                 "at": stamp(at)})
    if subject is not None:
        body["subject"] = subject
    return entry_id, signed(body)


def decode_entry(payload: bytes) -> Entry:
    """The entry in `payload`, verified; raises LibraryError naming what is wrong."""
    body = verified(payload, MAX_BYTES, SCHEMA, LibraryError)
    op = body.get("op")
    if op not in OPS:
        raise LibraryError(f"op {op!r} is not one of {', '.join(OPS)} (a newer faceberry wrote it; upgrade)")
    try:
        label, origin = str(body["label"]), str(body["origin"])
        version, entry_id = int(body["version"]), str(body["id"])
        subject = body.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise TypeError("subject is not a string")
        emb = embedder = None
        if op in WITH_EMBEDDINGS:
            embedder, dim, count = str(body["embedder"]), int(body["dim"]), int(body["count"])
            raw = base64.b64decode(body["embeddings"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise LibraryError(f"missing or malformed key ({type(exc).__name__}: {exc})") from exc
    if op in WITH_EMBEDDINGS:
        if not (0 < dim <= MAX_DIM and 0 < count <= MAX_COUNT) or len(raw) != 4 * dim * count:
            raise LibraryError(f"embeddings of {len(raw)} bytes do not hold count {count} × dim {dim} float32")
        emb = np.frombuffer(raw, dtype="<f4").reshape(count, dim).astype(np.float32)
        if not np.all(np.isfinite(emb)):
            raise LibraryError("embeddings hold NaN or infinity")
    if not label.strip():
        raise LibraryError("empty label")
    if op == OP_UNCORRECT and not subject:
        raise LibraryError("an uncorrect entry names the correct entry it undoes in `subject`, and has none")
    return Entry(entry_id, label, emb, embedder, origin, version, op, subject)


# --- the rule ---------------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One enrolment of a label: its key, subject and embeddings (None once voided by a forget)."""

    id: str
    key: Key
    subject: str | None
    rows: np.ndarray | None


@dataclass
class Person:
    """What the library knows of one label: the bundle's own entry when the library first touched it (`base`,
    voided by any forget), its enrolments and the key of its last forget."""

    base: np.ndarray | None = None
    parts: list[Part] = field(default_factory=list)
    forgot: Key | None = None


def resolve(people: dict[str, Person]) -> dict[str, np.ndarray | None]:
    """Per label, the rows its gallery entry is the centroid of (None: not a person), by the rule above. Pure:
    the same entries give the same answer in whatever order they were added."""
    winners: dict[str, Key] = {}
    for person in people.values():
        for part in person.parts:
            if part.subject is not None and part.key > winners.get(part.subject, (-1, "")):
                winners[part.subject] = part.key
    out: dict[str, np.ndarray | None] = {}
    for label, person in people.items():
        rows = [person.base] if person.forgot is None and person.base is not None else []
        for part in sorted(person.parts, key=lambda p: p.key):
            if part.rows is None or (person.forgot is not None and part.key <= person.forgot):
                continue
            if part.subject is not None and winners[part.subject] != part.key:
                continue  # the same subject named again later, under this label or another
            rows.append(part.rows)
        out[label] = np.concatenate(rows) if rows else None
    return out


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                         and bool(np.array_equal(a, b)))


class State:
    """The library's state in state_dir: the ids applied (or refused for good) and the people (`Person`)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.ids: dict[str, int] = {}
        self.people: dict[str, Person] = {}
        self.revoked: set[str] = set()  # the correct entries an uncorrect undid
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.ids = {str(k): int(v) for k, v in data["applied"].items()}
                self.revoked = {str(v) for v in data.get("revoked", [])}
                for label, p in data.get("people", {}).items():
                    dim = int(p["dim"]) if p.get("dim") else 0
                    self.people[str(label)] = Person(
                        _rows(p["base"], dim) if p.get("base") else None,
                        [Part(str(q["id"]), (int(q["key"][0]), str(q["key"][1])), q.get("subject"),
                              _rows(q["rows"], dim) if q.get("rows") else None) for q in p["parts"]],
                        (int(p["forgot"][0]), str(p["forgot"][1])) if p.get("forgot") else None)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                log.warning("%s is unreadable (%s): the retained library entries will be applied again (a person "
                            "enrolled from the library counts their present entry once more)", path, exc)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self.ids

    def person(self, label: str, base: Callable[[], np.ndarray | None]) -> Person:
        if label not in self.people:
            self.people[label] = Person(base())
        return self.people[label]

    def add(self, entry_id: str, version: int) -> None:
        self.ids[entry_id] = version
        self.save()

    def save(self) -> None:
        if self.path is None:
            return

        def dim(p: Person) -> int:
            shapes = [r.shape[1] for r in [p.base, *(q.rows for q in p.parts)] if r is not None]
            return shapes[0] if shapes else 0

        people = {label: {"dim": dim(p), "base": floats_b64(p.base) if p.base is not None else None,
                          "forgot": list(p.forgot) if p.forgot else None,
                          "parts": [{"id": q.id, "key": list(q.key), "subject": q.subject,
                                     "rows": floats_b64(q.rows) if q.rows is not None else None} for q in p.parts]}
                  for label, p in self.people.items()}
        try:
            write_atomic(self.path, json.dumps({"applied": self.ids, "people": people,
                                                "revoked": sorted(self.revoked)}, indent=1), fsync=True)
        except OSError as exc:
            log.warning("could not record the library in %s (%s): a restart applies its entries again",
                        self.path, exc)


class Library(Shares):
    """Shares this device's enrolments, forgets and corrections, and applies the other devices'. `embedder()`
    is the sha256 of the classifier file of the bundle serving now (None: no bundle that enrols)."""

    def __init__(self, topics: Topics, publish: Publish, *, state: Path | None, enroll: EnrollEmbeddings,
                 reloads: ReloadRequests, embedder: Callable[[], str | None], enroll_lock: threading.Lock,
                 unenroll: Unenroll | None = None, gallery: GalleryRows | None = None,
                 negatives: Negatives | None = None) -> None:
        self.topics = topics
        self.publish = publish
        self.enroll = enroll
        self.unenroll = unenroll
        self.gallery = gallery or (lambda label: None)
        self.negatives = negatives
        self.reloads = reloads
        self.embedder = embedder
        self.enroll_lock = enroll_lock
        self.state = State(state)
        self.entries = Entries("library", "library", INBOX_SIZE, MAX_BYTES, self.apply, log)
        self.stats = {"library_applied": 0, "library_refused": 0}

    # --- this device's changes --------------------------------------------------------------------------------

    def share(self, label: str, embeddings: np.ndarray, embedder: str, subject: str | None = None) -> str:
        """Publish an enrolment this device made (already in its bundle: recorded as applied first, so its
        echo from the broker is ignored). Returns the entry id."""
        entry_id, payload = encode_entry(label, embeddings, embedder, self.topics.device_id, subject=subject)
        entry = decode_entry(payload)
        with self.enroll_lock:
            # Already in the bundle: the library's view of it starts from nothing but this enrolment.
            person = self.state.person(label, lambda: None)
            before = resolve(self.state.people)
            person.parts.append(Part(entry.id, entry.key, subject, entry.embeddings))
            self.state.add(entry.id, entry.version)
            # A subject named before under another label is that label's no more.
            try:
                changed = self._reconcile(before, skip=label)
            except Exception as exc:  # shared all the same: the other devices apply the rule themselves
                log.warning("library: %s shared, but the rule's other changes here failed: %s: %s", label,
                            type(exc).__name__, exc)
                changed = True
        self.publish(self.topics.library(entry_id), payload, retain=True, qos=1)
        log.info("library: shared %s as entry %s", label, entry_id)
        if changed:
            self._reload()
        return entry_id

    def forget(self, label: str) -> str:
        """Publish that this device forgot `label` (already out of its bundle): a retained tombstone, and an
        empty retained message on each enrolment of the label it voided. Returns the entry id."""
        entry_id, payload = encode_entry(label, None, None, self.topics.device_id, op=OP_FORGET)
        entry = decode_entry(payload)
        with self.enroll_lock:
            voided = self._forget(self.state.person(label, lambda: None), entry.key)
            self.state.add(entry.id, entry.version)
        self.publish(self.topics.library(entry_id), payload, retain=True, qos=1)
        for old in voided:
            self.publish(self.topics.library(old), b"", retain=True, qos=1)
        log.info("library: shared that %s is forgotten (entry %s; %d enrolment(s) cleared from the broker)",
                 label, entry_id, len(voided))
        return entry_id

    def share_correction(self, label: str, embeddings: np.ndarray, embedder: str,
                         event_id: str | None = None) -> str:
        """Publish a correction this device stored ("not `label`"). Returns the entry id."""
        entry_id, payload = encode_entry(label, embeddings, embedder, self.topics.device_id, op=OP_CORRECT,
                                         subject=event_id)
        with self.enroll_lock:
            self.state.add(entry_id, int(entry_id.rsplit("-", 1)[1]))
        self.publish(self.topics.library(entry_id), payload, retain=True, qos=1)
        log.info("library: shared the correction not %s as entry %s", label, entry_id)
        return entry_id

    def uncorrect(self, label: str, correction_entry: str) -> str:
        """Publish that the correction shared as `correction_entry` was undone here: a retained tombstone
        (every device removes it, and one that gets the correction later does not store it), and the
        correction cleared from the broker. Returns the entry id."""
        entry_id, payload = encode_entry(label, None, None, self.topics.device_id, op=OP_UNCORRECT,
                                         subject=correction_entry)
        with self.enroll_lock:
            self.state.revoked.add(correction_entry)
            self.state.add(entry_id, int(entry_id.rsplit("-", 1)[1]))
        self.publish(self.topics.library(entry_id), payload, retain=True, qos=1)
        self.publish(self.topics.library(correction_entry), b"", retain=True, qos=1)
        log.info("library: shared that the correction %s (not %s) is undone (entry %s)", correction_entry, label,
                 entry_id)
        return entry_id

    @staticmethod
    def _forget(person: Person, key: Key) -> list[str]:
        """Record a forget with `key`; returns the ids of the enrolments it voided (their rows are dropped:
        nothing of a forgotten person is kept)."""
        if person.forgot is None or key > person.forgot:
            person.forgot = key
        person.base = None
        voided = []
        for part in person.parts:
            if part.key <= person.forgot and part.rows is not None:
                part.rows = None
                voided.append(part.id)
        return voided

    # --- paho's thread --------------------------------------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if not payload:
            return  # an entry cleared from the broker
        super().receive(topic, payload, retain)

    # --- the library's thread: start, stop and drain (Shares) -----------------------------------------------------

    def _refuse(self, entry: Entry, why: str) -> bool:
        self.stats["library_refused"] += 1
        log.warning("library entry %s (%s %s from %s) not applied: %s", entry.id, entry.op, entry.label,
                    entry.origin, why)
        self.state.add(entry.id, entry.version)  # refused for good: the same bundle refuses it again
        return False

    def apply(self, topic: str, payload: bytes) -> bool:
        """Verify and apply one entry; True if it was applied now (the bundle or the corrections changed, or
        the entry was recorded to decide later ones)."""
        digest = hashlib.sha256(payload).hexdigest()
        try:
            entry = decode_entry(payload)
        except LibraryError as exc:
            self.stats["library_refused"] += 1
            self._once(digest, logging.WARNING, "library entry on %s refused: %s; nothing applied (clear it: "
                       "mosquitto_pub -r -n -t %s)", topic, exc, topic)
            return False
        if entry.id in self.state:
            return False
        if topic.rsplit("/", 1)[-1] != entry.id:
            self.stats["library_refused"] += 1
            self._once(digest, logging.WARNING, "library entry on %s refused: its id %r is not its topic's; nothing "
                       "applied", topic, entry.id)
            return False
        if entry.op in WITH_EMBEDDINGS and self.entries.foreign(entry.embedder, self.embedder()):
            return False  # not recorded: the same entry applies once this device serves a bundle with that embedder
        if entry.op in (OP_CORRECT, OP_UNCORRECT):
            with self.enroll_lock:  # the state's one writer at a time
                return self._correct(entry)
        with self.enroll_lock:
            try:
                changed, voided = self._apply_person(entry)
            except Exception as exc:
                from faceberry.bundle import BundleError
                from faceberry.device.recognition.enroll import EnrollError
                from faceberry.runtime import ModelError

                if not isinstance(exc, (EnrollError, BundleError, ModelError)):
                    raise
                return self._refuse(entry, str(exc))
            self.state.add(entry.id, entry.version)
        self.stats["library_applied"] += 1
        for old in voided:  # every device that voids one clears it: the origin of the forget may not know it
            self.publish(self.topics.library(old), b"", retain=True, qos=1)
        serving = self._reload() if changed else None
        what = ("forgot" if entry.op == OP_FORGET else "enrolled" if entry.id not in voided
                else "did not enrol (forgotten by a later entry)")
        log.info("library: %s %s from %s (entry %s)%s", what, entry.label, entry.origin, entry.id,
                 "" if not changed else f"; serving bundle {serving}" if serving else "; bundle not loaded yet")
        return True

    def _apply_person(self, entry: Entry) -> tuple[bool, list[str]]:
        """Add an enrol or forget to the state and bring the bundle to what the rule says; (whether the bundle
        changed, the ids of the enrolments the forget voids: cleared from the broker)."""
        person = self.state.person(entry.label, lambda: self.gallery(entry.label))
        before = resolve(self.state.people)
        if entry.op == OP_FORGET:
            voided = self._forget(person, entry.key)
        else:
            # An enrolment older than a forget this device holds (it crossed a bridge late, or was retained
            # before the origin of the forget knew it): void at once, and cleared like the others.
            late = person.forgot is not None and entry.key <= person.forgot
            person.parts.append(Part(entry.id, entry.key, entry.subject, None if late else entry.embeddings))
            voided = [entry.id] if late else []
        return self._reconcile(before), voided

    def _reconcile(self, before: dict[str, np.ndarray | None], skip: str | None = None) -> bool:
        """Bring every label whose rows changed from `before` to the rule's answer (the caller holds the lock);
        True if the bundle changed."""
        from faceberry.device.recognition.enroll import EnrollError

        changed = False
        for label, rows in resolve(self.state.people).items():
            if label == skip or _same(before.get(label), rows):
                continue
            if rows is not None:
                self.enroll(label, rows)
                changed = True
            elif self.unenroll is not None:
                try:
                    self.unenroll(label)
                    changed = True
                except EnrollError:
                    pass  # not in this bundle: nothing to remove
        return changed

    def _correct(self, entry: Entry) -> bool:
        """A correction or its undoing (the caller holds the lock). Corrections are a set: an uncorrect that
        arrives first is kept (`revoked`), and the correction it names is not stored when it comes."""
        if self.negatives is None:
            return False
        if entry.op == OP_UNCORRECT:
            assert entry.subject is not None
            self.state.revoked.add(entry.subject)
            removed = self.negatives.remove_library(entry.subject)
            self.state.add(entry.id, entry.version)
            self.stats["library_applied"] += 1
            log.info("library: undid the correction %s (not %s) from %s (entry %s; %d removed here)", entry.subject,
                     entry.label, entry.origin, entry.id, removed)
            return True
        assert entry.embeddings is not None
        if entry.id in self.state.revoked:
            self.state.add(entry.id, entry.version)
            self.publish(self.topics.library(entry.id), b"", retain=True, qos=1)  # undone: cleared
            return False
        try:
            correction = self.negatives.add(entry.label, entry.embeddings, entry.subject, entry.id)
        except ValueError as exc:
            return self._refuse(entry, str(exc))
        self.state.add(entry.id, entry.version)
        self.stats["library_applied"] += 1
        log.info("library: stored the correction not %s from %s (entry %s, correction %s)", entry.label,
                 entry.origin, entry.id, correction)
        return True

    def _reload(self) -> str | None:
        result = self.reloads.wait(self.reloads.request(), RELOAD_WAIT_S)
        return result.bundle_id if result is not None and result.ok else None
