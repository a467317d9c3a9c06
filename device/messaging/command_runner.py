"""Commands, run on their own thread: the messaging layer's way in.

The MQTT communicator hands each message on `<prefix>/<device_id>/command` to `CommandRunner.receive` in
paho's thread, which only queues it (a bounded queue: a command that finds it full is answered `busy … try
again` at once, so a flood is not a backlog and every command still gets its answer). The runner's thread
parses (device/messaging/commands.py) and runs each one against the memory stores (recent faces, strangers,
corrections), never in the frame loop's thread: an enrolment takes seconds and frames keep flowing. What a
command needs from the loop, the reload of the bundle it enrolled into, it asks for with a ticket
(faceberry.device.messaging.dispatcher.ReloadRequests) and waits for the answer. It knows no loop and no Service.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faceberry.contract import UNKNOWN
from faceberry.device.memory.corrections import Negatives
from faceberry.device.memory.facestore import FaceStore, StoredFace
from faceberry.device.memory.strangers import StrangerMemory
from faceberry.device.messaging.commands import (
    Command,
    CommandError,
    Forget,
    NameLastUnknown,
    NameStranger,
    Undo,
    Wrong,
    parse,
    result_payload,
    safe_text,
)
from faceberry.device.messaging.dispatcher import Publish, ReloadRequests
from faceberry.device.messaging.library import Library
from faceberry.device.messaging.topics import Topics
from faceberry.device.messaging.worker import Inbox
from faceberry.device.outputs.events import encode

log = logging.getLogger(__name__)

# Messages waiting for the runner. A command that finds the queue full is refused at once with an answer
# ("busy"), from paho's thread.
INBOX_SIZE = 32
# How long an enrolment waits for the frame loop to load the new bundle (it does between two frames).
RELOAD_WAIT_S = 120.0

Answer = tuple[bool, str, dict[str, Any]]
# Enrols `name` from crops in a folder into the bundle; returns enroll's summary
# (faceberry.device.recognition.enroll.enroll).
Enroll = Callable[[str, Path], dict[str, Any]]

class CommandRunner:
    def __init__(self, topics: Topics, publish: Publish, *, max_bytes: int, faces: FaceStore | None,
                 strangers: StrangerMemory | None, negatives: Negatives, reloads: ReloadRequests,
                 enroll: Enroll, clear_images: Callable[..., None], scratch: Path | None = None,
                 library: Library | None = None, unenroll: Callable[[str], dict[str, Any]] | None = None) -> None:
        """`clear_images(*which)`: replace the retained pictures (the images output's); `scratch`: where an
        enrolment's crops are laid out (state_dir); `library`: where a successful enrolment, forget or
        correction is shared with the other devices (device/messaging/library.py); `unenroll(name)`: removes a
        person from the bundle (`forget` with `name`)."""
        self.topics = topics
        self.publish = publish
        self.max_bytes = max_bytes
        self.faces = faces
        self.strangers = strangers
        self.negatives = negatives
        self.reloads = reloads
        self.enroll = enroll
        self.clear_images = clear_images
        self.scratch = scratch
        self.library = library
        self.unenroll = unenroll
        self.inbox = Inbox("commands", INBOX_SIZE, self._handle, before=self._count_busy)
        self._busy_lock = threading.Lock()
        self._busy = 0  # commands refused as busy in paho's thread since the runner last looked
        self._retained_seen: set[bytes] = set()  # digests of retained commands answered by this process
        self.accepted = 0
        self.refused = 0

    # --- paho's thread -------------------------------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """One message on the command topic: only queue it (or answer "busy"), never run anything here."""
        # At most one byte more than the limit: enough to refuse it as oversized.
        payload = payload[: self.max_bytes + 1]
        try:
            self.inbox.put_nowait(topic, payload, retain)
        except queue.Full:
            self._refuse_busy(payload, retain)

    def _refuse_busy(self, payload: bytes, retain: bool) -> None:
        """Answer a command that found the inbox full (parse is bounded and never raises anything but
        CommandError; publish only writes to the thread-safe outbox)."""
        if not payload:
            return
        try:
            cmd = parse(payload, self.max_bytes)
            command, request_id = cmd.command, cmd.request_id
        except CommandError as exc:
            command, request_id = exc.command, exc.request_id
        if retain:
            message = "retained command ignored (it was published with the retain flag; it is not run)"
        else:
            message = f"busy: {self.inbox.qsize()} commands waiting, try again"
        with self._busy_lock:
            self._busy += 1
        self.publish(self.topics.command_result,
                     encode(result_payload(command=command, ok=False, message=message, request_id=request_id)),
                     qos=1)

    # --- the runner's thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.inbox.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the command being run finish (up to `timeout`), then end the thread; queued ones are dropped
        unanswered only if it does not finish in time."""
        if not self.inbox.stop(timeout):
            log.warning("a command was still running at the stop (%.0f s); its answer may be missing", timeout)

    def drain(self) -> None:
        """Run every queued command now, in the calling thread (the thread's job when it runs; a test's
        when it does not)."""
        self.inbox.drain()

    def _count_busy(self) -> None:
        if self._busy:
            with self._busy_lock:
                busy, self._busy = self._busy, 0
            self.refused += busy
            log.warning("refused %d commands as busy: more than %d arrived while one ran (each was answered)",
                        busy, INBOX_SIZE)

    def stats(self) -> dict[str, int]:
        return {"commands_accepted": self.accepted, "commands_refused": self.refused}

    # --- one command ----------------------------------------------------------------------------------------------

    def _handle(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """One queued message. Nothing in it may end the daemon: whatever goes wrong is a refused answer."""
        command: str | None = None
        request_id: str | None = None
        try:
            if not payload:
                # An empty message is how MQTT clears a retained one (ours included, below): not a command.
                log.debug("ignored an empty message on %s", topic)
                return
            try:
                cmd = parse(payload, self.max_bytes)
            except CommandError as exc:
                command, request_id = exc.command, exc.request_id
                if retain:
                    self._ignore_retained(topic, payload, command, request_id)
                else:
                    self._answer(command, False, str(exc), request_id)
                return
            command, request_id = cmd.command, cmd.request_id
            if retain:
                self._ignore_retained(topic, payload, command, request_id)
                return
            try:
                ok, message, extra = self._run(cmd)
            except Exception as exc:  # a command must never take the daemon down
                log.error("command %s failed: %s: %s", command, type(exc).__name__, safe_text(exc),
                          exc_info=log.isEnabledFor(logging.DEBUG))
                ok, message, extra = False, f"failed: {type(exc).__name__}: {safe_text(exc)}", {}
            self._answer(command, ok, message, request_id, **extra)
        except Exception as exc:  # the answer itself failed (encoding, the outbox): say so once, go on
            log.error("a message on %s could not be handled: %s: %s", topic, type(exc).__name__, safe_text(exc),
                      exc_info=log.isEnabledFor(logging.DEBUG))
            with contextlib.suppress(Exception):  # nothing more can be said; the daemon goes on
                self._answer(command, False, f"failed: {type(exc).__name__}", request_id)

    def _ignore_retained(self, topic: str, payload: bytes, command: str | None, request_id: str | None) -> None:
        """A retained command is an old message the broker replays at every start and reconnection: run,
        it would act again each time (one more correction per restart, on whatever face is newest). It is
        refused and answered once per process, and cleared from the broker with an empty retained message
        (a broker whose ACL forbids this user the command topic drops that: the line says how to clear it)."""
        digest = hashlib.sha256(payload).digest()
        if digest in self._retained_seen:
            return  # answered already by this process (a reconnection replays it)
        self._retained_seen.add(digest)
        self._answer(command, False, "retained command ignored (a retained message would run again at every "
                     f"start); asked the broker to clear it (if it stays: mosquitto_pub -r -n -t {topic})",
                     request_id)
        self.publish(topic, b"", retain=True, qos=1)

    def _answer(self, command: str | None, ok: bool, message: str, request_id: str | None, **extra: Any) -> None:
        if ok:
            self.accepted += 1
            log.info("command %s accepted: %s", command, safe_text(message, 400))
        else:
            self.refused += 1
            log.warning("command %s refused: %s", command or "(unreadable)", safe_text(message, 400))
        payload = result_payload(command=command, ok=ok, message=message, request_id=request_id, **extra)
        self.publish(self.topics.command_result, encode(payload), qos=1)

    def _run(self, cmd: Command) -> Answer:
        if isinstance(cmd, Undo):
            return self._undo()
        if isinstance(cmd, Forget):
            return self._forget(cmd)
        if self.faces is None:
            return False, "no faces are remembered (state_dir is not writable)", {}
        store = self.faces
        if isinstance(cmd, NameLastUnknown):
            if cmd.event_id:  # the face the user saw (Home Assistant sends its event id), not the newest
                face = store.get(cmd.event_id)
                if face is None:
                    return False, (f"event {cmd.event_id} is not among the stored faces (already named, forgotten "
                                   "or older than memory.max_age)"), {}
                if face.label != UNKNOWN:
                    return False, (f"event {cmd.event_id} was recognised as {face.label}, not unknown; if that was "
                                   "wrong, send \"wrong\" with its event_id"), {}
                return self._enroll(cmd.name, [face])
            face = store.last(label=UNKNOWN)
            if face is None:
                return False, "no unknown face is stored (none seen within memory.max_age)", {}
            return self._enroll(cmd.name, [face])
        if isinstance(cmd, NameStranger):
            faces = store.of_stranger(cmd.stranger_id)
            if not faces:
                return False, f"no stored faces of stranger {cmd.stranger_id}", {}
            return self._enroll(cmd.name, faces, cmd.stranger_id)
        if isinstance(cmd, Wrong):
            return self._wrong(cmd, store)
        return False, f"unhandled command {cmd.command}", {}

    def _undo(self) -> Answer:
        rec = self.negatives.undo()
        if rec is None:
            return False, "no correction to undo", {}
        if rec.get("library"):  # shared (made here or on another device): undone on every device
            self._share(lambda lib: lib.uncorrect(rec["label"], rec["library"]), f"the undo of {rec['id']}")
        return True, f"undid correction {rec['id']} (not {rec['label']})", {"correction_id": rec["id"]}

    def _wrong(self, cmd: Wrong, store: FaceStore) -> Answer:
        face = store.get(cmd.event_id) if cmd.event_id else store.last(exclude=UNKNOWN)
        if face is None:
            return False, (f"event {cmd.event_id} is not among the stored faces" if cmd.event_id
                           else "no recognised face is stored"), {}
        label = cmd.not_ or face.label
        if label == UNKNOWN:
            return False, "that face was already unknown; say which person it was not with \"not\"", {}
        correction = self.negatives.add(label, face.embeddings(), face.event_id)
        entry = self._share(lambda lib: lib.share_correction(label, face.embeddings(), lib.embedder() or "",
                                                             face.event_id), f"the correction not {label}")
        extra = {"correction_id": correction, "event_id": face.event_id, "not": label}
        if entry:
            self.negatives.tag(correction, entry)
            extra["library_entry"] = entry
        return True, f"stored event {face.event_id} as not {label}", extra

    def _forget(self, cmd: Forget) -> Answer:
        if cmd.name is not None:
            if cmd.stranger_id is not None:
                return False, "give a name or a stranger_id to forget, not both", {}
            return self._forget_person(cmd.name)
        faces = self.faces.forget(cmd.stranger_id) if self.faces is not None else 0
        strangers = self.strangers.forget(cmd.stranger_id) if self.strangers is not None else 0
        what = f"stranger {cmd.stranger_id}" if cmd.stranger_id else "all stored faces and strangers"
        # The retained pictures are stored faces too: the last unknown may be this stranger.
        self.clear_images(*(("last_unknown",) if cmd.stranger_id else ("last_face", "last_unknown")))
        return True, f"forgot {what}: {faces} faces, {strangers} clusters", {"faces": faces,
                                                                               "strangers": strangers}

    def _enroll(self, name: str, faces: list[StoredFace], stranger_id: str | None = None) -> Answer:
        """Enrol `name` from stored faces (this thread: it takes seconds), then have the frame loop load
        the new bundle between two frames and wait for its answer."""
        from faceberry.bundle import BundleError  # the enrolment's modules load only when a name is given
        from faceberry.device.recognition.enroll import EnrollError
        from faceberry.runtime import ModelError

        with tempfile.TemporaryDirectory(prefix="enroll-", dir=self.scratch) as tmp:
            for i, face in enumerate(faces):
                for j, crop in enumerate(face.crops):
                    shutil.copy(crop, Path(tmp) / f"{i:03d}_{j:02d}.jpg")
            try:
                summary = self.enroll(name, Path(tmp))
            except (EnrollError, BundleError, ModelError) as exc:
                return False, f"not enrolled: {exc}", {}
        result = self.reloads.wait(self.reloads.request(), RELOAD_WAIT_S)
        if result is None:
            return False, (f"enrolled {name}, but the daemon did not load the new bundle within "
                           f"{RELOAD_WAIT_S:.0f} s (stopping?); it serves from the next start or reload"), {}
        if not result.ok:
            return False, f"enrolled {name} but the new bundle was refused: {result.error}", {}
        assert self.faces is not None
        for face in faces:
            self.faces.remove(face.event_id)
        if stranger_id and self.strangers is not None:
            self.strangers.forget(stranger_id)
        extra = {"name": name, "bundle_id": result.bundle_id, "photos": summary.get("photos")}
        if summary.get("embedder") and summary.get("embeddings") is not None:
            entry = self._share(lambda lib: lib.share(name, summary["embeddings"], summary["embedder"], stranger_id),
                                name)
            if entry:
                extra["library_entry"] = entry
        rival = summary.get("nearest_other")
        message = f"enrolled {name} from {summary.get('photos')} crop(s); serving bundle {result.bundle_id}"
        if rival and rival[1] >= summary.get("threshold", 1.0):
            message += f" (warning: also scores {rival[1]:.3f} against {rival[0]}: they may be confused)"
        return True, message, extra

    def _forget_person(self, name: str) -> Answer:
        """Remove `name` from the bundle, have the frame loop load it, and tell the other devices."""
        from faceberry.bundle import BundleError
        from faceberry.device.recognition.enroll import EnrollError

        if self.unenroll is None:
            return False, "forgetting a person needs a bundle that enrols (an embedding bundle)", {}
        try:
            self.unenroll(name)
        except (EnrollError, BundleError) as exc:
            return False, f"not forgotten: {exc}", {}
        result = self.reloads.wait(self.reloads.request(), RELOAD_WAIT_S)
        extra: dict[str, Any] = {"name": name, "bundle_id": result.bundle_id if result is not None else None}
        entry = self._share(lambda lib: lib.forget(name), f"that {name} is forgotten")
        if entry:
            extra["library_entry"] = entry
        if result is None or not result.ok:
            return False, (f"forgot {name}, but the new bundle is not serving yet "
                           f"({result.error if result is not None else 'no reload within the wait'})"), extra
        return True, f"forgot {name}; serving bundle {result.bundle_id}", extra

    def _share(self, share: Callable[[Library], str], what: str) -> str | None:
        """Hand a change made here to the shared library (when on); the entry id, or None."""
        if self.library is None:
            return None
        try:
            return share(self.library)
        except Exception as exc:  # done here all the same: the log says what the others miss
            log.error("%s was done here but not shared with the other devices: %s: %s", what,
                      type(exc).__name__, safe_text(exc))
            return None
