"""`python -m device run`: the daemon. camera → FacePipeline → tracker → events → MQTT.

This module is the frame loop; the broker connection and its durable outbox are device/mqtt.py and
device/outbox.py. Every message goes through `MqttPublisher.publish()`, which stores it on disk first.

Reload without restart: SIGHUP (`systemctl reload faceberry`) or `Service.request_reload()` asks the
frame loop to load the bundle `cfg.bundle` points to (on the Pi the `current` link of the versions
store) between two frames; the MQTT session, the camera and the outbox stay. A bundle that fails its
checks is refused and the old one keeps serving; either way the retained `<prefix>/<device_id>/bundle`
topic and one log line say what happened. systemd's notify protocol (device/notify.py) is spoken
throughout: READY=1, WATCHDOG=1 from the frame loop, STATUS=, RELOADING=1, STOPPING=1.

Runs until the camera stream ends (files and folders), a fatal camera error, a dead MQTT client, a broker
that keeps refusing our credentials or certificates, or SIGTERM/SIGINT; in every case capture stops, what
the broker can take is delivered, `offline` is published, and whatever is left stays in the outbox for the
next start. A live camera that drops out, or is not there at start, is reopened by the capture thread
(device/camera.py) for up to camera.max_outage_s; the loop just waits.
Exit codes (via the CLI; device/errors.py): 0 at the end of a file or folder or on a signal; 3 on a camera
error (a missing file or folder, a live camera out longer than camera.max_outage_s); 2 for what restarting
cannot fix, so the unit does not loop on it: the config, a bundle absent, damaged or with nobody enrolled,
a camera library not installed (camera.CameraSetupError), the broker refusing us for mqtt.fatal_after_s;
1 when the MQTT client died.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.assistant import Assistant, FaceSample
from device.bundle import Bundle, load_bundle
from device.camera import Capture, Frame, open_source
from device.classifier import UNKNOWN
from device.config import DEFAULT_STATE_DIR, Config, add_config_argument, describe, load_config
from device.events import (
    Cooldown,
    bundle_status_payload,
    bundle_topic,
    encode,
    event_payload,
    events_topic,
    iso_utc,
    person_state_payload,
    person_topic,
    snapshot_topic,
)
from device.mqtt import MqttError, MqttPublisher
from device.notify import Notifier
from device.outbox import Outbox, OutboxError, StateDirError, default_state_dir
from device.pipeline import FacePipeline
from device.statefile import write_atomic
from device.tracker import Decision, Observation, Tracker

log = logging.getLogger(__name__)

# Pipeline stages that run once per face found (detect runs once per frame).
PER_FACE_STAGES = ("align", "classify")

# Seconds between two refreshes of a person's retained last-seen state while they stay in view, at least.
STATE_REFRESH_MIN_S = 1.0
# Seconds between two writes of the status file `faceberry status` reads, from the start on: it says the
# frames, fps and MQTT state of now, not of the last stats interval (60 s). One write is a stats() dict and
# a ~2 KB JSON file replaced atomically, well under a millisecond; 17,280 small writes a day are few for
# an SD card beside the outbox's.
STATUS_WRITE_S = 5.0

HELP = "run the daemon: watch the camera and publish who it sees over MQTT"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def state_dir(cfg: Config) -> Path:
    """The directory for the outbox: `state_dir` from the config.

    The default (/var/lib/faceberry, created by the systemd unit's StateDirectory=) is not writable for
    a user trying the daemon from a shell; then $STATE_DIRECTORY or ~/.local/state/faceberry is used,
    with a warning naming it. A state_dir set explicitly and not writable is an error: silently putting
    the events somewhere else would hide them from whoever looks in the configured place.
    """
    configured = Path(getattr(cfg, "state_dir", DEFAULT_STATE_DIR))
    if _writable_dir(configured):
        return configured
    if configured == DEFAULT_STATE_DIR:
        fallback = default_state_dir()
        if _writable_dir(fallback):
            log.warning("state_dir %s is not writable (not started by the systemd unit?): the outbox is kept in "
                        "%s instead; set state_dir to choose", configured, fallback)
            return fallback
    raise StateDirError(f"state_dir {configured} is not writable by this user; create it for the service user "
                      "(the systemd unit's StateDirectory= does) or set state_dir to a writable directory")


def open_outbox(cfg: Config) -> Outbox:
    settings = getattr(cfg.mqtt, "outbox", None)
    # One file per device_id: two configs sharing a state_dir must not replay each other's messages.
    return Outbox(state_dir(cfg) / f"outbox-{cfg.device_id}.sqlite3",
                  max_messages=getattr(settings, "max_messages", 10_000),
                  max_bytes=getattr(settings, "max_bytes", 50_000_000),
                  sync=getattr(settings, "sync", "normal"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--max-frames", type=int, default=0, metavar="N",
        help="stop after processing N frames (0 = run until the stream ends or a signal; for testing)",
    )


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did: `ok` (the bundle at `path` serves now) or refused with `error`."""

    ok: bool
    bundle_id: str  # the bundle serving after the reload (the old one when refused)
    path: str  # the bundle directory that was tried (cfg.bundle with its links resolved)
    error: str | None = None
    at: float = 0.0  # Unix time


class Service:
    def __init__(self, cfg: Config, publisher: MqttPublisher | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.notifier = notifier or Notifier()
        self.bundle_path, bundle, self.pipeline = self._load_bundle()
        self.bundle_id = bundle.bundle_id
        self.labels = [lab for lab in bundle.labels if lab != UNKNOWN]
        # Reload requests: a counter (so a caller can wait for the reload that follows its request) and
        # an Event the frame loop polls. RLock: the SIGHUP handler runs in the main thread, which may
        # hold the lock at that moment.
        self._reload_cond = threading.Condition(threading.RLock())
        self._reload_wanted = threading.Event()
        self._reload_requests = 0
        self._reloads_done = 0
        self.last_reload: ReloadResult | None = None
        self.reloads = 0
        self.reloads_refused = 0
        self.tracker = Tracker(cfg.tracking.iou, cfg.tracking.votes_needed, cfg.tracking.max_age)
        self.cooldown = Cooldown(cfg.events.cooldown)
        # Presence: while a decided person stays in view, their retained last-seen state is refreshed,
        # but no more often than the event cooldown, and never per frame (cooldown 0 made it 30 retained
        # writes a second to the outbox on a Pi's SD card, measured on a video).
        self.state_refresh = Cooldown(max(cfg.events.cooldown, STATE_REFRESH_MIN_S))
        self.prefix = cfg.events.topic_prefix
        self.capture = Capture(open_source(cfg.camera), cfg.camera.queue_size, fps=cfg.camera.fps,
                               reopen_max_s=float(getattr(cfg.camera, "reopen_max_s", 30.0)),
                               max_outage_s=float(getattr(cfg.camera, "max_outage_s", 0.0)))
        if publisher is None:
            try:
                outbox = open_outbox(cfg)
            except OutboxError as exc:
                raise MqttError(str(exc)) from exc
            publisher = MqttPublisher(cfg.mqtt, cfg.device_id, self.prefix, cfg.mqtt_password, outbox=outbox,
                                      summary_interval=cfg.stats_interval)
        self.publisher = publisher
        try:
            memory_dir: Path | None = state_dir(cfg)
        except OutboxError as exc:
            log.warning("nothing is remembered across restarts (faces, strangers, corrections): %s", exc)
            memory_dir = None
        # Home Assistant: discovery, presence, diagnostics, images, remembered faces, commands.
        self.assistant = Assistant(self, memory_dir)
        self.assistant.attach()
        self.frames = 0
        self.faces = 0
        self.events = 0
        self.stage_ms: dict[str, float] = defaultdict(float)
        self.face_stage_ms: dict[str, float] = defaultdict(float)  # align and classify: they run per face
        self._last_event: dict[str, dict[str, Any]] = {}  # per label, for presence refreshes
        self._fps_frames = 0
        self._fps_since = time.monotonic()
        self._ready_sent = False
        self._status_path: Path | bool | None = False  # False: not looked up yet
        self._status_warned = False
        self._stopped = False  # the last status file of a run says so
        self._status_at = 0.0  # time.monotonic() of the last status write of the frame loop

    # --- the bundle, and reloading it (SIGHUP / request_reload) -------------------------------------------

    def _load_bundle(self) -> tuple[str, Bundle, FacePipeline]:
        """Resolve cfg.bundle (the `current` link of a versions store) and load it; raises on any problem.

        The link is resolved once, here: the pipeline then reads the version it was built from even
        if `current` is switched meanwhile.
        """
        path = os.path.realpath(self.cfg.bundle)
        bundle = load_bundle(path)  # verifies the manifest, every checksum and every range
        pipeline = FacePipeline(
            bundle,
            num_threads=self.cfg.recognition.num_threads,
            min_face_size=self.cfg.detection.min_face_size,
            score_threshold=self.cfg.detection.score_threshold,
        )
        if self.cfg.recognition.threshold is not None:
            pipeline.classifier.threshold = self.cfg.recognition.threshold
        return path, bundle, pipeline

    def request_reload(self) -> int:
        """Ask the frame loop to reload the bundle between two frames; safe from any thread or a signal.

        Returns a ticket for `wait_reload`. Requests made before the loop gets to them are served by one
        reload (it loads whatever `current` points to then).
        """
        with self._reload_cond:
            self._reload_requests += 1
            ticket = self._reload_requests
        self._reload_wanted.set()
        return ticket

    def wait_reload(self, ticket: int, timeout: float | None = None) -> ReloadResult | None:
        """The result of the reload that served `ticket` (or a later one); None if not done in time."""
        with self._reload_cond:
            if not self._reload_cond.wait_for(lambda: self._reloads_done >= ticket, timeout):
                return None
            return self.last_reload

    def _reload_if_requested(self) -> ReloadResult | None:
        if not self._reload_wanted.is_set():
            return None
        self._reload_wanted.clear()
        with self._reload_cond:
            serving = self._reload_requests
        result = self.reload()
        with self._reload_cond:
            self._reloads_done = max(self._reloads_done, serving)
            self._reload_cond.notify_all()
        return result

    def reload(self) -> ReloadResult:
        """Load the bundle cfg.bundle points to now and swap it in; on any failure keep the old one.

        Runs in the frame loop (between frames), so the pipeline is never swapped under a frame. The
        MQTT session, camera and outbox are untouched. Returns what happened; the retained bundle topic,
        the log, systemd's STATUS and the status file say it too.
        """
        self.notifier.reloading()
        old = self.bundle_id
        wanted = os.path.realpath(self.cfg.bundle)
        try:
            path, bundle, pipeline = self._load_bundle()
        except Exception as exc:  # a reload must never take down a daemon that is serving
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, OSError) and type(exc).__module__.split(".")[0] != "device":
                reason = f"{type(exc).__name__}: {reason}"
            result = ReloadResult(False, old, wanted, reason, time.time())
            self.reloads_refused += 1
            log.error("reload refused: the bundle %s cannot be used (%s); still serving %s. Fix that bundle, or "
                      "point %s back to a good version, then reload again", wanted, reason, old, self.cfg.bundle)
        else:
            self.pipeline = pipeline
            self.bundle_path = path
            self.bundle_id = bundle.bundle_id
            self.labels = [lab for lab in bundle.labels if lab != UNKNOWN]
            # Votes cast under the old model do not count for the new one (track ids keep counting up).
            self.tracker.tracks.clear()
            # Presence refreshes repeat the last event: keep people the new bundle still knows.
            self._last_event = {label: {**event, "model": self.bundle_id} for label, event in self._last_event.items()
                                if label in self.labels or label == UNKNOWN}
            self.assistant.reloaded()  # the people may have changed
            result = ReloadResult(True, self.bundle_id, path, None, time.time())
            self.reloads += 1
            log.info("reloaded: bundle %s (was %s) from %s, %d people", self.bundle_id, old, path, len(self.labels))
        self.last_reload = result
        self.publish_bundle_status(result)
        self.write_status()
        if self._ready_sent:
            self.notifier.ready(self.status_text())  # ends RELOADING=1
        else:
            self.notifier.status(self.status_text())  # READY=1 still waits for the first frame
        return result

    def publish_bundle_status(self, result: ReloadResult) -> None:
        payload = bundle_status_payload(bundle_id=result.bundle_id, state="loaded" if result.ok else "refused",
                                        error=result.error, path=result.path, at=result.at)
        self.publisher.publish(bundle_topic(self.prefix, self.cfg.device_id), encode(payload), retain=True, qos=1)

    # --- systemd: readiness, watchdog, status ----------------------------------------------------------------

    def status_text(self) -> str:
        """One line for systemd's STATUS= (`systemctl status faceberry`)."""
        camera = "out" if self.capture.out_now else "ok"
        mqtt = self.publisher.state.split(":")[0]
        return f"{self.fps:.1f} fps, bundle {self.bundle_id}, camera {camera}, mqtt {mqtt}"

    @property
    def fps(self) -> float:
        """Frames processed per second over the last stats interval (since start before the first)."""
        elapsed = time.monotonic() - self._fps_since
        return (self.frames - self._fps_frames) / elapsed if elapsed > 0 else 0.0

    def request_stop(self, *_: Any) -> None:
        self.stop_event.set()

    def run(self, max_frames: int = 0) -> int:
        log.info("starting: %s, model %s", describe(self.cfg), self.bundle_id)
        try:
            # A missing file or folder fails here, before we announce ourselves; a live camera that is
            # not there yet is waited for in the background (an outage from the start).
            self.capture.start()
        except BaseException:
            self.publisher.outbox.close()
            raise
        # Before the connection: the presence OFFs must be in the outbox (replacing any ON a previous run
        # left there) before anything is handed to the broker after `online`.
        self.assistant.started()
        self.publisher.start()
        self.publish_bundle_status(ReloadResult(True, self.bundle_id, self.bundle_path, None, time.time()))
        # fps counts from here, not from before the models loaded.
        self._fps_frames, self._fps_since = self.frames, time.monotonic()
        self._write_status_every(0.0)
        last_stats = time.monotonic()
        try:
            while not self.stop_event.is_set():
                # The loop itself pings: a pipeline call that hangs stops the pings, and systemd restarts us.
                self.notifier.watchdog()
                fatal = self.publisher.fatal_error()
                if fatal is not None:
                    raise fatal
                self._reload_if_requested()
                self.assistant.tick()
                try:
                    frame = self.capture.get(timeout=0.5)
                except TimeoutError:
                    if not self._ready_sent and self.capture.out_now:
                        # A camera absent at start is waited for here for camera.max_outage_s; holding
                        # READY=1 back that long would make systemd kill us at TimeoutStartSec and loop.
                        # Up and supervising is what "started" means; STATUS= says the camera is out.
                        self._ready_sent = True
                        self.notifier.ready(self.status_text())
                    # No frame (a camera outage being recovered): statistics still come on time.
                    if time.monotonic() - last_stats >= self.cfg.stats_interval:
                        self.log_stats()
                        last_stats = time.monotonic()
                    self._write_status_every(STATUS_WRITE_S)
                    continue
                if frame is None:
                    log.info("end of the camera stream")
                    break
                self.handle_frame(frame)
                if not self._ready_sent:
                    # Models loaded and the camera delivers: only now is the service up for systemd.
                    self._ready_sent = True
                    self.notifier.ready(self.status_text())
                    self._write_status_every(0.0)  # the first frame: `faceberry status` shows it at once
                if max_frames and self.frames >= max_frames:
                    break
                if time.monotonic() - last_stats >= self.cfg.stats_interval:
                    self.log_stats()
                    last_stats = time.monotonic()
                self._write_status_every(STATUS_WRITE_S)
        finally:
            self.notifier.stopping()
            self.capture.stop()
            self.assistant.stopping()  # presence OFF before the publisher's `offline`
            self.publisher.stop(timeout=5.0)
            self._stopped = True
            self.log_stats()
            self.notifier.close()
        return 0

    def handle_frame(self, frame: Frame) -> None:
        result = self.pipeline.process(frame.image, self.tracker, self.cfg.recognition.reverify_every)
        t0 = time.perf_counter()
        self.frames += 1
        self.faces += len(result.recognitions)
        for stage, ms in result.timings_ms.items():
            self.stage_ms[stage] += ms
            if stage in PER_FACE_STAGES and result.recognitions:
                self.face_stage_ms[stage] += ms
        observations = []
        for r in result.recognitions:
            prediction = self.assistant.correct(r)  # stored corrections ("wrong, not X") apply here
            observations.append(Observation(r.face.box, prediction.label, prediction.score,
                                            extra=self.assistant.sample(frame.image, r)))
        decisions = self.tracker.update(observations, frame.index)
        self.assistant.collect(self.tracker.active(), frame.index)
        for decision in decisions:
            self.emit(decision, frame)
        self.refresh_presence(frame)
        self.stage_ms["track+publish"] += (time.perf_counter() - t0) * 1e3

    def emit(self, decision: Decision, frame: Frame) -> None:
        label = decision.label
        if label == UNKNOWN and not self.cfg.events.unknown:
            return
        if not self.cooldown.fire(label):
            log.debug("track %d: %s within its cooldown, no event", decision.track_id, label)
            return
        h, w = frame.image.shape[:2]
        # Faces at the edge get boxes reaching past it; subscribers want pixels inside the frame.
        bbox = np.clip(decision.box, 0, [w, h, w, h])
        event = event_payload(
            device_id=self.cfg.device_id, camera=self.cfg.camera.name, label=label, score=decision.score,
            bbox=bbox, track_id=decision.track_id, frames=decision.frames, model=self.bundle_id,
            timestamp=frame.timestamp, previous=decision.previous, source=frame.origin,
        )
        self.assistant.annotate(event, decision)
        self.publisher.publish(events_topic(self.prefix, self.cfg.device_id), encode(event))
        self.publisher.publish(person_topic(self.prefix, self.cfg.device_id, label),
                               encode(person_state_payload(event)), retain=True)
        self.state_refresh.fire(label)
        self._last_event[label] = event
        self.events += 1
        log.info("event: %s (score %.2f, track %d, %d frames%s)", label, decision.score, decision.track_id,
                 decision.frames, f", was {decision.previous}" if decision.previous else "")
        self.assistant.emitted(event, decision)
        if self.cfg.events.snapshots and isinstance(decision.extra, FaceSample):
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(decision.extra.crop, cv2.COLOR_RGB2BGR))
            if ok:
                self.publisher.publish(snapshot_topic(self.prefix, self.cfg.device_id, label), jpeg.tobytes())

    def refresh_presence(self, frame: Frame) -> None:
        """Keep the retained last-seen state of people in view fresh (at most once per cooldown).

        Covers people whose new track fell within the cooldown: no event, but they are still present.
        """
        for track in self.tracker.active():
            if track.label is None or track.last_frame != frame.index:
                continue
            event = self._last_event.get(track.label)
            if event is None or not self.state_refresh.fire(track.label):
                continue
            state = person_state_payload({**event, "timestamp": iso_utc(frame.timestamp),
                                          "score": round(track.score, 4)})
            self.publisher.publish(person_topic(self.prefix, self.cfg.device_id, track.label), encode(state),
                                   retain=True)

    def stats(self) -> dict[str, Any]:
        n = max(self.frames, 1)
        camera: dict[str, Any] = {"state": "out" if self.capture.out_now else "ok",
                                  "outages": self.capture.outages, "outage_s": round(self.capture.outage_s, 1)}
        if self.capture.out_now:
            camera["reason"] = self.capture.outage_reason
        memory = self.assistant.stats()
        return {
            **({"memory": memory} if memory is not None else {}),
            "frames": self.frames, "captured": self.capture.captured, "dropped": self.capture.dropped,
            "skipped_images": len(self.capture.skipped), "faces": self.faces, "events": self.events,
            "suppressed": self.cooldown.suppressed, "tracks": len(self.tracker.tracks),
            "camera": camera, "mqtt": self.publisher.stats(),
            "bundle": {"id": self.bundle_id, "reloads": self.reloads, "refused": self.reloads_refused},
            "ms_per_frame": {k: round(v / n, 2) for k, v in self.stage_ms.items()},
            # Per face found: a frame without a face spends ~0 ms there, and its mean would hide the cost.
            "ms_per_face": ({k: round(v / self.faces, 2) for k, v in self.face_stage_ms.items()} if self.faces
                            else {}),
        }

    # --- the status file `faceberry status` reads ------------------------------------------------------------

    def status_file(self) -> Path | None:
        """<state_dir>/status-<device_id>.json, or None when no state directory is writable."""
        if self._status_path is False:
            try:
                self._status_path = state_dir(self.cfg) / f"status-{self.cfg.device_id}.json"
            except OutboxError as exc:
                log.warning("no status file for `faceberry status`: %s", exc)
                self._status_path = None
        return self._status_path

    def write_status(self) -> Path | None:
        """Write the stats, bundle, pid and MQTT state atomically (tmp + rename): a reader never sees half."""
        path = self.status_file()
        if path is None:
            return None
        s = self.stats()
        data = {**s, "bundle_id": self.bundle_id, "bundle_path": self.bundle_path, "pid": os.getpid(),
                "device_id": self.cfg.device_id, "updated_at": iso_utc(time.time()),
                "mqtt_state": s["mqtt"]["state"], "fps": round(self.fps, 2), "status": self.status_text(),
                "running": not self._stopped}
        if self.last_reload is not None:
            r = self.last_reload
            data["last_reload"] = {"ok": r.ok, "bundle_id": r.bundle_id, "path": r.path, "error": r.error,
                                   "at": iso_utc(r.at)}
        try:
            # On a full disk it is overwritten in place: the loss it counts must show while the disk is full.
            write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", overwrite_if_full=True)
        except OSError as exc:
            if not self._status_warned:
                log.warning("cannot write the status file %s: %s; check the free space and state_dir", path, exc)
                self._status_warned = True
            return None
        return path

    def _write_status_every(self, seconds: float) -> None:
        """Write the status file if the last write of the frame loop is `seconds` old (0: now)."""
        now = time.monotonic()
        if now - self._status_at >= seconds:
            self._status_at = now
            self.write_status()

    def log_stats(self) -> None:
        s = self.stats()
        self.notifier.status(self.status_text())
        self.assistant.diagnostics(s)
        self.write_status()
        self._fps_frames, self._fps_since = self.frames, time.monotonic()
        stages = " ".join(f"{k} {v:.1f}" for k, v in s["ms_per_frame"].items())
        camera = s["camera"]
        camera_text = f"camera {camera['state']} outages={camera['outages']} outage_s={camera['outage_s']}"
        if "reason" in camera:
            camera_text += f" ({camera['reason']})"
        mqtt = dict(s["mqtt"])
        error = mqtt.pop("error", None)
        mqtt_text = " ".join(f"{k}={v}" for k, v in mqtt.items()) + (f" ({error})" if error else "")
        log.info(
            "stats: %d frames (%d captured, %d dropped, %d unreadable skipped), %d faces, %d events "
            "(%d in cooldown), %s, mqtt %s; ms/frame: %s",
            s["frames"], s["captured"], s["dropped"], s["skipped_images"], s["faces"], s["events"],
            s["suppressed"], camera_text, mqtt_text, stages or "-",
        )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    service = Service(cfg)
    previous = {sig: signal.signal(sig, service.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    # systemctl reload faceberry (ExecReload=/bin/kill -HUP $MAINPID): load the bundle `current` points to.
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
    try:
        return service.run(max_frames=args.max_frames)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
