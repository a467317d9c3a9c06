"""The frame loop: camera → FacePipeline → corrections → tracker → decisions, handed to one dispatcher.

It knows the capture, the pipeline (and how to load another for a reload), the corrections it applies
before the tracker votes, the dispatcher, systemd's notifier and where the status file goes; it holds no
output and nothing holds it. Everything is built by the composition root (device/app.py).

Reload without restart: SIGHUP (`systemctl reload faceberry`) or a command's `ReloadRequests` ticket asks
the loop to load the bundle `cfg.bundle` points to between two frames; the MQTT session, the camera and the
outbox stay. A bundle that fails its checks is refused and the old one keeps serving; either way the
retained bundle topic (`Reloaded`) and one log line say what happened. systemd's notify protocol
(device/ops/notify.py) is spoken throughout: READY=1, WATCHDOG=1 from the loop, STATUS=, RELOADING=1,
STOPPING=1.

Runs until the camera stream ends (files and folders), a fatal camera error, a dead MQTT client, a broker
that keeps refusing our credentials or certificates, or SIGTERM/SIGINT; in every case capture stops, what
the broker can take is delivered, `offline` is published, and whatever is left stays in the outbox for the
next start. A live camera that drops out, or is not there at start, is reopened by the capture thread
(device/capture/camera.py) for up to camera.max_outage_s; the loop just waits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from faceberry.bundle import Bundle
from faceberry.classifier import UNKNOWN
from faceberry.device.capture.camera import Capture, Frame
from faceberry.device.capture.cameras import Camera, RoundRobin
from faceberry.device.config import Config, describe
from faceberry.device.memory.corrections import CorrectionFilter
from faceberry.device.memory.facestore import crop_with_margin
from faceberry.device.messaging.dispatcher import (
    Decided,
    Dispatcher,
    FaceSample,
    FrameDone,
    Reloaded,
    ReloadRequests,
    ReloadResult,
    Seen,
    Started,
    StatsReport,
    Stopping,
    Tick,
)
from faceberry.device.ops.notify import Notifier
from faceberry.device.ops.status_file import StatusFile
from faceberry.device.outputs.events import Cooldown, event_payload, iso_utc
from faceberry.device.recognition.pipeline import FacePipeline
from faceberry.device.recognition.tracker import Observation, Tracker
from faceberry.statefile import write_atomic

log = logging.getLogger(__name__)

# Pipeline stages that run once per face found (detect runs once per frame).
PER_FACE_STAGES = ("align", "classify")

# Seconds between two writes of the status file `faceberry status` reads, from the start on: it says the
# frames, fps and MQTT state of now, not of the last stats interval (60 s). One write is a stats() dict and
# a ~2 KB JSON file replaced atomically, well under a millisecond; 17,280 small writes a day are few for
# an SD card beside the outbox's.
STATUS_WRITE_S = 5.0

# Loads the bundle cfg.bundle points to now: (the resolved path, the bundle, its pipeline); raises on any
# problem (device/app.py's load_pipeline).
Loader = Callable[[], tuple[str, Bundle, FacePipeline]]


class FrameLoop:
    def __init__(self, cfg: Config, *, capture: Capture | None = None, loader: Loader, dispatcher: Dispatcher,
                 corrections: CorrectionFilter, reloads: ReloadRequests | None = None,
                 notifier: Notifier | None = None, status_path: Path | None = None,
                 samples_per_track: int = 0, keep_regions: bool = False,
                 captures: list[tuple[str, Capture]] | None = None) -> None:
        """`capture`: the one camera (cfg.camera); `captures`: several, (name, capture) each, taken in turn.
        `samples_per_track`: the last samples of each track kept for its decision (0: the deciding one
        only); `keep_regions`: samples carry the frame around the face (remembered faces need it)."""
        self.cfg = cfg
        if captures is None:
            if capture is None:
                raise ValueError("FrameLoop needs a capture or captures")
            captures = [(cfg.camera.name, capture)]
        self.cameras = [Camera(name, c, Tracker(cfg.tracking.iou, cfg.tracking.votes_needed, cfg.tracking.max_age),
                               Cooldown(cfg.events.cooldown)) for name, c in captures]
        self.turns = RoundRobin(self.cameras) if len(self.cameras) > 1 else None
        # The first camera: the only one of a single-camera daemon.
        self.capture = self.cameras[0].capture
        self.tracker = self.cameras[0].tracker
        self.cooldown = self.cameras[0].cooldown
        self.loader = loader
        self.dispatcher = dispatcher
        self.corrections = corrections
        self.reloads = reloads or ReloadRequests()
        self.notifier = notifier or Notifier()
        self.status_path = status_path
        self.samples_per_track = samples_per_track
        self.keep_regions = keep_regions
        self.stop_event = threading.Event()
        self.bundle_path, bundle, self.pipeline = loader()
        self.bundle_id = bundle.bundle_id
        self.labels = [lab for lab in bundle.labels if lab != UNKNOWN]
        self.last_reload: ReloadResult | None = None
        self.reloads_ok = 0
        self.reloads_refused = 0
        self.frames = 0
        self.faces = 0
        self.events = 0
        self.stage_ms: dict[str, float] = defaultdict(float)
        self.face_stage_ms: dict[str, float] = defaultdict(float)  # align and classify: they run per face
        self._fps_frames = 0
        self._fps_since = time.monotonic()
        self._ready_sent = False
        self._status_warned = False
        self._stopped = False  # the last status file of a run says so
        self._status_at = 0.0  # time.monotonic() of the last status write of the loop

    # --- requests from other threads ------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self.stop_event.set()

    def request_reload(self) -> int:
        """Ask the loop to reload the bundle between two frames; safe from any thread or a signal."""
        return self.reloads.request()

    # --- the bundle ----------------------------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Load the bundle cfg.bundle points to now and swap it in; on any failure keep the old one.

        Runs in the loop (between frames), so the pipeline is never swapped under a frame. The MQTT session,
        camera and outbox are untouched. Returns what happened; `Reloaded`, the log, systemd's STATUS and
        the status file say it too.
        """
        self.notifier.reloading()
        old = self.bundle_id
        wanted = os.path.realpath(self.cfg.bundle)
        try:
            path, bundle, pipeline = self.loader()
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
            for camera in self.cameras:
                camera.tracker.tracks.clear()
            result = ReloadResult(True, self.bundle_id, path, None, time.time())
            self.reloads_ok += 1
            log.info("reloaded: bundle %s (was %s) from %s, %d people", self.bundle_id, old, path, len(self.labels))
        self.last_reload = result
        self.dispatcher.notify(Reloaded(result, tuple(self.labels), float(self.pipeline.classifier.threshold)))
        if result.ok:  # Bundle and People enrolled now, not at the next stats interval
            self._report_stats()
        self.write_status()
        if self._ready_sent:
            self.notifier.ready(self.status_text())  # ends RELOADING=1
        else:
            self.notifier.status(self.status_text())  # READY=1 still waits for the first frame
        return result

    # --- systemd: readiness, watchdog, status ----------------------------------------------------------------

    def status_text(self) -> str:
        """One line for systemd's STATUS= (`systemctl status faceberry`)."""
        mqtt = self.dispatcher.state.split(":")[0]
        if self.turns is None:
            camera = "camera " + ("out" if self.capture.out_now else "ok")
        else:
            up = sum(not c.done and not c.capture.out_now for c in self.cameras)
            camera = f"cameras {up}/{len(self.cameras)} ok"
        return f"{self.fps:.1f} fps, bundle {self.bundle_id}, {camera}, mqtt {mqtt}"

    @property
    def fps(self) -> float:
        """Frames processed per second over the last stats interval (since start before the first)."""
        elapsed = time.monotonic() - self._fps_since
        return (self.frames - self._fps_frames) / elapsed if elapsed > 0 else 0.0

    # --- the loop ------------------------------------------------------------------------------------------------

    def run(self, max_frames: int = 0) -> int:
        log.info("starting: %s, model %s", describe(self.cfg), self.bundle_id)
        started: list[Capture] = []
        try:
            # A missing file or folder fails here, before we announce ourselves; a live camera that is
            # not there yet is waited for in the background (an outage from the start).
            for camera in self.cameras:
                camera.capture.start()
                started.append(camera.capture)
        except BaseException:
            for capture in started:
                capture.stop()
            self.dispatcher.abort()
            raise
        # Before the connection: the presence OFFs must be in the outbox (replacing any ON a previous run
        # left there) before anything is handed to the broker after `online`.
        self.dispatcher.notify(Started(tuple(self.labels), ReloadResult(True, self.bundle_id, self.bundle_path,
                                                                        None, time.time())))
        self._report_stats()  # diagnostics right from the start, not a stats interval later
        self.dispatcher.start()
        # fps counts from here, not from before the models loaded.
        self._fps_frames, self._fps_since = self.frames, time.monotonic()
        self._write_status_every(0.0)
        last_stats = time.monotonic()
        try:
            while not self.stop_event.is_set():
                # The loop itself pings: a pipeline call that hangs stops the pings, and systemd restarts us.
                self.notifier.watchdog()
                fatal = self.dispatcher.fatal_error()
                if fatal is not None:
                    raise fatal
                self.reloads.serve(self.reload)
                self.dispatcher.notify(Tick())
                try:
                    camera, frame = self._next_frame()
                except TimeoutError:
                    if not self._ready_sent and any(c.capture.out_now for c in self.cameras):
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
                self.handle_frame(frame, camera)
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
            for camera in self.cameras:
                camera.capture.stop()
            self.reloads.close()  # a command waiting for a reload is answered now, not at its timeout
            self.dispatcher.notify(Stopping())  # presence OFF before the communicator's `offline`
            self.dispatcher.stop(timeout=5.0)
            self._stopped = True
            self.log_stats()
            self.notifier.close()
        return 0

    def _next_frame(self) -> tuple[Camera, Frame | None]:
        """The next frame to handle and its camera; (…, None) at the end. TimeoutError: none for now."""
        if self.turns is None:
            return self.cameras[0], self.capture.get(timeout=0.5)
        got = self.turns.next_frame(timeout=0.5)
        return (self.cameras[0], None) if got is None else got

    def handle_frame(self, frame: Frame, camera: Camera | None = None) -> None:
        camera = camera or self.cameras[0]
        tracker = camera.tracker
        result = self.pipeline.process(frame.image, tracker, self.cfg.recognition.reverify_every)
        t0 = time.perf_counter()
        self.frames += 1
        camera.frames += 1
        self.faces += len(result.recognitions)
        for stage, ms in result.timings_ms.items():
            self.stage_ms[stage] += ms
            if stage in PER_FACE_STAGES and result.recognitions:
                self.face_stage_ms[stage] += ms
        threshold = float(self.pipeline.classifier.threshold)
        observations = []
        for r in result.recognitions:
            prediction = self.corrections.apply(r.prediction, r.vector, threshold)  # "wrong, not X" applies here
            region = crop_with_margin(frame.image, r.face.box) if self.keep_regions else None
            observations.append(Observation(r.face.box, prediction.label, prediction.score,
                                            extra=FaceSample(r.crop, r.vector, region)))
        decisions = tracker.update(observations, frame.index)
        seen = self._keep_samples(camera, tracker.active(), frame.index)
        decided = []
        lines: list[tuple[object, ...]] = []
        for decision in decisions:
            label = decision.label
            if label == UNKNOWN and not self.cfg.events.unknown:
                continue
            if not camera.cooldown.fire(label):
                log.debug("track %d: %s within its cooldown, no event", decision.track_id, label)
                continue
            h, w = frame.image.shape[:2]
            # Faces at the edge get boxes reaching past it; subscribers want pixels inside the frame.
            bbox = np.clip(decision.box, 0, [w, h, w, h])
            event = event_payload(
                device_id=self.cfg.device_id, camera=camera.name, label=label, score=decision.score,
                bbox=bbox, track_id=decision.track_id, frames=decision.frames, model=self.bundle_id,
                timestamp=frame.timestamp, previous=decision.previous, source=frame.origin,
            )
            samples = tuple(camera.samples.get(decision.track_id, ()))
            if not samples and isinstance(decision.extra, FaceSample):
                samples = (decision.extra,)
            decided.append(Decided(event, decision.track_id, samples))
            self.events += 1
            lines.append((label, decision.score, decision.track_id, decision.frames,
                          f", was {decision.previous}" if decision.previous else "",
                          f" on camera {camera.name}" if self.turns is not None else ""))
        self.dispatcher.notify(FrameDone(frame.index, frame.timestamp, seen, tuple(decided)))
        # Logged once the outputs have it (the events output writes to the outbox in this thread): a line
        # "event:" means the event is stored and will be delivered, whatever happens to the process next.
        for line in lines:
            log.info("event: %s (score %.2f, track %d, %d frames%s)%s", *line)
        self.stage_ms["track+publish"] += (time.perf_counter() - t0) * 1e3

    def _keep_samples(self, camera: Camera, tracks: list[Any], frame_index: int) -> tuple[Seen, ...]:
        """Keep the last few samples of every track seen in this frame; who is in view."""
        samples = camera.samples
        live = {t.track_id for t in tracks}
        for track_id in [t for t in samples if t not in live]:
            del samples[track_id]
        seen = []
        for track in tracks:
            if track.last_frame != frame_index or not isinstance(track.last_extra, FaceSample):
                continue
            if self.samples_per_track:
                samples.setdefault(track.track_id, deque(maxlen=self.samples_per_track)).append(
                    track.last_extra)
            if track.label is not None:
                seen.append(Seen(track.label, float(track.score)))
        return tuple(seen)

    # --- statistics and the status file `faceberry status` reads ----------------------------------------------

    def stats(self) -> dict[str, Any]:
        n = max(self.frames, 1)
        elapsed = time.monotonic() - self._fps_since
        cameras = {c.name: c.stats(elapsed) for c in self.cameras}
        if self.turns is None:
            camera: dict[str, Any] = {"state": "out" if self.capture.out_now else "ok",
                                      "outages": self.capture.outages, "outage_s": round(self.capture.outage_s, 1)}
            if self.capture.out_now:
                camera["reason"] = self.capture.outage_reason
        else:  # all of them: "ok" only while every camera is; the reason names the first that is not
            bad = [(name, c) for name, c in cameras.items() if c["state"] != "ok"]
            camera = {"state": bad[0][1]["state"] if bad else "ok",
                      "outages": sum(c["outages"] for c in cameras.values()),
                      "outage_s": round(sum(c["outage_s"] for c in cameras.values()), 1)}
            if bad and bad[0][1].get("reason"):
                camera["reason"] = f"{bad[0][0]}: {bad[0][1]['reason']}"
        return {
            **self.dispatcher.stats(),  # mqtt, and memory when something is remembered
            "frames": self.frames, "captured": sum(c["captured"] for c in cameras.values()),
            "dropped": sum(c["dropped"] for c in cameras.values()),
            "skipped_images": sum(len(c.capture.skipped) for c in self.cameras), "faces": self.faces,
            "events": self.events, "suppressed": sum(c.cooldown.suppressed for c in self.cameras),
            "tracks": sum(len(c.tracker.tracks) for c in self.cameras),
            "camera": camera, "cameras": cameras,
            "bundle": {"id": self.bundle_id, "reloads": self.reloads_ok, "refused": self.reloads_refused},
            "ms_per_frame": {k: round(v / n, 2) for k, v in self.stage_ms.items()},
            # Per face found: a frame without a face spends ~0 ms there, and its mean would hide the cost.
            "ms_per_face": ({k: round(v / self.faces, 2) for k, v in self.face_stage_ms.items()} if self.faces
                            else {}),
        }

    def _report_stats(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        s = stats if stats is not None else self.stats()
        self.dispatcher.notify(StatsReport(s, self.fps if s["frames"] else None, self.bundle_id, len(self.labels),
                                           final=self._stopped))
        return s

    def write_status(self, stats: dict[str, Any] | None = None) -> Path | None:
        """Write the stats (`stats`, else taken now), bundle, pid and MQTT state atomically (tmp + rename): a
        reader never sees half."""
        path = self.status_path
        if path is None:
            return None
        s = stats if stats is not None else self.stats()
        data = {**s, "bundle_id": self.bundle_id, "bundle_path": self.bundle_path, "pid": os.getpid(),
                "device_id": self.cfg.device_id, "updated_at": iso_utc(time.time()),
                "mqtt_state": s["mqtt"]["state"], "fps": round(self.fps, 2), "status": self.status_text(),
                "running": not self._stopped}
        if self.last_reload is not None:
            r = self.last_reload
            data["last_reload"] = {"ok": r.ok, "bundle_id": r.bundle_id, "path": r.path, "error": r.error,
                                   "at": iso_utc(r.at)}
        try:
            text = StatusFile.model_validate(data).dump()
        except ValidationError as exc:  # a bug of this writer: said once, the daemon goes on
            if not self._status_warned:
                log.error("status file %s not written, its contents break the contract (%s); please report it",
                          path, exc.errors()[0])
                self._status_warned = True
            return None
        try:
            # On a full disk it is overwritten in place: the loss it counts must show while the disk is full.
            write_atomic(path, text, overwrite_if_full=True)
        except OSError as exc:
            if not self._status_warned:
                log.warning("cannot write the status file %s: %s; check the free space and state_dir", path, exc)
                self._status_warned = True
            return None
        return path

    def _write_status_every(self, seconds: float) -> None:
        """Write the status file if the last write of the loop is `seconds` old (0: now)."""
        now = time.monotonic()
        if now - self._status_at >= seconds:
            self._status_at = now
            self.write_status()

    def log_stats(self) -> None:
        s = self.stats()
        self.notifier.status(self.status_text())
        self._report_stats(s)
        # The very figures of the stats line below (counters move between two stats() calls), and the
        # periodic write waits its full interval from here.
        self._status_at = time.monotonic()
        self.write_status(s)
        self._fps_frames, self._fps_since = self.frames, time.monotonic()
        for c in self.cameras:
            c.fps_frames = c.frames
        stages = " ".join(f"{k} {v:.1f}" for k, v in s["ms_per_frame"].items())
        camera = s["camera"]
        camera_text = f"camera {camera['state']} outages={camera['outages']} outage_s={camera['outage_s']}"
        if "reason" in camera:
            camera_text += f" ({camera['reason']})"
        mqtt = dict(s["mqtt"])
        error = mqtt.pop("error", None)
        mqtt_text = " ".join(f"{k}={v}" for k, v in mqtt.items()) + (f" ({error})" if error else "")
        if self.turns is not None:  # each camera's share: who is served, who drops, who is out
            camera_text += "; " + ", ".join(f"{name} {c['state']} {c['fps']:.1f} fps {c['dropped']} dropped"
                                            for name, c in s["cameras"].items())
        log.info(
            "stats: %d frames (%d captured, %d dropped, %d unreadable skipped), %d faces, %d events "
            "(%d in cooldown), %s, mqtt %s; ms/frame: %s",
            s["frames"], s["captured"], s["dropped"], s["skipped_images"], s["faces"], s["events"],
            s["suppressed"], camera_text, mqtt_text, stages or "-",
        )
