"""Fakes for the hardware-free loop tests: a camera, a bundle, a pipeline, a communicator and a dispatcher that
records what the loop hands it (tests/test_loop.py, tests/test_cameras.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from faceberry.classifier import Prediction
from faceberry.contract import UNKNOWN
from faceberry.detector import Face
from faceberry.device.capture.camera import Frame
from faceberry.device.config import Config
from faceberry.device.recognition.pipeline import FrameResult, Recognition


class FakeCapture:
    """Frames from a list, then the end of the stream (None), like a folder camera."""

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = list(frames)
        self.out_now = False
        self.outages = 0
        self.outage_s = 0.0
        self.outage_reason = None
        self.captured = len(frames)
        self.dropped = 0
        self.skipped: list[str] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def get(self, timeout: float = 0.5) -> Frame | None:
        return self.frames.pop(0) if self.frames else None


@dataclass
class FakeBundle:
    bundle_id: str
    labels: list[str]


@dataclass
class FakeClassifier:
    threshold: float = 0.5


@dataclass
class FakePipeline:
    """Every frame: one face of `label` at the same place (a person standing still)."""

    label: str
    score: float = 0.9
    classifier: FakeClassifier = field(default_factory=FakeClassifier)

    def process(self, image: np.ndarray, tracker: object = None, reverify_every: int = 1) -> FrameResult:
        face = Face(np.array([10.0, 10.0, 50.0, 50.0]), 0.99, np.zeros((6, 2)))
        crop = np.full((16, 16, 3), 128, np.uint8)
        vector = np.ones(4, np.float32) / 2
        best = self.label if self.label != UNKNOWN else "alice"
        return FrameResult([Recognition(face, crop, Prediction(self.label, self.score, best), vector)],
                           {"detect": 1.0, "align": 0.5, "classify": 0.5})


class FakeCommunicator:
    state = "connected"

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | str, bool]] = []
        self.calls: list[str] = []

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, qos: int | None = None) -> bool:
        self.sent.append((topic, payload, retain))
        return True

    def start(self) -> None:
        self.calls.append("start")

    def stop(self, timeout: float = 5.0) -> None:
        self.calls.append("stop")

    def close(self) -> None:
        self.calls.append("close")

    def fatal_error(self) -> Exception | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "pending": 0, "lost": 0}


class RecordingDispatcher:
    """The loop's only way out, recording what it is handed, in order."""

    state = "connected"

    def __init__(self) -> None:
        self.log: list[Any] = []

    def notify(self, message: object) -> None:
        self.log.append(message)

    def start(self) -> None:
        self.log.append("start")

    def stop(self, timeout: float = 5.0) -> None:
        self.log.append("stop")

    def abort(self) -> None:
        self.log.append("abort")

    def fatal_error(self) -> Exception | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"mqtt": {"state": "connected", "pending": 0, "lost": 0}}

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.log if isinstance(m, kind)]


def frames(n: int) -> list[Frame]:
    return [Frame(np.zeros((120, 160, 3), np.uint8), 1_700_000_000.0 + i, i) for i in range(n)]


def config(**events: Any) -> Config:
    return Config(bundle="/nonexistent/bundle", device_id="testcam", tracking={"votes_needed": 3},
                  events={"cooldown": 60, **events})


