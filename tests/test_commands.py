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
