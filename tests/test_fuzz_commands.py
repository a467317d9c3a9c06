"""Fuzz of the command topic (issue 21): hundreds of hostile payloads, made here from a seeded generator, through
`faceberry.device.messaging.commands.parse` and through the daemon's own handler (a real Service on the gallery bundle,
its answers
read back from the real outbox); then a real daemon against a real mosquitto, stopped and started with a
hostile message retained on its command topic.

What must hold: no traceback and no exception out of the handler, every message answered once, and every
refusal one line without control characters, in the answer and in the log. FACEBERRY_FUZZ_SEED draws
another sample (and replays one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import unicodedata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from faceberry.device.messaging.commands import MAX_DEPTH, CommandError, parse
from faceberry.device.outputs import homeassistant as ha
from tests.plugins.daemon import Daemon

SEED = int(os.environ.get("FACEBERRY_FUZZ_SEED", "21"))
LIMIT = 4096
DEVICE = "fuzzcam"
COMMAND_TOPIC = ha.command_topic("faceberry", DEVICE)
RESULT_TOPIC = ha.command_result_topic("faceberry", DEVICE)
# Characters a log line or a terminal must never receive raw: line breaks of every kind, NUL, escapes, bidi
# overrides, invisible separators, the byte-order mark, a lone surrogate.
NASTY = ["\n", "\r", "\x00", "\x1b[31m", "\t", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u2066", "\u200b",
         "\ufeff", "\ud800", "\x0bERROR forged"]
WRONG: list[Any] = [None, True, False, 0, -1, 2**70, 1.5, math.inf, "", [], ["x"], {}, {"a": 1}, "x" * 65]
FIELDS = {"name_last_unknown": ("name", "event_id"), "name_stranger": ("stranger_id", "name"),
          "wrong": ("event_id", "not"), "undo": (), "forget": ("stranger_id",)}


def _dump(obj: Any) -> bytes:
    # ensure_ascii keeps lone surrogates encodable: they arrive as \ud800 escapes, as a hostile sender writes them.
    return json.dumps(obj).encode("utf-8")


def _nesting_and_duplicates() -> list[tuple[str, bytes]]:
    # Deep nesting: the 990 '[' that ended the daemon, objects, mixtures, and depth hidden inside strings.
    cases: list[tuple[str, bytes]] = []
    for n in (MAX_DEPTH + 1, 50, 990, 4000):
        cases += [(f"{n} x [", b"[" * n), (f"{n} x {{\"a\":", b'{"a":' * n)]
    cases += [("[{ mixed 3000", b"[{\"a\":" * 1500),
              ("nesting after a valid command", b'{"command": "undo", "x": ' + b"[" * 990 + b"]" * 990 + b"}"),
              ("brackets inside a string", _dump({"command": "undo", "request_id": "[" * 60})),
              ("closing brackets first", b"]]]]]]]]]]}}}}}}}}" + b"[" * 20)]
    # Duplicate keys: the issue's undo/forget, and every other key twice.
    cases.append(("undo then forget", b'{"command":"undo","command":"forget"}'))
    cases += [(f"{command}: {key} twice", f'{{"command": "{command}", "{key}": "a", "{key}": "b"}}'.encode())
              for command, fields in FIELDS.items() for key in ("command", "request_id", *fields)]
    cases.append(("nested duplicate", b'{"command": "wrong", "not": {"a": 1, "a": 2}}'))
    return cases


def _wrong_fields() -> list[tuple[str, bytes]]:
    # Wrong types in every field of every command (every wrong value: the corpus is explicit, not sampled).
    cases = [(f"{command}: {key}={value!r:.20}", json.dumps({"command": command, key: value}, allow_nan=True).encode())
             for command, fields in FIELDS.items() for key in ("command", "request_id", *fields) for value in WRONG]
    # Control and invisible characters in every string field, in key names and in the command itself.
    for nasty in NASTY:
        cases += [(f"{command}: {key} with {nasty!r}", _dump({"command": command, key: f"a{nasty}b"}))
                  for command, fields in FIELDS.items() for key in ("request_id", *fields)]
        cases += [(f"key name with {nasty!r}", _dump({"command": "undo", f"k{nasty}ERROR": 1})),
                  (f"command name with {nasty!r}", _dump({"command": f"undo{nasty}ERROR forged"}))]
    # Ids with newlines and NUL, in the places the journal used to echo them.
    for key in ("event_id", "stranger_id", "request_id"):
        command = "wrong" if key == "event_id" else "forget"
        cases += [(f"{key} forging a log line", _dump({"command": command, key: "x\nERROR faceberry: forged line"})),
                  (f"{key} with NUL", _dump({"command": command, key: "a\x00b"})),
                  (f"{key} of 65", _dump({"command": command, key: "a" * 65})),
                  (f"{key} with a slash", _dump({"command": command, key: "../x"}))]
    return cases


def _numbers_bytes_and_shapes() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    # Huge numbers, NaN, infinities, in value and key places.
    for number in (b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b"9" * 4000, b"1" + b"0" * 400,
                   b"0.0000000000000000000000000000001", b"-0"):
        cases += [(f"number {number[:12]!r}", b'{"command": "undo", "request_id": ' + number + b"}"),
                  (f"bare number {number[:12]!r}", number)]
    # Not UTF-8, or UTF-8 a JSON parser should not like.
    cases += [(f"bytes {raw[:16]!r}", raw) for raw in (
        b"\xff\xfe", b'{"command": "undo\xc0\xaf"}', b'{"command": "und\xe2\x82"}', b'{"command": "undo"}\xff',
        b"\xef\xbb\xbf{\"command\": \"undo\"}", b"\x00" * 16, b'{"command": "name_last_unknown", "name": "\\ud800"}',
        b'{"command": "\\u0000undo"}')]
    # Not an object, empty, oversized, at the limit.
    cases += [(f"shape {raw!r}", raw)
              for raw in (b"", b" ", b"null", b"[]", b'"undo"', b"0", b"true", b"{", b"}", b'{"command"}', b"{}")]
    cases += [("over the limit", _dump({"command": "undo", "request_id": "r", "pad": "x" * LIMIT})),
              ("at the limit", b'{"command": "undo"' + b" " * (LIMIT - 19) + b"}")]
    # Names that look like someone else, or like nothing, in MQTT topics (refused when enrolled; here no
    # face is stored, so the answer says so).
    cases += [(f"name {name!r}", _dump({"command": "name_last_unknown", "name": name}))
              for name in ("Ann Lee", "Ann_Lee/", "/", "+#", "..", "unknown", " ", "\u200d", "a" * 64)]
    return cases


def hostile_payloads() -> list[tuple[str, bytes]]:
    """(what was done, payload): every kind the issue lists, several of each, as explicit examples. Random
    bytes and mutations of valid commands come from hypothesis (`random_payloads`)."""
    return _nesting_and_duplicates() + _wrong_fields() + _numbers_bytes_and_shapes()


VALID = [b'{"command": "name_last_unknown", "name": "Alice", "request_id": "r1"}',
         b'{"command": "wrong", "event_id": "60b4e4b6-1c1d-4e0b-9d6c-0b7d3f1b2a10", "not": "alice"}',
         b'{"command": "forget", "stranger_id": "s-3f2a9c1e"}', b'{"command": "undo"}']


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid command with 1-4 bytes flipped, runs cut out or runs repeated."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == 0 and data:
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            del data[at:at + draw(st.integers(1, 6))]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 8))] * draw(st.integers(1, 4))
    return bytes(data)


# Random bytes (up to 300) and mutations of valid commands: what the seeded generator drew before, now
# searched and shrunk by hypothesis. FACEBERRY_FUZZ_SEED replays another sample; unset, the sample is fixed.
random_payloads = st.one_of(st.binary(min_size=1, max_size=300), mutated())
FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize="FACEBERRY_FUZZ_SEED" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seeded(test: Any) -> Any:
    return seed(SEED)(test) if "FACEBERRY_FUZZ_SEED" in os.environ else test


def one_safe_line(text: str) -> bool:
    """No control, surrogate, line-separator or invisible character (the zero-width joiners aside)."""
    return all(unicodedata.category(c) not in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp")
               and (unicodedata.category(c) != "Cf" or c in "\u200c\u200d") for c in text)


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, bytes]]:
    return hostile_payloads()


def test_there_are_enough_cases_of_every_kind(cases: list[tuple[str, bytes]]) -> None:
    assert len(cases) >= 300, len(cases)
    assert len({what for what, _ in cases}) >= 250


def _parse_safely(what: str, payload: bytes) -> Any:
    """The parsed command, or None when refused with one safe line; anything else fails the test."""
    try:
        cmd = parse(payload, LIMIT)
    except CommandError as exc:
        message = str(exc)
        assert message and one_safe_line(message) and len(message) <= 420, (what, message)
        assert exc.request_id is None or exc.request_id.isascii(), what
        return None
    except BaseException as exc:  # the test's point: nothing else may ever come out
        pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    # What passes is a valid command with safe fields only (mutations may produce one).
    for value in cmd.model_dump().values():
        assert not isinstance(value, str) or one_safe_line(value), (what, cmd)
    return cmd


def test_parse_refuses_every_hostile_payload_with_one_safe_line(cases: list[tuple[str, bytes]]) -> None:
    accepted = [what for what, payload in cases if _parse_safely(what, payload) is not None]
    assert len(accepted) < len(cases) // 4, accepted


@FUZZ
@_seeded
@given(payload=random_payloads)
def test_parse_refuses_random_bytes_and_mutations_with_one_safe_line(payload: bytes) -> None:
    _parse_safely("random", payload)


@pytest.mark.parametrize(("payload", "reason"), [
    (b"[" * 990, f"nested deeper than {MAX_DEPTH}"),
    (b'{"command":"undo","command":"forget"}', "'command' appears twice"),
    (_dump({"command": "wrong", "event_id": "a\nERROR x"}), "event_id: Value error, must be 1-64 characters"),
    (_dump({"command": "forget", "stranger_id": "s-1\x00"}), "stranger_id: Value error"),
    (_dump({"command": "undo", "request_id": "r 1"}), "request_id: Value error"),
    (_dump({"command": "name_last_unknown", "name": "Ann\u202eLee"}), "U+202E"),
    (_dump({"command": "undo", "\nERROR": 1}), "\\nERROR: Extra inputs"),
    (_dump({"command": "undo\nERROR forged"}), "unknown command 'undo\\nERROR forged'"),
    (b"9" * 4500, "not a JSON object"),
])
def test_the_refusal_names_the_problem(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(payload, 8192)
    assert reason in str(info.value) and one_safe_line(str(info.value))


def test_ids_the_daemon_makes_are_valid() -> None:
    import uuid

    import numpy as np

    from faceberry.device.memory.strangers import StrangerMemory

    event_id = str(uuid.uuid4())
    memory = StrangerMemory(None, 0.5)
    stranger, _ = memory.observe(np.ones(8, np.float32) / math.sqrt(8))
    cmd = parse(_dump({"command": "wrong", "event_id": event_id, "request_id": "ha:2026-01-31T08.15_x"}), LIMIT)
    assert (cmd.event_id, cmd.request_id) == (event_id, "ha:2026-01-31T08.15_x")
    assert parse(_dump({"command": "forget", "stranger_id": stranger.stranger_id}), LIMIT).stranger_id


# --- the daemon's own handler, in process --------------------------------------------------------------------

@pytest.fixture
def service(tmp_path: Path, gallery_bundle: Path):
    """A real daemon (faceberry.device.app.build) on the gallery bundle with commands on, never started: its publisher
    writes the answers to the real outbox, where the test reads them back."""
    from faceberry.device.app import build
    from faceberry.device.config import load_config
    from tests.plugins.daemon import write_config

    camera = tmp_path / "camera"
    camera.mkdir()
    config = write_config(tmp_path / "config.yaml", gallery_bundle, SimpleNamespace(host="127.0.0.1", port=1),
                          {"device": str(camera)}, homeassistant={"commands": True},
                          memory={"strangers": True}, events={"homeassistant": True})
    data = config.read_text().replace("device_id: testcam", f"device_id: {DEVICE}")
    config.write_text(data)
    svc = build(load_config(config))
    yield svc
    svc.publisher.outbox.close()


class Inbound:
    """The daemon's way in, driven by hand: `_queue` hands a message over as paho's per-topic callbacks do
    (the command runner's, or Home Assistant's status to the discovery output), `tick` is one loop turn
    (the dispatcher's Tick) and one turn of the command runner's thread (never started here)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.faces = app.faces

    def _queue(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic == self.app.topics.ha_status:
            self.app.discovery.ha_status(topic, payload, retain)
        else:
            self.app.commands.receive(topic, payload, retain)

    def tick(self) -> None:
        from faceberry.device.messaging.dispatcher import Tick

        self.app.dispatcher.notify(Tick())
        self.app.commands.drain()

    def stats(self) -> dict:
        return self.app.dispatcher.stats()["memory"]


def answers(svc: Any) -> list[dict]:
    return [json.loads(m.payload) for m in svc.publisher.outbox.after(0, 100_000) if m.topic == RESULT_TOPIC]


def test_the_handler_answers_every_hostile_message_and_logs_one_safe_line(
        service: Any, cases: list[tuple[str, bytes]], caplog: pytest.LogCaptureFixture) -> None:
    assistant = Inbound(service)
    caplog.set_level(logging.DEBUG, logger="faceberry")
    sent = 0
    # A retained payload is answered once per process (the daemon keeps the first LIMIT + 1 bytes of each).
    unique = {payload[:LIMIT + 1]: what for what, payload in reversed(cases)}
    for payload, what in unique.items():
        for retain in (False, True):
            before = len(answers(service))
            try:
                assistant._queue(COMMAND_TOPIC, payload, retain)
                assistant.tick()
            except BaseException as exc:
                pytest.fail(f"{what} (retain={retain}): {type(exc).__name__}: {exc}")
            got = answers(service)[before:]
            if not payload:
                assert got == [], what  # an empty message clears a retained one: not a command
                continue
            sent += 1
            assert len(got) == 1, (what, retain, got)
            assert one_safe_line(got[0]["message"]), (what, got[0])
            if retain:
                assert got[0]["ok"] is False and "retained command ignored" in got[0]["message"], (what, got[0])
    records = [r for r in caplog.records if r.name.startswith("faceberry")]
    assert records and all(r.exc_info is None for r in records), [r.getMessage() for r in records if r.exc_info]
    for record in records:
        assert one_safe_line(record.getMessage()), record.getMessage()
    assert "Traceback" not in caplog.text
    stats = assistant.stats()
    assert stats["commands_accepted"] + stats["commands_refused"] == sent


@settings(FUZZ, max_examples=48)
@_seeded
@given(payload=random_payloads)
def test_the_handler_answers_random_bytes_and_mutations_once(service: Any, payload: bytes) -> None:
    # The 8 random and 40 mutated payloads the seeded generator gave the handler before, drawn by hypothesis.
    assistant = Inbound(service)
    before = len(answers(service))
    assistant._queue(COMMAND_TOPIC, payload, False)
    assistant.tick()
    got = answers(service)[before:]
    if not payload:  # a mutation cut to nothing: an empty message clears a retained one, it is not a command
        assert got == []
        return
    assert len(got) == 1 and one_safe_line(got[0]["message"]), got


def test_a_burst_beyond_the_inbox_is_answered_busy_not_dropped(service: Any) -> None:
    from faceberry.device.messaging.command_runner import INBOX_SIZE

    assistant = Inbound(service)
    for i in range(INBOX_SIZE + 20):
        assistant._queue(COMMAND_TOPIC, _dump({"command": "undo", "request_id": f"b{i}"}), False)
    busy = answers(service)
    assert len(busy) == 20 and {a["request_id"] for a in busy} == {f"b{i}" for i in range(INBOX_SIZE, INBOX_SIZE + 20)}
    assert all(a["ok"] is False and a["message"].startswith(f"busy: {INBOX_SIZE} commands waiting") for a in busy)
    assistant.tick()
    every = answers(service)
    assert sorted(a["request_id"] for a in every) == sorted(f"b{i}" for i in range(INBOX_SIZE + 20))
    assert assistant.stats()["commands_refused"] == INBOX_SIZE + 20


def test_a_retained_command_is_answered_once_and_cleared(service: Any) -> None:
    assistant = Inbound(service)
    payload = _dump({"command": "forget", "request_id": "r-old"})
    for _ in range(3):  # a start and two reconnections replay it
        assistant._queue(COMMAND_TOPIC, payload, True)
        assistant.tick()
    got = answers(service)
    assert len(got) == 1 and got[0]["request_id"] == "r-old" and "retained command ignored" in got[0]["message"]
    cleared = [m for m in service.publisher.outbox.after(0, 1000) if m.topic == COMMAND_TOPIC]
    assert [(m.payload, m.retain) for m in cleared] == [(b"", True)]
    # The same command published live runs.
    assistant._queue(COMMAND_TOPIC, payload, False)
    assistant.tick()
    assert answers(service)[-1]["ok"] is True


# --- a real daemon and a real mosquitto ---------------------------------------------------------------------


def daemon_config(tmp_path: Path, bundle: Path, broker, camera: Path) -> Path:
    import yaml

    from tests.plugins.daemon import write_config

    config = write_config(tmp_path / "config.yaml", bundle, broker, {"device": str(camera), "loop": True, "fps": 8},
                          homeassistant={"commands": True}, events={"homeassistant": True})
    data = yaml.safe_load(config.read_text())
    data["device_id"] = DEVICE
    config.write_text(yaml.safe_dump(data))
    return config


def results(sub: Any, start: int = 0) -> list[dict]:
    return [json.loads(p) for t, p, _ in list(sub.messages)[start:] if t == RESULT_TOPIC]


def send(broker, payload: bytes, retain: bool = False) -> None:
    mqtt_publish.single(COMMAND_TOPIC, payload, qos=1, retain=retain, hostname=broker.host, port=broker.port)


def retained_on(broker, topic: str, wait: float = 1.5) -> bytes | None:
    from tests.plugins.broker import Subscriber

    sub = Subscriber(broker.host, broker.port, topic)
    time.sleep(wait)
    sub.close()
    kept = [p for _, p, r in sub.messages if r]
    return kept[-1] if kept else None


def corrections(state: Path) -> int:
    path = state / f"negatives-{DEVICE}.json"
    return len(json.loads(path.read_text())["corrections"]) if path.is_file() else 0


@pytest.mark.broker
def test_hostile_and_retained_commands_never_stop_the_daemon_across_restarts(
        tmp_path, mosquitto_factory, gallery_bundle, heldout_photos) -> None:
    from tests.plugins.broker import Subscriber
    from tests.plugins.daemon import folder_of_photos

    broker = mosquitto_factory()
    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=1, broken=False)
    config = daemon_config(tmp_path, gallery_bundle, broker, camera)
    sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/#")
    events = f"faceberry/{DEVICE}/events"
    try:
        # The 990 '[' retained before the daemon ever started: it starts, answers, runs on.
        send(broker, b"[" * 990, retain=True)
        d = Daemon(config, stays_up=True)
        assert sub.wait_for(lambda m: any(json.loads(p)["label"] != "unknown" for t, p, _ in m if t == events), 120), \
            "".join(d.log)[-3000:]
        assert sub.wait_for(lambda m: len(results(sub)) >= 1, 30)
        first = results(sub)[0]
        assert first["ok"] is False and "retained command ignored" in first["message"], first
        # Not retained: refused for its nesting, the daemon runs on.
        mark = len(sub.messages)
        send(broker, b"[" * 990)
        assert sub.wait_for(lambda m: len(results(sub, mark)) >= 1, 30)
        assert "nested deeper" in results(sub, mark)[0]["message"]
        # Published retained while the daemon listens: it is live, so it runs (once).
        mark = len(sub.messages)
        send(broker, b'{"command": "wrong", "request_id": "w1"}', retain=True)
        assert sub.wait_for(lambda m: len(results(sub, mark)) >= 1, 30)
        assert results(sub, mark)[0]["ok"] is True, results(sub, mark)
        err = d.stop()
        assert corrections(tmp_path / "state") == 1
        assert retained_on(broker, COMMAND_TOPIC) == b'{"command": "wrong", "request_id": "w1"}'

        # Restart: the retained "wrong" is answered as ignored, does not run again, and is cleared.
        mark = len(sub.messages)
        d = Daemon(config, stays_up=True)
        assert sub.wait_for(lambda m: len(results(sub, mark)) >= 1, 60), "".join(d.log)[-3000:]
        again = results(sub, mark)[0]
        assert again["ok"] is False and again["request_id"] == "w1" and "retained" in again["message"], again
        time.sleep(1.0)  # a second answer, or a second correction, would come now
        err += d.stop()
        assert len(results(sub, mark)) == 1 and corrections(tmp_path / "state") == 1
        assert retained_on(broker, COMMAND_TOPIC) is None

        # Once more: nothing retained any more, nothing answered, the daemon starts and stops cleanly.
        mark = len(sub.messages)
        d = Daemon(config, stays_up=True)
        assert sub.wait_for(lambda m: any(t == events for t, _, _ in m[mark:]), 120)
        err += d.stop()
        assert results(sub, mark) == []
    finally:
        sub.close()
    assert err.count("retained command ignored") == 2
    for line in err.splitlines():
        assert one_safe_line(line), line


@pytest.mark.broker
def test_a_burst_of_1000_commands_gets_1000_answers(tmp_path, mosquitto_factory, gallery_bundle) -> None:
    import cv2
    import numpy as np
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.plugins.broker import Subscriber

    broker = mosquitto_factory()
    camera = tmp_path / "camera"
    camera.mkdir()
    for i in range(3):
        cv2.imwrite(str(camera / f"blank_{i}.jpg"), np.full((120, 160, 3), 128, np.uint8))
    config = daemon_config(tmp_path, gallery_bundle, broker, camera)
    sub = Subscriber(broker.host, broker.port, RESULT_TOPIC)
    d = Daemon(config, stays_up=True)
    try:
        online = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/status")
        assert online.wait_for(lambda m: any(p == b"online" for _, p, _ in m), 60), "".join(d.log)[-3000:]
        online.close()
        time.sleep(1.0)  # the daemon subscribes right after its connection
        client = paho.Client(CallbackAPIVersion.VERSION2)
        client.max_inflight_messages_set(100)
        client.connect(broker.host, broker.port)
        client.loop_start()
        infos = [client.publish(COMMAND_TOPIC, _dump({"command": "undo", "request_id": f"burst-{i}"}), qos=1)
                 for i in range(1000)]
        for info in infos:
            info.wait_for_publish(30)
        client.disconnect()
        client.loop_stop()
        wanted = {f"burst-{i}" for i in range(1000)}
        assert sub.wait_for(lambda m: wanted <= {json.loads(p)["request_id"] for _, p, _ in m}, 120), \
            len(sub.messages)
    finally:
        err = d.stop()
        sub.close()
    got = [json.loads(p) for _, p, _ in sub.messages]
    assert len(got) == 1000 and all(a["ok"] is False for a in got)
    messages = {a["message"] for a in got}
    assert messages <= {"no correction to undo"} | {m for m in messages if m.startswith("busy: ")}, messages
    assert "refused" in err


def test_a_flood_of_home_assistant_online_is_one_publication(service: Any, caplog: pytest.LogCaptureFixture) -> None:
    assistant = Inbound(service)
    caplog.set_level(logging.INFO, logger="faceberry.device.outputs.assistant")
    for i in range(200):
        # Home Assistant's birth message is usually retained: that is normal, and it still counts.
        assistant._queue("homeassistant/status", b"online", i % 2 == 0)
    assistant._queue(COMMAND_TOPIC, _dump({"command": "undo", "request_id": "after-flood"}), False)
    assistant.tick()
    assert caplog.text.count("home assistant is online: publishing discovery and availability again") == 1
    # The flood took no command's place: the command behind it was run and answered.
    assert answers(service)[-1]["request_id"] == "after-flood"
    assistant.tick()
    assert caplog.text.count("home assistant is online") == 1


def test_naming_acts_on_the_face_whose_event_id_came_with_the_command(service: Any, monkeypatch) -> None:
    import numpy as np

    assistant = Inbound(service)
    crop = np.full((32, 32, 3), 100, np.uint8)
    for n, (event_id, label) in enumerate((("e-unknown-1", "unknown"), ("e-alice", "alice"),
                                           ("e-unknown-2", "unknown"))):
        assert assistant.faces.add(event_id=event_id, label=label, score=0.5, track_id=n, bundle_id="b",
                                   crops=[crop], embeddings=np.ones((1, 4), np.float32), at=time.time() - 10 + n)
    named: list[tuple[str, list[str]]] = []
    # The enrolment itself is faceberry.device.recognition.enroll's (tested there); here: which face it is given.
    monkeypatch.setattr(service.commands, "_enroll", lambda name, faces, stranger_id=None: (
        named.append((name, [f.event_id for f in faces])) or (True, "enrolled", {})))

    def run(body: dict) -> dict:
        assistant._queue(COMMAND_TOPIC, _dump(body), False)
        assistant.tick()
        return answers(service)[-1]

    assert run({"command": "name_last_unknown", "name": "Carol", "event_id": "e-unknown-1"})["ok"] is True
    assert run({"command": "name_last_unknown", "name": "Dave"})["ok"] is True  # no event id: the newest
    assert named == [("Carol", ["e-unknown-1"]), ("Dave", ["e-unknown-2"])]
    refused = run({"command": "name_last_unknown", "name": "Carol", "event_id": "e-alice"})
    assert refused["ok"] is False and "recognised as alice, not unknown" in refused["message"]
    refused = run({"command": "name_last_unknown", "name": "Carol", "event_id": "e-gone"})
    assert refused["ok"] is False and "e-gone is not among the stored faces" in refused["message"]
    assert len(named) == 2
