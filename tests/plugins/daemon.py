"""The daemon as the tests run it: a config for a folder camera and a broker, `python -m device run` as a
subprocess (`Daemon`, or `start_daemon` + `finish`), and what it should announce, computed in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
import yaml

from faceberry.device.capture.camera import IMAGE_SUFFIXES
from faceberry.device.outputs import homeassistant as ha
from tests.plugins.broker import Subscriber
from tests.plugins.processes import start

DEVICE = "testcam"
HA_DEVICE = "hacam"
MARGIN = 0.02  # photos chosen as test cases score at least this far from the threshold


def folder_of_photos(heldout_photos: Path, dest: Path, per_person: int = 3, broken: bool = True) -> list[Path]:
    """A camera folder: a few held-out photos of each person (symlinks), plus an unreadable image."""
    dest.mkdir(parents=True, exist_ok=True)
    chosen = []
    for person in sorted(p for p in heldout_photos.iterdir() if p.is_dir()):
        photos = sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:per_person]
        for i, photo in enumerate(photos):
            link = dest / f"{person.name}_{i:02d}{photo.suffix.lower()}"
            link.symlink_to(photo.resolve())
            chosen.append(link)
    if broken:
        # Sorted between the people: the run must warn and go on.
        (dest / f"{chosen[len(chosen) // 2].stem}_broken.jpg").write_bytes(b"not a jpeg at all")
    return chosen


def write_config(path: Path, bundle: Path, broker, camera: dict, **sections) -> Path:
    data = {
        "bundle": str(bundle),
        "device_id": DEVICE,
        "camera": {"source": "folder", **camera},
        # Every photo is a new scene: decide on one frame and let every change of face be an event.
        "tracking": {"votes_needed": 1, "max_age": 0},
        "events": {"cooldown": 0},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5, "reconnect_max_delay": 2},
        "stats_interval": 1,
        # Each test its own outbox: a leftover of another test would be replayed into this one.
        "state_dir": str(path.parent / "state"),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def start_daemon(config: Path, *extra: str, **kwargs) -> subprocess.Popen:
    """`python -m device run --config CONFIG`, stdout and stderr piped (read them, or `finish` it)."""
    return start([sys.executable, "-m", "device", "run", "--config", str(config), *extra], **kwargs)


def expected_event_labels(bundle_dir: Path, frames: list[Path]) -> list[str]:
    """What the daemon should announce, computed in-process with the same pipeline and tracker settings."""
    from faceberry.bundle import load_bundle
    from faceberry.device.recognition.pipeline import FacePipeline
    from faceberry.device.recognition.tracker import Observation, Tracker
    from faceberry.preprocess import load_image

    pipeline = FacePipeline(load_bundle(bundle_dir), num_threads=2, min_face_size=40)
    tracker = Tracker(0.3, votes_needed=1, max_age=0)
    labels = []
    for index, path in enumerate(frames):
        result = pipeline.process(load_image(path))
        obs = [Observation(r.face.box, r.prediction.label, r.prediction.score) for r in result.recognitions]
        labels += [d.label for d in tracker.update(obs, index)]
    return labels


def mqtt_cfg(broker, queue_size: int = 1000):
    from faceberry.device.config import MqttConfig

    return MqttConfig(host=broker.host, port=broker.port, keepalive=5, queue_size=queue_size,
                      reconnect_min_delay=1, reconnect_max_delay=1)


def blank(path: Path) -> None:
    """A frame with no face (the person has left)."""
    cv2.imwrite(str(path), np.full((240, 320, 3), 128, np.uint8))


def link(src: Path, dest: Path) -> None:
    dest.symlink_to(Path(src).resolve())


def predictions(bundle: Path, photos: list[Path], threshold: float | None = None) -> list[tuple[str, str, np.ndarray]]:
    """(label or "borderline", best, embedding) of each photo's widest face, with the daemon's own pipeline."""
    from faceberry.bundle import load_bundle
    from faceberry.device.recognition.pipeline import FacePipeline
    from faceberry.preprocess import load_image

    pipe = FacePipeline(load_bundle(bundle), num_threads=2)
    if threshold is not None:
        pipe.classifier.threshold = threshold
    out = []
    for photo in photos:
        rec = max(pipe.process(load_image(photo)).recognitions, key=lambda r: r.face.width)
        # A score this near the threshold could fall on either side in the daemon (other thread counts):
        # such a photo is no test case.
        near = abs(rec.prediction.score - pipe.classifier.threshold) < MARGIN
        out.append(("borderline" if near else rec.prediction.label, rec.prediction.best, rec.vector))
    return out


def newcomer_unknown(student: dict) -> tuple[Path, np.ndarray]:
    """A probe photo of the `tiny` student fixture's newcomer that its bundle takes for a stranger, and its
    embedding through the daemon's pipeline (what a command names)."""
    probes = [Path(p) for p in student["newcomer_probes"]]
    for photo, (label, _, vector) in zip(probes, predictions(student["bundle"], probes), strict=True):
        if label == "unknown":
            return photo, vector
    raise AssertionError("every probe photo of the newcomer was taken for someone: pick another newcomer")


class Daemon:
    """`python -m device run` as a subprocess, its log collected, and (given the broker) a subscriber to
    everything. `stays_up`: `stop()` also asserts the daemon was still running when it was stopped."""

    def __init__(self, config: Path, broker=None, *, stays_up: bool = False) -> None:
        self.broker = broker
        self.device = yaml.safe_load(config.read_text(encoding="utf-8"))["device_id"]
        self.stays_up = stays_up
        self.sub = Subscriber(broker.host, broker.port, "#") if broker is not None else None
        self.proc = start_daemon(config)
        self.log: list[str] = []
        self._reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def text(self) -> str:
        return "".join(self.log)[-4000:]

    def wait(self, predicate, timeout: float = 60) -> None:
        assert self.sub.wait_for(predicate, timeout), self.text()

    def json_on(self, topic: str, start: int = 0) -> list[dict]:
        return [json.loads(p) for t, p, _ in list(self.sub.messages)[start:] if t == topic and p]

    def send(self, payload: bytes | str, topic: str | None = None) -> int:
        mark = len(self.sub.messages)
        mqtt_publish.single(topic or ha.command_topic("faceberry", self.device), payload, qos=1,
                            hostname=self.broker.host, port=self.broker.port)
        return mark

    def result_after(self, mark: int, timeout: float = 120) -> dict:
        topic = ha.command_result_topic("faceberry", self.device)
        self.wait(lambda m: any(t == topic for t, _, _ in m[mark:]), timeout)
        return self.json_on(topic, mark)[0]

    def stop(self) -> str:
        if self.stays_up:
            assert self.proc.poll() is None, "".join(self.log)[-4000:]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        # wait(), not communicate(): a second reader of stderr would take lines the log thread never sees.
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(5)
            pytest.fail(f"daemon did not exit within 60s:\n{''.join(self.log)[-3000:]}")
        self._reader.join(5)
        if self.sub is not None:
            self.sub.close()
        err = "".join(self.log)
        assert rc == 0, err[-4000:]
        assert "Traceback" not in err, err[-4000:]
        return err


def ha_config(tmp_path: Path, bundle: Path, broker, camera: Path, stats_interval: float = 1, **sections) -> Path:
    config = write_config(tmp_path / "config.yaml", bundle, broker, {"device": str(camera), "loop": True, "fps": 8},
                          events={"homeassistant": True}, **sections)
    data = yaml.safe_load(config.read_text())
    data.update(device_id=HA_DEVICE, stats_interval=stats_interval)
    config.write_text(yaml.safe_dump(data))
    return config



def switch_current(store: Path, bundle_id: str) -> None:
    """Point bundles/current at bundles/<bundle_id> atomically (a relative link renamed over the old)."""
    tmp = store / "bundles" / ".current.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(bundle_id)
    os.replace(tmp, store / "bundles" / "current")


def events_of(sub) -> list[dict]:
    """The events a Subscriber to the test device's topics received, decoded."""
    return [json.loads(p) for p in sub.on(f"faceberry/{DEVICE}/events")]


@pytest.fixture
def subscriber(mosquitto):
    """A Subscriber to the test device's topics, cleared of what earlier tests left retained."""
    sub = Subscriber(mosquitto.host, mosquitto.port, f"faceberry/{DEVICE}/#")
    # Retained messages of earlier tests (online/offline, person state) are not this test's.
    time.sleep(0.3)
    sub.messages.clear()
    yield sub
    sub.close()
