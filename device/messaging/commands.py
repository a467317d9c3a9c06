"""Commands from Home Assistant (or any MQTT client) on `<prefix>/<device_id>/command`: untrusted input.

A command is one JSON object of at most `homeassistant.command_max_bytes` bytes, e.g.

    {"command": "name_last_unknown", "name": "Alice"}                 (event_id optional: that unknown face)
    {"command": "name_stranger", "stranger_id": "s-3f2a9c1e", "name": "Alice"}
    {"command": "wrong", "event_id": "60b4e4b6-...", "not": "Alice"}   (both optional: the last event, its label)
    {"command": "undo"}                                                (the last correction)
    {"command": "forget"}  /  {"command": "forget", "stranger_id": "s-3f2a9c1e"}
    {"command": "forget", "name": "Ann"}                               (a person: out of the bundle, every device's)

Unknown commands, unknown or repeated keys, wrong types, nesting deeper than `MAX_DEPTH`, ids outside
`ID_PATTERN`, names with control characters, oversized or non-UTF-8 messages are refused: `parse()` turns
every failure, whatever it is, into a `CommandError` whose message is one line without control characters
(`safe_text`), so nothing a sender writes can forge a log line or end the daemon. Every message, accepted or
refused, is logged and answered on `<prefix>/<device_id>/command/result` with
`{"schema": 1, "command": ..., "ok": ..., "message": ..., "request_id": ..., "at": ...}`. paho hands each
message to device/messaging/command_runner.py, which only queues it; its own thread parses and runs them (never the
frame loop's), so nothing here runs in paho's thread, except the refusal of a message that finds the queue
full.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from faceberry.device.outputs.events import SCHEMA_VERSION, iso_utc

# A command is a flat object; a little room for wrong types ({"not": ["Alice"]}) keeps their refusal specific.
# json.loads recurses once per level, so a deep message ("[" * 990) must be refused before it is parsed.
MAX_DEPTH = 8
# Event ids are UUIDs, stranger ids `s-` + 8 hex digits, request ids whatever the sender chose within this:
# nothing that could split a log line, a topic or a path.
ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ : -"
# Zero-width (non-)joiners are format characters some scripts' names need; every other one (bidi overrides,
# invisible separators) and every control, surrogate, private-use or unassigned character is refused in
# names and escaped in messages.
_ALLOWED_FORMAT = frozenset("\u200c\u200d")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn", "Zl", "Zp"})


def _unsafe(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category in _UNSAFE_CATEGORIES or (category == "Cf" and ch not in _ALLOWED_FORMAT)


def safe_text(text: Any, limit: int = 160) -> str:
    """`text` as one printable line for a log or an answer: unsafe characters escaped (`\\n`, `\\x00`,
    `\\u202e`), cut to about `limit` characters."""
    out = []
    size = 0
    for ch in str(text):
        piece = ascii(ch)[1:-1] if _unsafe(ch) else ch
        size += len(piece)
        if size > limit:
            out.append("…")
            break
        out.append(piece)
    return "".join(out)


def _check_name(value: str) -> str:
    bad = next((ch for ch in value if _unsafe(ch)), None)
    if bad is not None:
        raise ValueError(f"a name may not contain the control or invisible character U+{ord(bad):04X}")
    if not value.strip():
        raise ValueError("a name may not be only spaces")
    return value


def _check_id(value: str) -> str:
    if not ID_PATTERN.match(value):
        raise ValueError(f"must be {ID_RULE}")
    return value


Name = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_check_name)]
Id = Annotated[str, AfterValidator(_check_id)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: Id | None = Field(None, description="echoed in the result, to match answers to requests")


class NameLastUnknown(_Command):
    command: Literal["name_last_unknown"]
    name: Name
    event_id: Id | None = Field(None, description="the unknown face to name (default: the most recent one)")


class NameStranger(_Command):
    command: Literal["name_stranger"]
    stranger_id: Id
    name: Name


class Wrong(_Command):
    command: Literal["wrong"]
    event_id: Id | None = None
    not_: Name | None = Field(None, alias="not")


class Undo(_Command):
    command: Literal["undo"]


class Forget(_Command):
    command: Literal["forget"]
    stranger_id: Id | None = None
    name: Name | None = Field(None, description="a person enrolled: removed from the bundle (and, with the "
                                                "shared library, from every device's)")


Command = Annotated[NameLastUnknown | NameStranger | Wrong | Undo | Forget, Field(discriminator="command")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Command)
NAMES = ("name_last_unknown", "name_stranger", "wrong", "undo", "forget")


class CommandError(ValueError):
    """A refused message; `command` is its command name when one could be read, `request_id` its request
    id when it was a valid one. The message is one line without control characters."""

    def __init__(self, message: str, command: str | None = None, request_id: str | None = None) -> None:
        super().__init__(safe_text(message, 400))
        self.command = command
        self.request_id = request_id


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys: {"command": "undo", "command": "forget"} would run forget.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """How deep `[`/`{` nest in the JSON `text` (strings skipped), counting no further than `limit` + 1."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


def _safe_id(value: Any) -> str | None:
    return value if isinstance(value, str) and ID_PATTERN.match(value) else None


def parse(payload: bytes, max_bytes: int) -> Any:
    """The validated command in `payload`, or CommandError saying why it is refused (never anything else)."""
    try:
        return _parse(payload, max_bytes)
    except CommandError:
        raise
    except Exception as exc:  # whatever slipped through (a parser's limit, memory): refused, never fatal
        raise CommandError(f"unreadable message ({type(exc).__name__}: {exc})") from None


def _parse(payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise CommandError(f"message of {len(payload)}+ bytes refused: the limit is {max_bytes} "
                           "(homeassistant.command_max_bytes)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"not a JSON object in UTF-8 ({exc})") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise CommandError(f"not a command: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as exc:
        raise CommandError(f"key {safe_text(repr(exc.args[0]), 80)} appears twice; send each key once") from None
    except ValueError as exc:
        raise CommandError(f"not a JSON object in UTF-8 ({exc})") from None
    if not isinstance(data, dict):
        raise CommandError(f"not a JSON object but {type(data).__name__}")
    name = data.get("command") if isinstance(data.get("command"), str) else None
    request_id = _safe_id(data.get("request_id"))
    if name not in NAMES:
        raise CommandError(f"unknown command {safe_text(repr(data.get('command')), 80)}; known: {', '.join(NAMES)}",
                           None, request_id)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{safe_text('.'.join(str(p) for p in e['loc'][1:]), 40) or 'message'}: {e['msg']}"
                             for e in exc.errors())
        raise CommandError(f"{name}: {problems}", name, request_id) from None


def result_payload(*, command: str | None, ok: bool, message: str, request_id: str | None = None,
                   at: float | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON answer on <prefix>/<device_id>/command/result."""
    return {"schema": SCHEMA_VERSION, "command": command, "ok": bool(ok), "message": message,
            "request_id": request_id, "at": iso_utc(time.time() if at is None else at), **extra}
