"""`python -m device run`: the daemon. camera → FacePipeline → tracker → events → MQTT.

This module is the frame loop; the broker connection and its durable outbox are device/mqtt.py and
device/outbox.py. Every message goes through `MqttPublisher.publish()`, which stores it on disk first.

Runs until the camera stream ends (files and folders), a fatal camera error, a dead MQTT client, or
SIGTERM/SIGINT; in every case capture stops, what the broker can take is delivered, `offline` is
published, and whatever is left stays in the outbox for the next start. A live camera that drops out is
reopened by the capture thread (device/camera.py) for as long as it takes; the loop just waits.
Exit codes: 0 at the end of a file or folder or on a signal; 1 (via the CLI) on a camera or MQTT error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.bundle import load_bundle
from device.camera import Capture, Frame, open_source
from device.classifier import UNKNOWN
from device.config import Config, add_config_argument, describe, load_config
from device.events import (
    Cooldown,
    encode,
    event_payload,
    events_topic,
    ha_discovery,
    iso_utc,
    person_state_payload,
    person_topic,
    snapshot_topic,
)
from device.mqtt import MqttError, MqttPublisher
from device.outbox import Outbox, OutboxError, default_state_dir
from device.pipeline import FacePipeline
from device.tracker import Decision, Observation, Tracker

log = logging.getLogger(__name__)

HELP = "run the daemon: watch the camera and publish who it sees over MQTT"

DEFAULT_STATE_DIR = Path("/var/lib/faceberry")


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
    raise OutboxError(f"state_dir {configured} is not writable by this user; create it for the service user "
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


class Service:
    def __init__(self, cfg: Config, publisher: MqttPublisher | None = None) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        bundle = load_bundle(cfg.bundle)
        self.bundle_id = bundle.bundle_id
        self.pipeline = FacePipeline(
            bundle,
            num_threads=cfg.recognition.num_threads,
            min_face_size=cfg.detection.min_face_size,
            score_threshold=cfg.detection.score_threshold,
        )
        if cfg.recognition.threshold is not None:
            self.pipeline.classifier.threshold = cfg.recognition.threshold
        self.labels = [lab for lab in bundle.labels if lab != UNKNOWN]
        self.tracker = Tracker(cfg.tracking.iou, cfg.tracking.votes_needed, cfg.tracking.max_age)
        self.cooldown = Cooldown(cfg.events.cooldown)
        # Presence: while a decided person stays in view, their retained last-seen state is refreshed,
        # but no more often than the event cooldown.
        self.state_refresh = Cooldown(cfg.events.cooldown)
        self.prefix = cfg.events.topic_prefix
        self.capture = Capture(open_source(cfg.camera), cfg.camera.queue_size, fps=cfg.camera.fps,
                               reopen_max_s=float(getattr(cfg.camera, "reopen_max_s", 30.0)))
        if publisher is None:
            try:
                outbox = open_outbox(cfg)
            except OutboxError as exc:
                raise MqttError(str(exc)) from exc
            publisher = MqttPublisher(cfg.mqtt, cfg.device_id, self.prefix, cfg.mqtt_password, outbox=outbox,
                                      summary_interval=cfg.stats_interval)
        self.publisher = publisher
        if cfg.events.homeassistant:
            self.publisher.on_connect(self._publish_discovery)
        self.frames = 0
        self.faces = 0
        self.events = 0
        self.stage_ms: dict[str, float] = defaultdict(float)
        self._last_event: dict[str, dict[str, Any]] = {}  # per label, for presence refreshes

    def _publish_discovery(self) -> None:
        for topic, config in ha_discovery(self.prefix, self.cfg.device_id, self.labels,
                                          self.cfg.events.homeassistant_prefix):
            # Retained and coalesced in the outbox: republished on every connect, stored once.
            self.publisher.publish(topic, encode(config), retain=True, qos=1)

    def request_stop(self, *_: Any) -> None:
        self.stop_event.set()

    def run(self, max_frames: int = 0) -> int:
        log.info("starting: %s, model %s", describe(self.cfg), self.bundle_id)
        try:
            self.capture.start()  # an unreachable camera fails here, before we announce ourselves
        except BaseException:
            self.publisher.outbox.close()
            raise
        self.publisher.start()
        last_stats = time.monotonic()
        try:
            while not self.stop_event.is_set():
                fatal = self.publisher.fatal
                if fatal is not None:
                    raise MqttError(f"{fatal}; restart the daemon (the outbox keeps the undelivered events)")
                try:
                    frame = self.capture.get(timeout=0.5)
                except TimeoutError:
                    # No frame (a camera outage being recovered): statistics still come on time.
                    if time.monotonic() - last_stats >= self.cfg.stats_interval:
                        self.log_stats()
                        last_stats = time.monotonic()
                    continue
                if frame is None:
                    log.info("end of the camera stream")
                    break
                self.handle_frame(frame)
                if max_frames and self.frames >= max_frames:
                    break
                if time.monotonic() - last_stats >= self.cfg.stats_interval:
                    self.log_stats()
                    last_stats = time.monotonic()
        finally:
            self.capture.stop()
            self.publisher.stop(timeout=5.0)
            self.log_stats()
        return 0

    def handle_frame(self, frame: Frame) -> None:
        result = self.pipeline.process(frame.image)
        t0 = time.perf_counter()
        self.frames += 1
        self.faces += len(result.recognitions)
        for stage, ms in result.timings_ms.items():
            self.stage_ms[stage] += ms
        observations = [
            Observation(r.face.box, r.prediction.label, r.prediction.score, extra=r.crop)
            for r in result.recognitions
        ]
        for decision in self.tracker.update(observations, frame.index):
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
        self.publisher.publish(events_topic(self.prefix, self.cfg.device_id), encode(event))
        self.publisher.publish(person_topic(self.prefix, self.cfg.device_id, label),
                               encode(person_state_payload(event)), retain=True)
        self.state_refresh.fire(label)
        self._last_event[label] = event
        self.events += 1
        log.info("event: %s (score %.2f, track %d, %d frames%s)", label, decision.score, decision.track_id,
                 decision.frames, f", was {decision.previous}" if decision.previous else "")
        if self.cfg.events.snapshots and decision.extra is not None:
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(decision.extra, cv2.COLOR_RGB2BGR))
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
        return {
            "frames": self.frames, "captured": self.capture.captured, "dropped": self.capture.dropped,
            "skipped_images": len(self.capture.skipped), "faces": self.faces, "events": self.events,
            "suppressed": self.cooldown.suppressed, "tracks": len(self.tracker.tracks),
            "camera": camera, "mqtt": self.publisher.stats(),
            "ms_per_frame": {k: round(v / n, 2) for k, v in self.stage_ms.items()},
        }

    def log_stats(self) -> None:
        s = self.stats()
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
    try:
        return service.run(max_frames=args.max_frames)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
