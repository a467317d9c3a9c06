"""Several cameras in one daemon (issue 23): one recognizer, a capture and a tracker per camera, frames taken
in turn. A real daemon with two folder cameras of real face photos against a real mosquitto; and the loop
with fake captures (we have no Pi camera) for what must be counted exactly: fairness and separate tracks."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from faceberry.contract import UNKNOWN
from faceberry.device.capture.camera import IMAGE_SUFFIXES, Frame
from faceberry.device.capture.cameras import Camera, RoundRobin
from faceberry.device.config import ConfigError, config_from_dict
from faceberry.device.loop import FrameLoop
from faceberry.device.memory.corrections import CorrectionFilter, Negatives
from faceberry.device.messaging.dispatcher import FrameDone
from faceberry.device.outputs.events import Cooldown
from faceberry.device.recognition.tracker import Tracker
from tests.plugins.broker import Subscriber
from tests.plugins.daemon import DEVICE, events_of, expected_event_labels, start_daemon
from tests.plugins.fakes import FakeBundle, FakeCapture, FakePipeline, RecordingDispatcher, config
from tests.plugins.processes import finish, module

# --- the config ----------------------------------------------------------------------------------------------

BASE = {"bundle": "/b", "device_id": "d1"}


def test_cameras_is_a_list_of_named_camera_sections_and_camera_alone_is_a_list_of_one() -> None:
    cfg = config_from_dict({**BASE, "cameras": [{"name": "front", "source": "folder", "device": "/a"},
                                                {"name": "back", "source": "folder", "device": "/b", "fps": 2.0}]})
    assert [(c.name, c.device, c.fps) for c in cfg.all_cameras] == [("front", "/a", 0.0), ("back", "/b", 2.0)]
    assert cfg.camera.name == "front"  # the first stands for all where one camera is asked for
    one = config_from_dict({**BASE, "camera": {"source": "folder", "device": "/a"}})
    assert [c.name for c in one.all_cameras] == ["camera"] and one.cameras is None


@pytest.mark.parametrize(("data", "says"), [
    ({"camera": {"name": "a"}, "cameras": [{"name": "b"}]}, "camera and cameras are both set"),
    ({"cameras": []}, "cameras: the list is empty"),
    ({"cameras": [{"name": "a"}, {"source": "folder"}]}, "cameras[1]: missing name"),
    ({"cameras": [{"name": "a"}, {"name": "a"}]}, "cameras[1]: the name 'a' is used twice"),
    ({"cameras": [{"name": "a"}, {"name": "b", "fps": -1.0}]}, "cameras[1].fps: must be at least 0"),
    ({"cameras": [{"name": "a", "colour": 1}]}, "unknown key 'cameras[0].colour'"),
])
def test_a_bad_cameras_list_is_one_line_naming_the_problem(data: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, **data}, source="faceberry.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("faceberry.yaml: ") and says in message, message


# --- the loop with fake captures: counted, not timed ---------------------------------------------------------

class EndlessCapture(FakeCapture):
    """A camera that always has a frame ready (a busy street, a video file read as fast as it goes)."""

    def __init__(self) -> None:
        super().__init__([])
        self.index = 0

    def get(self, timeout: float = 0.5) -> Frame | None:
        self.index += 1
        return Frame(np.zeros((120, 160, 3), np.uint8), 1_700_000_000.0 + self.index, self.index)


def frames(n: int) -> list[Frame]:
    return [Frame(np.zeros((120, 160, 3), np.uint8), 1_700_000_000.0 + i, i) for i in range(n)]


def cam(name: str, capture: Any) -> Camera:
    return Camera(name, capture, Tracker(), Cooldown(0))


def test_a_camera_always_ready_does_not_starve_the_other() -> None:
    busy, quiet = cam("busy", EndlessCapture()), cam("quiet", FakeCapture(frames(10)))
    turns = RoundRobin([busy, quiet])
    served = [turns.next_frame(timeout=0.5) for _ in range(20)]
    names = [c.name for c, _ in served if c is not None]
    # Strictly in turn while both have frames: the quiet camera's ten frames all got through in 20 turns.
    assert names == ["busy", "quiet"] * 10
    assert [f.index for c, f in served if c is quiet] == list(range(10))
    # The quiet one's stream ended: the busy one has every turn now, and nothing waits on the ended one.
    assert [turns.next_frame(timeout=0.5)[0].name for _ in range(5)] == ["busy"] * 5  # type: ignore[index]
    assert quiet.done and quiet.error is None


def test_a_failed_camera_leaves_the_turn_and_its_error_comes_only_with_the_last() -> None:
    class Broken(FakeCapture):
        def get(self, timeout: float = 0.5) -> Frame | None:
            raise OSError("image folder /x disappeared")

    good, bad = cam("good", FakeCapture(frames(3))), cam("bad", Broken([]))
    turns = RoundRobin([bad, good])
    assert [turns.next_frame(timeout=0.5)[0].name for _ in range(3)] == ["good"] * 3  # type: ignore[index]
    assert bad.done and "disappeared" in str(bad.error)
    assert bad.stats(1.0)["state"] == "failed" and "disappeared" in bad.stats(1.0)["reason"]
    with pytest.raises(OSError, match="disappeared"):  # no camera left: the run ends with that error
        turns.next_frame(timeout=0.5)


def test_each_camera_has_its_own_tracker_and_its_events_carry_its_name() -> None:
    out = RecordingDispatcher()
    # The same face at the same place in both cameras: one shared tracker would make it one track and
    # one event; each camera's own tracker decides it on its own.
    loop = FrameLoop(config(), loader=lambda: ("/bundles/b1", FakeBundle("b1", ["alice", UNKNOWN]),
                                               FakePipeline("alice")),
                     dispatcher=out, corrections=CorrectionFilter(Negatives(None), 0.05),
                     captures=[("front", FakeCapture(frames(4))), ("back", FakeCapture(frames(4)))])
    assert loop.run() == 0
    events = [d.event for f in out.of(FrameDone) for d in f.decided]
    assert sorted(e["camera"] for e in events) == ["back", "front"]
    assert all(e["label"] == "alice" and e["track_id"] == 1 for e in events)
    stats = loop.stats()
    assert {n: (c["frames"], c["state"]) for n, c in stats["cameras"].items()} == {"front": (4, "ended"),
                                                                                   "back": (4, "ended")}
    assert stats["frames"] == 8 and stats["camera"]["state"] == "ended"


# --- a real daemon, two folder cameras, a real broker --------------------------------------------------------

def camera_folder(people: list[Path], dest: Path, per_person: int = 3) -> list[Path]:
    """A folder camera of a few photos of each of `people` (symlinks into the held-out photos)."""
    dest.mkdir(parents=True)
    for person in people:
        photos = sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:per_person]
        for i, photo in enumerate(photos):
            (dest / f"{person.name}_{i:02d}{photo.suffix.lower()}").symlink_to(photo.resolve())
    return sorted(dest.iterdir())


def two_cameras(tmp_path: Path, heldout_photos: Path, broker: Any, bundle: Path,
                loop: bool) -> tuple[Path, dict[str, list[Path]]]:
    """A config with cameras front and back, different people in each; the photos each camera shows."""
    people = sorted(p for p in heldout_photos.iterdir() if p.is_dir())
    assert len(people) >= 2
    half = len(people) // 2
    shown = {"front": camera_folder(people[:half], tmp_path / "front"),
             "back": camera_folder(people[half:], tmp_path / "back")}
    data = {
        "bundle": str(bundle), "device_id": DEVICE,
        "cameras": [{"name": name, "source": "folder", "device": str(tmp_path / name), "loop": loop}
                    for name in shown],
        "tracking": {"votes_needed": 1, "max_age": 0},  # every photo a new scene, as in test_service_mqtt
        "events": {"cooldown": 0},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5, "reconnect_max_delay": 2},
        "stats_interval": 1,
        "state_dir": str(tmp_path / "state"),
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config, shown


@pytest.fixture
def subscriber(mosquitto: Any) -> Any:
    sub = Subscriber(mosquitto.host, mosquitto.port, f"faceberry/{DEVICE}/#")
    time.sleep(0.3)  # retained messages of earlier tests are not this test's
    sub.messages.clear()
    yield sub
    sub.close()


@pytest.mark.broker
def test_two_folder_cameras_one_daemon_each_event_carries_its_camera_and_its_people(
        tmp_path, mosquitto, subscriber, tiny_bundle, heldout_photos, tiny_bundle_people) -> None:
    config, made = two_cameras(tmp_path, heldout_photos, mosquitto, tiny_bundle, loop=False)
    rc, err = finish(start_daemon(config), timeout=120)
    assert rc == 0, err[-3000:]  # both streams ended: the run ends as a one-camera run does
    subscriber.wait_for(lambda m: any(t.endswith("/status") and p == b"offline" for t, p, _ in m), 10)
    events = events_of(subscriber)
    for name, photos in made.items():
        mine = [e for e in events if e["camera"] == name]
        # Exactly what the pipeline recognises in this camera's photos, in their order, with a tracker of its
        # own: nothing of the other camera's people, nothing lost.
        assert [e["label"] for e in mine] == expected_event_labels(tiny_bundle, photos), name
        assert all(Path(e["source"]).parent == tmp_path / name for e in mine)
        people = {p.name.rsplit("_", 1)[0] for p in photos}
        assert {e["label"] for e in mine} & people, f"{name}: none of its people recognised"
    assert {e["camera"] for e in events} == {"front", "back"}
    status = json.loads((tmp_path / "state" / f"status-{DEVICE}.json").read_text())
    assert {n: c["frames"] for n, c in status["cameras"].items()} == {n: len(p) for n, p in made.items()}
    assert all(c["dropped"] == 0 for c in status["cameras"].values())
    # The log's stats line gives each camera's share.
    assert re.search(r"front ended [\d.]+ fps 0 dropped, back ended [\d.]+ fps 0 dropped", err), err[-2000:]


@pytest.mark.broker
def test_a_camera_that_fails_does_not_stop_the_other(tmp_path, mosquitto, subscriber, tiny_bundle,
                                                     heldout_photos) -> None:
    config, _ = two_cameras(tmp_path, heldout_photos, mosquitto, tiny_bundle, loop=True)
    proc = start_daemon(config)
    try:
        assert subscriber.wait_for(lambda m: {json.loads(p)["camera"] for t, p, _ in m if t.endswith("/events")}
                                   == {"front", "back"}, 90), "no events from both cameras"
        shutil.rmtree(tmp_path / "front")  # the front camera's folder disappears
        status_file = tmp_path / "state" / f"status-{DEVICE}.json"

        def front_failed() -> bool:
            try:
                return json.loads(status_file.read_text())["cameras"]["front"]["state"] == "failed"
            except (OSError, ValueError, KeyError):
                return False

        deadline = time.monotonic() + 60
        while not front_failed() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert front_failed(), "the front camera was not reported failed"
        before = len([e for e in events_of(subscriber) if e["camera"] == "back"])
        # The back camera keeps producing events after the front one failed.
        assert subscriber.wait_for(lambda m: sum(1 for t, p, _ in m if t.endswith("/events")
                                                 and json.loads(p)["camera"] == "back") >= before + 3, 60)
        assert proc.poll() is None, "the daemon stopped with one camera left"
        # `faceberry status` shows each camera of the running daemon.
        shown = module("device", "status", "--state-dir", str(tmp_path / "state"), timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "camera   front: failed" in shown.stdout and "camera   back: ok" in shown.stdout, shown.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, timeout=60)
    assert rc == 0, err[-3000:]
    assert "camera front failed" in err and "disappeared" in err
    status = json.loads((tmp_path / "state" / f"status-{DEVICE}.json").read_text())
    assert status["cameras"]["front"]["state"] == "failed" and status["cameras"]["back"]["frames"] > 0


def test_home_assistants_face_event_carries_the_camera() -> None:
    jinja2 = pytest.importorskip("jinja2")
    from faceberry.device.outputs import homeassistant as ha

    (event,) = [c for topic, c in ha.discovery("faceberry", "d1", ["alice"]) if "/event/" in topic]
    env = jinja2.Environment()
    env.filters["to_json"] = json.dumps
    payload = {"label": "alice", "score": 0.9, "track_id": 3, "model": "b1", "event_id": "e", "camera": "back"}
    assert json.loads(env.from_string(event["value_template"]).render(value_json=payload))["camera"] == "back"
