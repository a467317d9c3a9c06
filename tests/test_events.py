"""Topics and payloads as pure functions (no broker), and the per-label cooldown with a fake clock."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest

from faceberry.device.outputs import events, homeassistant


def test_topics_follow_the_documented_layout() -> None:
    assert events.status_topic("faceberry", "door") == "faceberry/door/status"
    assert events.events_topic("faceberry", "door") == "faceberry/door/events"
    assert events.person_topic("faceberry", "door", "Ada Lovelace") == "faceberry/door/person/Ada_Lovelace"
    assert events.snapshot_topic("home/cams", "door", "bob") == "home/cams/door/snapshot/bob"


@pytest.mark.parametrize(
    ("label", "expected"),
    [("alice", "alice"), ("a/b", "a_b"), ("x+y", "x_y"), ("#all", "all"), ("a b\tc", "a_b_c"),
     ("", "_"), ("/", "_"), ("..", "_"), ("Zoë", "Zoë"), ("unknown", "unknown")],
)
def test_labels_are_sanitised_into_one_safe_topic_level(label: str, expected: str) -> None:
    safe = events.sanitize_label(label)
    assert safe == expected
    assert not set("+#/") & set(safe)
    assert events.person_topic("p", "d", label).count("/") == 3


@pytest.mark.parametrize("device_id", ["", "a/b", "a+b", "x" * 65, "with space"])
def test_bad_device_ids_are_refused(device_id: str) -> None:
    with pytest.raises(ValueError, match="device_id"):
        events.events_topic("faceberry", device_id)


def test_wildcard_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        events.status_topic("face#", "door")


def test_event_payload_has_every_documented_field() -> None:
    ts = 1_700_000_000.25
    payload = events.event_payload(
        device_id="door", camera="cam", label="alice", score=0.912345, bbox=[1.234, 2, 30.06, 40],
        track_id=7, frames=5, model="bundle-1", timestamp=ts,
    )
    decoded = json.loads(events.encode(payload))
    assert set(decoded) >= {"event_id", "device_id", "camera", "timestamp", "label", "score", "bbox", "track_id",
                            "frames", "model", "schema"}
    assert uuid.UUID(decoded["event_id"]).version == 4
    assert decoded["schema"] == events.SCHEMA_VERSION
    assert decoded["timestamp"] == "2023-11-14T22:13:20.250Z"
    parsed = datetime.strptime(decoded["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(parsed.timestamp() - ts) < 1e-3
    assert decoded["score"] == 0.9123
    assert decoded["bbox"] == [1.2, 2.0, 30.1, 40.0]
    assert (decoded["track_id"], decoded["frames"], decoded["label"], decoded["previous"]) == (7, 5, "alice", None)
    assert decoded["source"] is None  # live cameras have no file to name
    with_file = events.event_payload(device_id="d", camera="c", label="x", score=1, bbox=[0, 0, 1, 1], track_id=1,
                                     frames=1, model="m", timestamp=0.0, source="/photos/a.jpg")
    assert json.loads(events.encode(with_file))["source"] == "/photos/a.jpg"


def test_event_ids_are_unique() -> None:
    kwargs = dict(device_id="d", camera="c", label="x", score=1, bbox=[0, 0, 1, 1], track_id=1, frames=1,
                  model="m", timestamp=0.0)
    assert len({events.event_payload(**kwargs)["event_id"] for _ in range(50)}) == 50


def test_person_state_is_derived_from_the_event() -> None:
    event = events.event_payload(device_id="d", camera="c", label="bob", score=0.8, bbox=[0, 0, 1, 1],
                                 track_id=3, frames=4, model="m", timestamp=10.0, previous="unknown")
    state = events.person_state_payload(event)
    assert state["last_seen"] == event["timestamp"]
    assert (state["label"], state["event_id"], state["schema"]) == ("bob", event["event_id"], 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cooldown_is_per_label_and_expires() -> None:
    clock = FakeClock()
    cooldown = events.Cooldown(30, clock=clock)
    assert cooldown.fire("alice")
    assert not cooldown.fire("alice")  # standing in view
    assert cooldown.fire("bob")  # another person is not held back
    clock.now += 29.9
    assert not cooldown.fire("alice")
    clock.now += 0.1
    assert cooldown.fire("alice")
    assert not cooldown.fire("alice")
    assert cooldown.suppressed == 3


def test_zero_cooldown_never_suppresses_and_negative_is_refused() -> None:
    cooldown = events.Cooldown(0, clock=FakeClock())
    assert all(cooldown.fire("a") for _ in range(5))
    with pytest.raises(ValueError):
        events.Cooldown(-1)


def test_home_assistant_discovery_points_at_our_topics() -> None:
    configs = dict(homeassistant.discovery("faceberry", "door", ["alice", "Bob Smith"]))
    assert "homeassistant/sensor/faceberry_door/faceberry_door_Bob_Smith/config" in configs
    bob = configs["homeassistant/sensor/faceberry_door/faceberry_door_Bob_Smith/config"]
    assert bob["state_topic"] == "faceberry/door/person/Bob_Smith"
    assert bob["availability_topic"] == "faceberry/door/status"
    # Every entity its own unique id (the full entity list is tested in tests/test_homeassistant.py).
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)
