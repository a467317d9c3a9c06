"""Command messages are untrusted input: validated by device.commands.parse, refused with a reason."""

from __future__ import annotations

import json

import pytest

from device import commands
from device.commands import CommandError, parse

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

    from device.mqtt import MqttPublisher
    from tests.test_service_mqtt import mqtt_cfg

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
