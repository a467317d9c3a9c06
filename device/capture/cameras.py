"""Several cameras in one daemon: each its own capture, tracker and cooldown; frames taken in turn.

One recognizer (the loop's pipeline) serves every camera. `RoundRobin.next_frame` hands out the next frame
of the first camera, after the one served last, that has a frame ready: a camera that always has frames
(a busy street, a video file) gets at most every other turn while another waits, so the CPU is shared
fairly and nobody's queue is starved. A camera that fails for good (a folder that disappeared, a live
camera out longer than its camera.max_outage_s) leaves the rotation, logged and shown as `failed` in the
stats; the others keep going, and the run ends (with that camera's error) only when no camera is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from faceberry.device.capture.camera import Capture, Frame
from faceberry.device.outputs.events import Cooldown
from faceberry.device.recognition.tracker import Tracker

log = logging.getLogger(__name__)


@dataclass
class Camera:
    """One camera's part of the loop. Its own tracker, so a track never matches another camera's box."""

    name: str
    capture: Capture
    tracker: Tracker
    cooldown: Cooldown
    samples: dict[int, deque[Any]] = field(default_factory=dict)  # the last samples of each of its tracks
    frames: int = 0
    fps_frames: int = 0  # `frames` at the start of the stats interval
    done: bool = False  # its stream ended or it failed for good
    error: BaseException | None = None

    def stats(self, elapsed: float) -> dict[str, Any]:
        capture = self.capture
        state = "failed" if self.error is not None else "ended" if self.done else "out" if capture.out_now else "ok"
        out: dict[str, Any] = {
            "state": state, "frames": self.frames, "captured": capture.captured, "dropped": capture.dropped,
            "fps": round((self.frames - self.fps_frames) / elapsed, 2) if elapsed > 0 else 0.0,
            "outages": capture.outages, "outage_s": round(capture.outage_s, 1),
        }
        if self.error is not None:
            out["reason"] = " ".join(str(self.error).split())
        elif capture.out_now:
            out["reason"] = capture.outage_reason
        return out


class RoundRobin:
    """The next frame of several cameras, taking them in turn among those with a frame ready."""

    def __init__(self, cameras: list[Camera]) -> None:
        self.cameras = cameras
        self._next = 0
        self.wakeup = threading.Event()
        for camera in cameras:
            # A fake capture in a test may have no such attribute; then polling finds its frames.
            if hasattr(camera.capture, "wakeup"):
                camera.capture.wakeup = self.wakeup

    def next_frame(self, timeout: float) -> tuple[Camera, Frame] | None:
        """(camera, frame), or None when every camera's stream has ended; TimeoutError if no frame came
        within `timeout`. Raises a camera's error only when it was the last camera left."""
        deadline = time.monotonic() + timeout
        while True:
            self.wakeup.clear()  # before looking: a frame queued meanwhile sets it again
            live = [i for i, c in enumerate(self.cameras) if not c.done]
            if not live:
                failed = [c for c in self.cameras if c.error is not None]
                if failed:
                    raise failed[-1].error  # type: ignore[misc]
                return None
            n = len(self.cameras)
            for step in range(n):
                i = (self._next + step) % n
                camera = self.cameras[i]
                if camera.done:
                    continue
                frame = self._poll(camera)
                if frame is not None:
                    self._next = (i + 1) % n
                    return camera, frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame")
            self.wakeup.wait(min(remaining, 0.05))

    def _poll(self, camera: Camera) -> Frame | None:
        """Its queued frame, else None (nothing yet; or its stream ended or failed, then it leaves the turn)."""
        try:
            frame = camera.capture.get(timeout=0)
        except TimeoutError:
            return None
        except Exception as exc:  # this camera is gone; the others carry on
            camera.done, camera.error = True, exc
            others = sum(not c.done for c in self.cameras)
            log.error("camera %s failed: %s; %d other camera(s) keep running", camera.name, exc, others)
            return None
        if frame is None:
            camera.done = True
            log.info("camera %s: end of its stream", camera.name)
        return frame
