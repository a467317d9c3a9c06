"""Commands from Home Assistant (or any MQTT client) on `<prefix>/<device_id>/command`: untrusted input.

A command is one JSON object of at most `homeassistant.command_max_bytes` bytes, e.g.

    {"command": "name_last_unknown", "name": "Alice"}
    {"command": "name_stranger", "stranger_id": "s-3f2a9c1e", "name": "Alice"}
    {"command": "wrong", "event_id": "60b4e4b6-...", "not": "Alice"}   (both optional: the last event, its label)
    {"command": "undo"}                                                (the last correction)
    {"command": "forget"}  /  {"command": "forget", "stranger_id": "s-3f2a9c1e"}

Unknown commands, unknown keys, wrong types, oversized or non-UTF-8 messages are refused. Every message,
accepted or refused, is logged and answered on `<prefix>/<device_id>/command/result` with
`{"schema": 1, "command": ..., "ok": ..., "message": ..., "request_id": ..., "at": ...}`. The MQTT layer only
queues messages (device/mqtt.py); the frame loop parses and runs them (device/service.py), so nothing
here runs in paho's thread.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from device.events import SCHEMA_VERSION, iso_utc

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
RequestId = Annotated[str, Field(min_length=1, max_length=64)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: RequestId | None = Field(None, description="echoed in the result, to match answers to requests")


class NameLastUnknown(_Command):
    command: Literal["name_last_unknown"]
    name: Name


class NameStranger(_Command):
    command: Literal["name_stranger"]
    stranger_id: Annotated[str, Field(min_length=1, max_length=64)]
    name: Name


class Wrong(_Command):
    command: Literal["wrong"]
    event_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    not_: Name | None = Field(None, alias="not")


class Undo(_Command):
    command: Literal["undo"]


class Forget(_Command):
    command: Literal["forget"]
    stranger_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None


Command = Annotated[NameLastUnknown | NameStranger | Wrong | Undo | Forget, Field(discriminator="command")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Command)
NAMES = ("name_last_unknown", "name_stranger", "wrong", "undo", "forget")


class CommandError(ValueError):
    """A refused message; `command` is its command name when one could be read."""

    def __init__(self, message: str, command: str | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.request_id = request_id


def parse(payload: bytes, max_bytes: int) -> Any:
    """The validated command in `payload`, or CommandError saying why it is refused."""
    if len(payload) > max_bytes:
        raise CommandError(f"message of {len(payload)}+ bytes refused: the limit is {max_bytes} "
                           "(homeassistant.command_max_bytes)")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"not a JSON object in UTF-8 ({exc})") from None
    if not isinstance(data, dict):
        raise CommandError(f"not a JSON object but {type(data).__name__}")
    name = data.get("command") if isinstance(data.get("command"), str) else None
    request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
    if name not in NAMES:
        raise CommandError(f"unknown command {data.get('command')!r}; known: {', '.join(NAMES)}", None, request_id)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'message'}: {e['msg']}"
                             for e in exc.errors())
        raise CommandError(f"{name}: {problems}", name, request_id) from None


def result_payload(*, command: str | None, ok: bool, message: str, request_id: str | None = None,
                   at: float | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON answer on <prefix>/<device_id>/command/result."""
    return {"schema": SCHEMA_VERSION, "command": command, "ok": bool(ok), "message": message,
            "request_id": request_id, "at": iso_utc(time.time() if at is None else at), **extra}
