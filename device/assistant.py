"""The daemon's Home Assistant side: discovery, presence, diagnostics, face images, the recent-faces
store, stranger memory, corrections and commands. device/service.py calls its hooks from the frame loop;
everything here runs in that thread (MQTT messages arrive through a bounded queue).

What each part stores and publishes is in docs/MQTT.md and the README's Home Assistant section.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from device import __version__
from device import homeassistant as ha
from device.classifier import UNKNOWN, Prediction
from device.commands import (
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
from device.contract import accept_with_negatives
from device.corrections import Negatives
from device.events import encode, iso_utc
from device.facestore import FaceStore, crop_with_margin
from device.strangers import StrangerMemory

if TYPE_CHECKING:
    from device.pipeline import Recognition
    from device.service import Service
    from device.tracker import Decision

log = logging.getLogger(__name__)

# Messages waiting for the frame loop. A command that finds it full is refused at once with an answer
# ("busy"), from paho's thread: a flood is not a backlog, and every command still gets its answer.
INBOX_SIZE = 32


@dataclass
class FaceSample:
    """What one observation carries to its track's decision."""

    crop: np.ndarray  # the aligned crop (snapshots)
    vector: np.ndarray | None  # the classifier's output for it
    region: np.ndarray | None = None  # the frame around the face with a margin, when faces are remembered


class Assistant:
    def __init__(self, service: Service, state: Path | None) -> None:
        self.service = service
        cfg = service.cfg
        self.cfg = cfg
        self.prefix = cfg.events.topic_prefix
        self.device_id = cfg.device_id
        self.discovery = bool(cfg.events.homeassistant)
        self.ha = cfg.homeassistant
        self.mem = cfg.memory
        self.commands = bool(self.ha.commands)
        self.images = bool(self.ha.images)
        self.remember = self.commands or bool(self.mem.strangers)
        self.state = state
        self.faces: FaceStore | None = None
        self.strangers: StrangerMemory | None = None
        self.negatives = Negatives(state / f"negatives-{self.device_id}.json" if state else None)
        if state is not None and self.remember:
            self.faces = FaceStore(state / f"faces-{self.device_id}", self.mem.max_faces, self.mem.max_age)
        if state is not None and self.mem.strangers:
            self.strangers = StrangerMemory(state / f"strangers-{self.device_id}.npz",
                                            service.pipeline.classifier.threshold, self.mem.max_strangers,
                                            self.mem.stranger_retention)
        self._discovery_lock = threading.Lock()  # paho's thread (on connect) and the frame loop both publish it
        self.ledger = ha.DiscoveryLedger(state / f"discovery-{self.device_id}.json" if state else None)
        self.inbox: queue.Queue[tuple[str, bytes, bool]] = queue.Queue(INBOX_SIZE)
        self._busy_lock = threading.Lock()
        self._busy = 0  # commands refused as busy in paho's thread since the last tick
        self._ha_online = False  # Home Assistant said `online` during this tick: publish discovery once
        self._retained_seen: set[bytes] = set()  # digests of retained commands answered by this process
        self._samples: dict[int, deque[FaceSample]] = {}
        # Only the face store, the stranger memory and the images read a track's samples.
        self._keep_samples = self.faces is not None or self.strangers is not None or self.images
        self._present: dict[str, float] = {}  # label -> monotonic time last seen, while ON
        self._cpu_temp = ha.cpu_temperature() is not None
        self.commands_accepted = 0
        self.commands_refused = 0

    # --- MQTT wiring ---------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Subscribe before the publisher starts (subscriptions are renewed on every connection), and
        republish discovery at every connection (in paho's thread: it only writes to the outbox, where
        retained configs are coalesced)."""
        pub = self.service.publisher
        if self.discovery:
            pub.before_status(self.presence_now)
            pub.on_connect(self.publish_discovery)
            pub.subscribe(ha.ha_status_topic(self.cfg.events.homeassistant_prefix), self._queue)
        if self.commands:
            pub.subscribe(ha.command_topic(self.prefix, self.device_id), self._queue)

    def _queue(self, topic: str, payload: bytes, retain: bool = False) -> None:
        # paho's thread: only queue (or answer "busy"), never run anything here.
        if topic == ha.ha_status_topic(self.cfg.events.homeassistant_prefix):
            # Retained or not (its birth message is usually retained); a flood of `online` is one
            # publication at the next tick, and never takes a command's place in the inbox.
            if payload.strip() == b"online":
                self._ha_online = True
            return
        # At most one byte more than the limit: enough to refuse it as oversized.
        payload = payload[: self.ha.command_max_bytes + 1]
        try:
            self.inbox.put_nowait((topic, payload, retain))
        except queue.Full:
            self._refuse_busy(payload, retain)

    def _refuse_busy(self, payload: bytes, retain: bool) -> None:
        """Answer a command that found the inbox full (paho's thread: parse is bounded and never raises
        anything but CommandError; publish only writes to the thread-safe outbox)."""
        if not payload:
            return
        try:
            cmd = parse(payload, self.ha.command_max_bytes)
            command, request_id = cmd.command, cmd.request_id
        except CommandError as exc:
            command, request_id = exc.command, exc.request_id
        if retain:
            message = "retained command ignored (it was published with the retain flag; it is not run)"
        else:
            message = f"busy: {self.inbox.qsize()} commands waiting, try again"
        with self._busy_lock:
            self._busy += 1
        self.publish(ha.command_result_topic(self.prefix, self.device_id),
                     encode(result_payload(command=command, ok=False, message=message, request_id=request_id)))

    def started(self) -> None:
        """At the daemon's start, before the publisher connects: nobody is present yet as far as this
        process knows. The OFFs written to the outbox replace (coalesce) any ON a previous run left
        undelivered there, which would otherwise reach the broker after `online`: a false arrival.
        `presence_now` puts the same OFFs on the broker ahead of `online` itself."""
        if self.discovery:
            for label in self.service.labels:
                self._publish_presence(label, False)
            self.publish_diagnostics()  # bundle and people right from the start, not a stats interval later
        if not self.images:
            # Face crops retained by a run that had images on would stay on the broker for anyone to read.
            self._clear_images("last_face", "last_unknown")

    def stopping(self) -> None:
        """At a clean stop, before the publisher's `offline`: nobody is reported present by a stopped
        daemon, so its retained ONs must not wait on the broker for the next `online`."""
        if self.discovery:
            for label in list(self._present):
                del self._present[label]
                self._publish_presence(label, False)

    def presence_now(self) -> list[tuple[str, bytes]]:
        """Every person's presence as this process knows it now (ON for those seen, OFF for the rest),
        published by the MQTT layer straight ahead of `online` (and of a clean stop's `offline`): Home
        Assistant sees the device available only once the retained presence is right, so a restart or a
        reconnection never shows an arrival (`unavailable → on → off`) that did not happen. Runs in paho's
        thread: reads a copy of what the frame loop keeps."""
        present = dict(self._present)
        return [(ha.presence_topic(self.prefix, self.device_id, label),
                 (ha.ON if label in present else ha.OFF).encode()) for label in list(self.service.labels)]

    def _clear_images(self, *which: str) -> None:
        # With discovery on, replaced by the placeholder, never emptied: Home Assistant's image entity would
        # take an empty retained message as a picture it cannot serve. Without it no image entity exists,
        # and an empty retained message leaves nothing on the broker.
        payload = ha.placeholder_jpeg() if self.discovery else b""
        for name in which:
            self.publish(ha.image_topic(self.prefix, self.device_id, name), payload, retain=True)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.service.publisher.publish(topic, payload, retain=retain, qos=1)

    # --- discovery --------------------------------------------------------------------------------------------

    def publish_discovery(self) -> None:
        configs = ha.discovery(self.prefix, self.device_id, self.service.labels,
                               discovery_prefix=self.cfg.events.homeassistant_prefix, images=self.images,
                               commands=self.commands, cpu_temp=self._cpu_temp, sw_version=__version__)
        with self._discovery_lock:
            for topic in self.ledger.replace(t for t, _ in configs):
                self.publish(topic, b"", retain=True)  # an empty retained config removes the entity
                log.info("home assistant: removed the entity %s", topic)
            for topic, config in configs:
                self.publish(topic, encode(config), retain=True)

    def reloaded(self) -> None:
        if self.strangers is not None:  # enroll recalibrates the threshold; clusters follow it
            self.strangers.threshold = float(self.service.pipeline.classifier.threshold)
        if self.discovery:
            self.publish_discovery()
            for label in list(self._present):
                if label not in self.service.labels:
                    del self._present[label]
            for label in self.service.labels:
                if label not in self._present:
                    self._publish_presence(label, False)
            self.publish_diagnostics()  # Bundle and People enrolled now, not at the next stats interval

    # --- the frame loop's hooks -----------------------------------------------------------------------------

    def sample(self, frame_image: np.ndarray, rec: Recognition) -> FaceSample:
        region = crop_with_margin(frame_image, rec.face.box) if self.faces is not None else None
        return FaceSample(rec.crop, rec.vector, region)

    def correct(self, rec: Recognition) -> Prediction:
        """The recognition's prediction under the stored corrections (device.contract.accept_with_negatives)."""
        pred = rec.prediction
        if pred.label == UNKNOWN:
            return pred
        label = accept_with_negatives(pred.label, pred.score, self.service.pipeline.classifier.threshold,
                                      rec.vector, self.negatives.for_label(pred.label), self.mem.negative_margin)
        return pred if label == pred.label else Prediction(UNKNOWN, pred.score, pred.best)

    def collect(self, tracks: list[Any], frame_index: int) -> None:
        """Keep the last few samples of every track seen in this frame; mark people present."""
        live = {t.track_id for t in tracks}
        for track_id in [t for t in self._samples if t not in live]:
            del self._samples[track_id]
        now = time.monotonic()
        for track in tracks:
            if track.last_frame != frame_index or not isinstance(track.last_extra, FaceSample):
                continue
            if self._keep_samples:
                self._samples.setdefault(track.track_id, deque(maxlen=self.mem.crops_per_face)).append(
                    track.last_extra)
            if self.discovery and track.label not in (None, UNKNOWN):
                if track.label not in self._present:
                    self._publish_presence(track.label, True)
                self._present[track.label] = now

    def tick(self) -> None:
        """Presence timeouts and queued messages; called every loop turn, frames or not."""
        if self._present:
            now = time.monotonic()
            for label in [lab for lab, at in self._present.items() if now - at > self.ha.presence_timeout]:
                del self._present[label]
                self._publish_presence(label, False)
        while True:
            try:
                topic, payload, retain = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(topic, payload, retain)
        if self._ha_online:
            self._ha_online = False
            log.info("home assistant is online: publishing discovery again")
            self.publish_discovery()
        if self._busy:
            with self._busy_lock:
                busy, self._busy = self._busy, 0
            self.commands_refused += busy
            log.warning("refused %d commands as busy: more than %d arrived between two frames (each was answered)",
                        busy, INBOX_SIZE)

    def _publish_presence(self, label: str, on: bool) -> None:
        self.publish(ha.presence_topic(self.prefix, self.device_id, label), ha.ON if on else ha.OFF, retain=True)

    def annotate(self, event: dict[str, Any], decision: Decision) -> None:
        """Stranger fields for an unknown event (before it is published)."""
        if self.strangers is None or event["label"] != UNKNOWN:
            return
        vector = self._track_vector(decision)
        if vector is None:
            return
        cluster, new = self.strangers.observe(vector)
        event.update(stranger_id=cluster.stranger_id, stranger_count=cluster.count,
                     stranger_first_seen=iso_utc(cluster.first_seen), stranger_new=new)

    def _track_vector(self, decision: Decision) -> np.ndarray | None:
        vectors = [s.vector for s in self._samples.get(decision.track_id, ()) if s.vector is not None]
        if not vectors and isinstance(decision.extra, FaceSample) and decision.extra.vector is not None:
            vectors = [decision.extra.vector]
        return np.mean(np.stack(vectors), axis=0) if vectors else None

    def emitted(self, event: dict[str, Any], decision: Decision) -> None:
        """After an event was published: remember the face, publish its image."""
        samples = list(self._samples.get(decision.track_id, ()))
        if not samples and isinstance(decision.extra, FaceSample):
            samples = [decision.extra]
        if self.faces is not None:
            regions = [s.region for s in samples if s.region is not None]
            vectors = [s.vector for s in samples if s.vector is not None]
            if regions and vectors:
                self.faces.add(event_id=event["event_id"], label=event["label"], score=event["score"],
                               track_id=event["track_id"], bundle_id=event["model"], crops=regions,
                               embeddings=np.stack(vectors), stranger_id=event.get("stranger_id"))
        if self.images and samples:
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(samples[-1].region if samples[-1].region is not None
                                                         else samples[-1].crop, cv2.COLOR_RGB2BGR))
            if ok:
                self.publish(ha.image_topic(self.prefix, self.device_id, "last_face"), jpeg.tobytes(), retain=True)
                if event["label"] == UNKNOWN:
                    self.publish(ha.image_topic(self.prefix, self.device_id, "last_unknown"), jpeg.tobytes(),
                                 retain=True)

    def diagnostics(self, stats: dict[str, Any]) -> None:
        if not self.discovery or self.service._stopped:  # the last stats line comes after the outbox closed
            return
        payload = ha.diagnostics_payload(
            fps=self.service.fps if stats["frames"] else None, ms_per_frame=stats["ms_per_frame"],
            ms_per_face=stats.get("ms_per_face", {}), dropped_frames=stats["dropped"],
            outbox_pending=stats["mqtt"]["pending"], outbox_lost=stats["mqtt"].get("lost", 0),
            bundle_id=self.service.bundle_id,
            people=len(self.service.labels), cpu_temp=ha.cpu_temperature() if self._cpu_temp else None)
        self.publish(ha.diagnostics_topic(self.prefix, self.device_id), encode(payload), retain=True)

    def publish_diagnostics(self) -> None:
        """The diagnostics now, outside the stats interval (at start, after a reload)."""
        if self.discovery:
            self.diagnostics(self.service.stats())

    def stats(self) -> dict[str, Any] | None:
        """What is remembered and how commands went, for the stats and the status file (None: nothing on)."""
        if not (self.commands or self.faces or self.strangers or len(self.negatives)):
            return None
        return {"faces": len(self.faces) if self.faces is not None else 0,
                "strangers": len(self.strangers) if self.strangers is not None else 0,
                "corrections": len(self.negatives), "commands_accepted": self.commands_accepted,
                "commands_refused": self.commands_refused}

    # --- commands ---------------------------------------------------------------------------------------------

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
                cmd = parse(payload, self.ha.command_max_bytes)
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
        self.publish(topic, b"", retain=True)

    def _answer(self, command: str | None, ok: bool, message: str, request_id: str | None, **extra: Any) -> None:
        if ok:
            self.commands_accepted += 1
            log.info("command %s accepted: %s", command, safe_text(message, 400))
        else:
            self.commands_refused += 1
            log.warning("command %s refused: %s", command or "(unreadable)", safe_text(message, 400))
        payload = result_payload(command=command, ok=ok, message=message, request_id=request_id, **extra)
        self.publish(ha.command_result_topic(self.prefix, self.device_id), encode(payload))

    def _run(self, cmd: Any) -> tuple[bool, str, dict[str, Any]]:
        if self.faces is None and not isinstance(cmd, Undo | Forget):
            return False, "no faces are remembered (state_dir is not writable)", {}
        if isinstance(cmd, NameLastUnknown):
            if cmd.event_id:  # the face the user saw (Home Assistant sends its event id), not the newest
                face = self.faces.get(cmd.event_id)
                if face is None:
                    return False, (f"event {cmd.event_id} is not among the stored faces (already named, forgotten "
                                   "or older than memory.max_age)"), {}
                if face.label != UNKNOWN:
                    return False, (f"event {cmd.event_id} was recognised as {face.label}, not unknown; if that was "
                                   "wrong, send \"wrong\" with its event_id"), {}
                return self._enroll(cmd.name, [face])
            face = self.faces.last(label=UNKNOWN)
            if face is None:
                return False, "no unknown face is stored (none seen within memory.max_age)", {}
            return self._enroll(cmd.name, [face])
        if isinstance(cmd, NameStranger):
            faces = self.faces.of_stranger(cmd.stranger_id)
            if not faces:
                return False, f"no stored faces of stranger {cmd.stranger_id}", {}
            return self._enroll(cmd.name, faces, cmd.stranger_id)
        if isinstance(cmd, Wrong):
            face = self.faces.get(cmd.event_id) if cmd.event_id else self.faces.last(exclude=UNKNOWN)
            if face is None:
                return False, (f"event {cmd.event_id} is not among the stored faces" if cmd.event_id
                               else "no recognised face is stored"), {}
            label = cmd.not_ or face.label
            if label == UNKNOWN:
                return False, "that face was already unknown; say which person it was not with \"not\"", {}
            correction = self.negatives.add(label, face.embeddings(), face.event_id)
            return True, f"stored event {face.event_id} as not {label}", {"correction_id": correction,
                                                                          "event_id": face.event_id, "not": label}
        if isinstance(cmd, Undo):
            rec = self.negatives.undo()
            if rec is None:
                return False, "no correction to undo", {}
            return True, f"undid correction {rec['id']} (not {rec['label']})", {"correction_id": rec["id"]}
        if isinstance(cmd, Forget):
            faces = self.faces.forget(cmd.stranger_id) if self.faces is not None else 0
            strangers = self.strangers.forget(cmd.stranger_id) if self.strangers is not None else 0
            what = f"stranger {cmd.stranger_id}" if cmd.stranger_id else "all stored faces and strangers"
            # The retained pictures are stored faces too: the last unknown may be this stranger.
            self._clear_images(*(("last_unknown",) if cmd.stranger_id else ("last_face", "last_unknown")))
            return True, f"forgot {what}: {faces} faces, {strangers} clusters", {"faces": faces,
                                                                                   "strangers": strangers}
        return False, f"unhandled command {cmd.command}", {}

    def _enroll(self, name: str, faces: list[Any], stranger_id: str | None = None) -> tuple[bool, str, dict[str, Any]]:
        import shutil
        import tempfile

        from device.bundle import BundleError
        from device.enroll import EnrollError, enroll
        from device.runtime import ModelError

        with tempfile.TemporaryDirectory(prefix="enroll-", dir=self.state) as tmp:
            for i, face in enumerate(faces):
                for j, crop in enumerate(face.crops):
                    shutil.copy(crop, Path(tmp) / f"{i:03d}_{j:02d}.jpg")
            try:
                summary = enroll(Path(self.cfg.bundle), name, Path(tmp), min_photos=1,
                                 min_face_size=self.cfg.detection.min_face_size,
                                 num_threads=self.cfg.recognition.num_threads)
            except (EnrollError, BundleError, ModelError) as exc:
                return False, f"not enrolled: {exc}", {}
        result = self.service.reload()
        if not result.ok:
            return False, f"enrolled {name} but the new bundle was refused: {result.error}", {}
        for face in faces:
            self.faces.remove(face.event_id)
        if stranger_id and self.strangers is not None:
            self.strangers.forget(stranger_id)
        extra = {"name": name, "bundle_id": result.bundle_id, "photos": summary.get("photos")}
        rival = summary.get("nearest_other")
        message = f"enrolled {name} from {summary.get('photos')} crop(s); serving bundle {result.bundle_id}"
        if rival and rival[1] >= summary.get("threshold", 1.0):
            message += f" (warning: also scores {rival[1]:.3f} against {rival[0]}: they may be confused)"
        return True, message, extra
