"""Command messages are untrusted input: validated by faceberry.device.messaging.commands.parse, refused with a
reason."""

from __future__ import annotations

import json

import pytest

from faceberry.device.messaging import commands
from faceberry.device.messaging.commands import CommandError, parse

LIMIT = 4096


def test_each_documented_command_parses() -> None:
    cmd = parse(b'{"command": "name_last_unknown", "name": "Alice"}', LIMIT)
    assert (cmd.command, cmd.name) == ("name_last_unknown", "Alice")
    cmd = parse(b'{"command": "wrong", "event_id": "e-1", "not": "Alice", "request_id": "r1"}', LIMIT)
    assert (cmd.event_id, cmd.not_, cmd.request_id) == ("e-1", "Alice", "r1")
    assert parse(b'{"command": "wrong"}', LIMIT).event_id is None
    assert parse(b'{"command": "undo"}', LIMIT).command == "undo"
    assert parse(b'{"command": "forget"}', LIMIT).stranger_id is None
    assert parse(b'{"command": "forget", "stranger_id": "s-1"}', LIMIT).stranger_id == "s-1"
    assert parse(b'{"command": "name_stranger", "stranger_id": "s-1", "name": "Bob"}', LIMIT).name == "Bob"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"x" * (LIMIT + 1), "limit is 4096"),
    (b"\xff\xfe", "UTF-8"),
    (b"not json", "JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"command": "format_disk"}', "unknown command 'format_disk'"),
    (b'{"name": "Alice"}', "unknown command None"),
    (b'{"command": "name_last_unknown"}', "name: Field required"),
    (b'{"command": "name_last_unknown", "name": ""}', "name:"),
    (b'{"command": "name_last_unknown", "name": 5}', "name:"),
    (b'{"command": "name_last_unknown", "name": "a\\nb"}', "name:"),
    (b'{"command": "name_last_unknown", "name": "' + b"a" * 65 + b'"}', "name:"),
    (b'{"command": "undo", "extra": 1}', "extra: Extra inputs are not permitted"),
    (b'{"command": "wrong", "not": ["Alice"]}', "not:"),
])
def test_malformed_messages_are_refused_with_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(payload, LIMIT)
    assert reason in str(info.value)


def test_a_refusal_keeps_the_command_and_request_id_it_could_read() -> None:
    with pytest.raises(CommandError) as info:
        parse(b'{"command": "wrong", "event_id": 3, "request_id": "abc"}', LIMIT)
    assert (info.value.command, info.value.request_id) == ("wrong", "abc")


def test_result_payload() -> None:
    out = commands.result_payload(command="undo", ok=False, message="no correction to undo", request_id="r", at=0)
    assert out == {"schema": 1, "command": "undo", "ok": False, "message": "no correction to undo",
                   "request_id": "r", "at": "1970-01-01T00:00:00.000Z"}
    json.dumps(out)


@pytest.mark.broker
def test_the_publisher_subscribes_again_after_the_broker_comes_back(mosquitto_factory, tmp_path) -> None:
    import threading
    import time

    import paho.mqtt.publish as mqtt_publish

    from faceberry.device.messaging.mqtt import MqttPublisher
    from tests.plugins.daemon import mqtt_cfg

    broker = mosquitto_factory()  # not persistent: the restarted broker knows no subscriptions
    got: list[tuple[str, bytes, str]] = []
    arrived = threading.Event()

    def handler(topic: str, payload: bytes, retain: bool) -> None:
        got.append((topic, payload, threading.current_thread().name))
        arrived.set()

    pub = MqttPublisher(mqtt_cfg(broker), "cmd", outbox=tmp_path / "outbox.sqlite3")
    pub.subscribe("faceberry/cmd/command", handler)
    with pytest.raises(ValueError, match="exact topics"):
        pub.subscribe("faceberry/+/command", handler)
    pub.start()
    try:
        def send_until_received(payload: bytes) -> bool:
            arrived.clear()
            for _ in range(20):  # the subscription may be a moment behind the connection
                mqtt_publish.single("faceberry/cmd/command", payload, qos=1, hostname=broker.host, port=broker.port)
                if arrived.wait(0.5):
                    return True
            return False

        assert pub.wait_connected(10)
        assert send_until_received(b"first")
        broker.stop()
        broker.start()
        deadline = time.monotonic() + 20
        while pub.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pub.connects == 2
        assert send_until_received(b"second")
    finally:
        pub.stop()
    assert got[0][1] == b"first" and got[-1][1] == b"second"
    # Delivered in paho's network thread, not the caller's: the handler must only queue.
    assert all(name != threading.main_thread().name for _, _, name in got)


# --- what Home Assistant's text box and "wrong" button send --------------------------------------------------

class _This:
    """Home Assistant's `this` in an MQTT template: the entity's own state, with its attributes."""

    def __init__(self, attributes: dict) -> None:
        self.attributes = attributes


def _render(template: str, **variables) -> str:
    # The same way tests/test_homeassistant.py renders value templates: jinja2 with HA's to_json filter.
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.filters["to_json"] = json.dumps
    return env.from_string(template).render(**variables)


def _command_entities() -> dict[str, dict]:
    from faceberry.device.outputs import homeassistant as ha

    configs = ha.discovery("faceberry", "door", ["alice"], commands=True)
    return {topic.split("/")[3].removeprefix("faceberry_door_"): config for topic, config in configs
            if topic.split("/")[1] in ("text", "button")}


def _event(label: str, event_id: str, **extra) -> dict:
    return {"schema": 1, "event_id": event_id, "label": label, "timestamp": "2026-01-31T08:15:02.123Z",
            "score": 0.5, **extra}


def test_the_text_box_names_the_unknown_face_it_showed_not_the_newest() -> None:
    text = _command_entities()["name_last_unknown"]
    assert text["json_attributes_topic"] == "faceberry/door/events"
    attrs: dict = {}
    # An unknown face, then Alice: the text box keeps the unknown face's event as its attributes.
    for event in (_event("unknown", "e-unknown-1", stranger_id="s-0000abcd"), _event("alice", "e-alice-1")):
        attrs = json.loads(_render(text["json_attributes_template"], value_json=event, this=_This(attrs)))
    assert attrs["event_id"] == "e-unknown-1" and attrs["stranger_id"] == "s-0000abcd", attrs
    cmd = parse(_render(text["command_template"], value="Carol", this=_This(attrs)).encode(), LIMIT)
    assert (cmd.command, cmd.name, cmd.event_id) == ("name_last_unknown", "Carol", "e-unknown-1")
    # A name with quotes and non-ASCII letters stays one JSON string.
    cmd = parse(_render(text["command_template"], value='Zoë "Z"', this=_This(attrs)).encode(), LIMIT)
    assert cmd.name == 'Zoë "Z"'
    # Nothing seen since Home Assistant started: no event id, the daemon takes the newest unknown face.
    for this in (_This({}), None):
        cmd = parse(_render(text["command_template"], value="Carol", this=this).encode(), LIMIT)
        assert cmd.event_id is None


def test_the_wrong_button_corrects_the_recognition_it_showed() -> None:
    button = _command_entities()["wrong"]
    attrs: dict = {}
    for event in (_event("alice", "e-alice-1"), _event("unknown", "e-unknown-2")):
        attrs = json.loads(_render(button["json_attributes_template"], value_json=event, this=_This(attrs)))
    assert (attrs["event_id"], attrs["label"]) == ("e-alice-1", "alice")
    cmd = parse(_render(button["command_template"], value=button["payload_press"], this=_This(attrs)).encode(),
                LIMIT)
    assert (cmd.command, cmd.event_id, cmd.not_) == ("wrong", "e-alice-1", None)
    cmd = parse(_render(button["command_template"], value=button["payload_press"], this=None).encode(), LIMIT)
    assert (cmd.command, cmd.event_id) == ("wrong", None)
    # undo and forget bind to no face: their payload is fixed.
    entities = _command_entities()
    assert {json.loads(entities[k]["payload_press"])["command"] for k in ("undo", "forget")} == {"undo", "forget"}
    assert "command_template" not in entities["undo"] and "command_template" not in entities["forget"]


# --- names: what they become in topics and Home Assistant ids ----------------------------------------------

@pytest.mark.parametrize(("name", "reason"), [
    ("Ann Lee", "the same MQTT topic as 'Ann_Lee' (both become person/Ann_Lee)"),
    ("Ann_Lee/", "the same MQTT topic as 'Ann_Lee'"),
    ("ann_lee", "differ only in case"),
    ("/", "becomes '_'"),
    ("+#", "becomes '_'"),
    ("..", "becomes '_'"),
    ("_ _", "becomes '_'"),
    ("Unknown", "reserved label 'unknown'"),
    ("unknown/", "reserved label 'unknown'"),
    ("Zoé", "the same Home Assistant unique id as 'Zoë'"),
])
def test_a_name_that_collides_in_topics_or_ids_is_refused_with_the_reason(name: str, reason: str) -> None:
    from faceberry.device.recognition.enroll import name_problem

    problem = name_problem(name, ["Ann_Lee", "Bob", "张伟", "Zoë"])
    assert problem is not None and reason in problem, problem
    assert "choose" in problem  # the fix


def test_names_that_stay_apart_are_accepted() -> None:
    from faceberry.device.recognition.enroll import name_problem

    # Names with no ASCII letter or digit carry a hash of themselves in their unique ids: 李娜 and 张伟
    # (both `__` without it) stay apart.
    for name in ("Carol", "Ann Leigh", "Zoë", "李娜", "李娜娜", "Олег", "Bob2"):
        assert name_problem(name, ["Ann_Lee", "Bob", "张伟"]) is None, name
    assert name_problem("Bob", ["Bob"]) is None  # the caller says "already enrolled, pass --replace"
    assert name_problem("Bob", ["Bob"], replace=True) is None
    assert "--replace" in name_problem("bob", ["Bob"], replace=True)


def test_enroll_refuses_a_name_that_collides_with_someone_in_the_bundle(gallery_bundle, tmp_path) -> None:
    from faceberry.bundle import load_bundle
    from faceberry.device.recognition.enroll import EnrollError, enroll

    person = next(lab for lab in load_bundle(gallery_bundle).labels if "_" in lab)  # LFW names: First_Last
    photos = tmp_path / "photos"
    photos.mkdir()
    for twin in (person.replace("_", " "), person + "/", person.lower()):
        with pytest.raises(EnrollError, match=f"as '{person}'"):
            enroll(gallery_bundle, twin, photos, min_photos=1)
