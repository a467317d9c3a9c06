"""One face library for every device (device/messaging/library.py): the entry's encoding and verification as pure
functions, then real daemons on a real mosquitto — a face named through device A's command topic is named by
device B's next frames without a restart, a device C started later catches up from the retained entries, and a
tampered entry is refused with one log line and nothing applied."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
import yaml

from faceberry.device.messaging.library import (
    LibraryError,
    checksum,
    decode_entry,
    encode_entry,
)
from faceberry.device.messaging.topics import Topics
from tests.plugins.daemon import Daemon, blank, ha_config, link, predictions

EMBEDDER = "ab" * 32


def _emb(n: int = 2, dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, dim)).astype(np.float32)


def test_an_entry_decodes_to_what_was_encoded() -> None:
    emb = _emb()
    entry_id, payload = encode_entry("Zoë", emb, EMBEDDER, "front-door", version=42)
    assert entry_id == "front-door-42"
    entry = decode_entry(payload)
    assert (entry.id, entry.label, entry.embedder, entry.origin, entry.version) == (
        "front-door-42", "Zoë", EMBEDDER, "front-door", 42)
    assert np.array_equal(entry.embeddings, emb)
    body = json.loads(payload)
    assert body["schema"] == 1 and body["dim"] == 8 and body["count"] == 2
    assert body["checksum"] == checksum(body)


def _resigned(payload: bytes, **changes) -> bytes:
    body = {**json.loads(payload), **changes}
    body["checksum"] = checksum(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda p: p.replace(b'"Ann"', b'"Eve"'), "checksum mismatch"),
    (lambda p: _resigned(p, schema=2), "schema 2"),
    (lambda p: _resigned(p, count=3), "do not hold count 3"),
    (lambda p: _resigned(p, embeddings="not base64!"), "malformed"),
    (lambda p: _resigned(p, op="forget"), "op 'forget'"),
    (lambda p: _resigned(p, embeddings=base64.b64encode(np.full(16, np.nan, "<f4").tobytes()).decode()), "NaN"),
    (lambda p: b"{not json", "not JSON"),
    (lambda p: b"[]", "not a JSON object"),
])
def test_a_bad_entry_is_refused_naming_the_problem(mutate, why) -> None:
    _, payload = encode_entry("Ann", _emb(), EMBEDDER, "a", version=1)
    with pytest.raises(LibraryError, match=why):
        decode_entry(mutate(payload))


def test_the_library_topic_is_shared_not_the_devices() -> None:
    topics = Topics("faceberry", "front-door")
    assert topics.library("front-door-42") == "faceberry/library/front-door-42"
    assert topics.library_filter == "faceberry/library/#"


def _library(tmp_path: Path, published: list, embedder: str | None = EMBEDDER):
    import threading

    from faceberry.device.messaging.dispatcher import ReloadRequests
    from faceberry.device.messaging.library import Library

    def no_enrolment(label: str, embeddings: np.ndarray) -> dict:
        raise AssertionError(f"{label} must not be enrolled")

    return Library(Topics("faceberry", "door-a"), lambda *a, **k: published.append((a, k)),
                   state=tmp_path / "library-door-a.json", enroll=no_enrolment, reloads=ReloadRequests(),
                   embedder=lambda: embedder, enroll_lock=threading.Lock())


def test_a_shared_entry_is_retained_and_its_echo_is_not_applied_even_after_a_restart(tmp_path) -> None:
    published: list = []
    entry_id = _library(tmp_path, published).share("Ann", _emb(), EMBEDDER)
    (topic, payload), options = published[0]
    assert topic == f"faceberry/library/{entry_id}" and options == {"retain": True, "qos": 1}
    assert decode_entry(payload).label == "Ann"
    # The echo from the broker, to this process and to the next one (same state_dir): nothing enrolled.
    assert _library(tmp_path, []).apply(topic, payload) is False
    restarted = _library(tmp_path, [])
    restarted.receive(topic, payload)
    restarted.drain()
    assert restarted.stats == {"library_applied": 0, "library_refused": 0}


def test_an_entry_of_another_embedder_is_ignored_with_one_line_and_not_recorded(tmp_path, caplog) -> None:
    entry_id, payload = encode_entry("Ann", _emb(), "cd" * 32, "door-b", version=7)
    lib = _library(tmp_path, [])
    topic = f"faceberry/library/{entry_id}"
    assert lib.apply(topic, payload) is False and lib.apply(topic, payload) is False
    said = [r.getMessage() for r in caplog.records if "embedder" in r.getMessage()]
    assert len(said) == 1 and "deploy the same bundle" in said[0], said
    # Not recorded as applied: served the right bundle later, the device enrols it.
    assert entry_id not in _library(tmp_path, []).applied


def test_an_entry_on_another_entrys_topic_is_refused(tmp_path, caplog) -> None:
    _, payload = encode_entry("Ann", _emb(), EMBEDDER, "door-b", version=7)
    lib = _library(tmp_path, [])
    assert lib.apply("faceberry/library/door-b-8", payload) is False
    assert lib.stats["library_refused"] == 1
    assert any("is not its topic's" in r.getMessage() for r in caplog.records)


# --- real daemons -------------------------------------------------------------------------------------------------


def _camera(root: Path, photo: Path) -> Path:
    """One face, then empty frames: each loop of the folder is a new track, decided again."""
    camera = root / "camera"
    camera.mkdir(parents=True)
    link(photo, camera / "a_face.jpg")
    for i in range(3):
        blank(camera / f"b_empty_{i:02d}.jpg")
    return camera


def _device(tmp_path: Path, name: str, tiny: dict, broker, photo: Path, commands: bool = False) -> Path:
    """A device of its own: its own folder camera, its own copy of the same bundle, its own state_dir."""
    root = tmp_path / name
    root.mkdir()
    bundle = root / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    config = ha_config(root, bundle, broker, _camera(root, photo), homeassistant={"commands": commands},
                       library={"share": True})
    data = yaml.safe_load(config.read_text())
    data["device_id"] = name
    data["camera"]["fps"] = 3  # three daemons on a shared CPU
    config.write_text(yaml.safe_dump(data))
    return config


def _labels(d: Daemon, start: int = 0) -> list[str]:
    return [e["label"] for e in d.json_on(f"faceberry/{d.device}/events", start)]


@pytest.mark.broker
def test_a_face_named_on_one_device_is_named_on_every_device(tmp_path, mosquitto_factory, tiny) -> None:
    broker = mosquitto_factory()
    name = tiny["newcomer"]
    probes = [Path(p) for p in tiny["newcomer_probes"]]
    unknown = [p for p, (label, _, _) in zip(probes, predictions(tiny["bundle"], probes), strict=True)
               if label == "unknown"]
    assert unknown, "every probe photo of the newcomer was taken for someone: pick another newcomer"
    photo = unknown[0]

    # A tampered entry, retained before any device starts: made with the bundle's own embedder, then altered.
    manifest = json.loads((Path(tiny["bundle"]) / "manifest.json").read_text())
    embedder = manifest["files"][manifest["classifier"]["file"]]
    dim = int(np.load(Path(tiny["bundle"]) / manifest["gallery"]["file"])["embeddings"].shape[1])
    entry_id, payload = encode_entry("Mallory", _emb(2, dim), embedder, "elsewhere", version=1)
    tampered = payload.replace(b'"Mallory"', b'"Mallorz"')
    tampered_topic = f"faceberry/library/{entry_id}"
    mqtt_publish.single(tampered_topic, tampered, qos=1, retain=True, hostname=broker.host, port=broker.port)

    a = Daemon(_device(tmp_path, "door-a", tiny, broker, photo, commands=True), broker)
    b = Daemon(_device(tmp_path, "door-b", tiny, broker, photo), broker)
    c = None
    try:
        for d in (a, b):
            d.wait(lambda m, d=d: any(t == f"faceberry/{d.device}/events" for t, _, _ in m), 120)
            assert _labels(d)[0] == "unknown", d.text()

        mark_b = len(b.sub.messages)
        result = a.result_after(a.send(json.dumps({"command": "name_last_unknown", "name": name})))
        assert result["ok"] is True, (result, a.text())
        assert result["library_entry"].startswith("door-a-")
        library_topic = f"faceberry/library/{result['library_entry']}"
        # Retained on the broker, for every device, now and later.
        b.wait(lambda m: any(t == library_topic for t, _, _ in m), 30)

        # B's next frames name the newcomer, without a restart.
        b.wait(lambda m: name in _labels(b, mark_b), 180)
        assert b.proc.poll() is None
        # C, started after the naming, catches up from the retained entry.
        c = Daemon(_device(tmp_path, "door-c", tiny, broker, photo), broker)
        c.wait(lambda m: name in _labels(c), 180)
    finally:
        errs = {d.device: d.stop() for d in (a, b, c) if d is not None}
    # Each daemon refused the tampered entry in one line and applied nothing from it.
    for device, err in errs.items():
        assert err.count(f"library entry on {tampered_topic} refused: checksum mismatch") == 1, (device, err[-3000:])
        bundle_labels = (tmp_path / device / "bundle" / "labels.txt").read_text().split()
        assert "Mallory" not in bundle_labels and "Mallorz" not in bundle_labels
    assert f"library: enrolled {name} from door-a" in errs["door-b"]
    assert f"library: enrolled {name} from door-a" in errs["door-c"]
    # A's own entry came back to it and was not applied again; each device has it recorded in its state_dir.
    assert "library: enrolled" not in errs["door-a"]
    for device in errs:
        applied = json.loads((tmp_path / device / "state" / f"library-{device}.json").read_text())["applied"]
        assert result["library_entry"] in applied and entry_id not in applied
