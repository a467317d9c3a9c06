"""Home Assistant: the discovery builders without a broker, then the daemon through a real mosquitto
(discovery retained and re-sent on `homeassistant/status` online, removed entities, presence on/off,
images, diagnostics), and the dashboard flows: naming the last unknown face enrols it and the next frames
carry the name and the new bundle id in the same process and broker session; "wrong" turns a false
accept into `unknown`; malformed and oversized commands are refused and answered, the daemon runs on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
import yaml

from faceberry.device.outputs import homeassistant as ha
from faceberry.device.outputs.events import status_topic
from tests.plugins.broker import Subscriber, client_connections
from tests.plugins.daemon import Daemon, blank, ha_config, link, newcomer_unknown, predictions, write_config

DEVICE = "hacam"
DP = "homeassistant"


# --- pure builders --------------------------------------------------------------------------------------------

def test_object_ids_are_ascii_for_any_label() -> None:
    """Home Assistant reads discovery object ids of [a-zA-Z0-9_-] only; a label like 'Zoë' must not break one."""
    import re

    configs = ha.discovery("faceberry", "door.1", ["Zoë", "Ødegaard"], images=False, commands=False, cpu_temp=False)
    for topic, config in configs:
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", topic.split("/")[3]), topic
        assert topic.split("/")[2] == "faceberry_door_1"
        assert config["unique_id"] == topic.split("/")[3]
    # Labels with ASCII letters keep the unique ids they always had (Home Assistant keeps those entities).
    assert {c["unique_id"] for t, c in configs if t.split("/")[1] == "binary_sensor"} == {
        "faceberry_door_1_Zo__present", "faceberry_door_1__degaard_present"}
    assert {c["name"] for t, c in configs if t.split("/")[1] == "binary_sensor"} == {"Zoë present", "Ødegaard present"}


def by_component(configs: list[tuple[str, dict]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for topic, config in configs:
        out.setdefault(topic.split("/")[1], []).append(config)
    return out


def test_discovery_lists_every_promised_entity() -> None:
    configs = ha.discovery("faceberry", "door", ["alice", "Bob Smith", "unknown"], images=True, commands=True,
                           cpu_temp=True)
    topics = [t for t, _ in configs]
    assert len(topics) == len(set(topics))
    assert all(t.startswith("homeassistant/") and t.endswith("/config") for t in topics)
    assert len({c["unique_id"] for _, c in configs}) == len(configs)
    for topic, config in configs:
        # <prefix>/<component>/<node id>/<object id>/config: the node id level is the device's own, for the ACL.
        assert topic.split("/")[2] == "faceberry_door" and topic.split("/")[3] == config["unique_id"]
        assert len(topic.split("/")) == 5
        assert config["availability_topic"] == "faceberry/door/status"
        assert config["device"]["identifiers"] == ["faceberry_door"]
    parts = by_component(configs)
    (event,) = parts["event"]
    assert event["event_types"] == ["alice", "Bob Smith", "unknown"]
    assert event["state_topic"] == "faceberry/door/events"
    presence = {c["name"]: c for c in parts["binary_sensor"]}
    assert set(presence) == {"alice present", "Bob Smith present"}
    assert presence["Bob Smith present"]["state_topic"] == "faceberry/door/presence/Bob_Smith"
    assert presence["alice present"]["device_class"] == "presence"
    sensors = {c["name"]: c for c in parts["sensor"]}
    assert sensors["alice last seen"]["device_class"] == "timestamp"
    assert sensors["alice last seen"]["state_topic"] == "faceberry/door/person/alice"
    diagnostic = {c["value_template"].split(".")[1].split()[0] for c in parts["sensor"]
                  if c.get("entity_category") == "diagnostic"}
    assert diagnostic == {"fps", "detect_ms", "align_ms", "classify_ms", "dropped_frames", "outbox_pending",
                          "outbox_lost", "cpu_temperature", "bundle_id", "people"}
    assert {c["image_topic"] for c in parts["image"]} == {"faceberry/door/image/last_face",
                                                          "faceberry/door/image/last_unknown"}
    (text,) = parts["text"]
    assert text["command_topic"] == "faceberry/door/command" and "name_last_unknown" in text["command_template"]
    assert {json.loads(b["payload_press"])["command"] for b in parts["button"]} == {"wrong", "undo", "forget"}
    # The sensor older releases published keeps its unique id: dashboards built on it keep working.
    assert "homeassistant/sensor/faceberry_door/faceberry_door_Bob_Smith/config" in topics


def test_images_commands_and_temperature_only_when_asked() -> None:
    parts = by_component(ha.discovery("faceberry", "door", ["alice"]))
    assert not {"image", "text", "button"} & set(parts)
    assert all("cpu_temperature" not in c["value_template"] for c in parts["sensor"])


def test_event_template_renders_what_home_assistant_needs() -> None:
    jinja2 = pytest.importorskip("jinja2")
    (event,) = by_component(ha.discovery("faceberry", "door", ["alice"]))["event"]
    env = jinja2.Environment()
    env.filters["to_json"] = json.dumps
    payload = {"label": "alice", "score": 0.9, "track_id": 3, "model": "b1", "event_id": "e"}
    out = json.loads(env.from_string(event["value_template"]).render(value_json=payload))
    assert out["event_type"] == "alice" and out["score"] == 0.9 and out["track"] == 3 and out["bundle"] == "b1"
    assert out["stranger_id"] is None


def _render(template: str, payload: dict) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.filters["to_json"] = json.dumps
    return env.from_string(template).render(value_json=payload)


def test_last_face_tells_a_stranger_from_no_data() -> None:
    """HA shows a state `unknown` as its own "no data": a stranger must read differently."""
    (last,) = [c for c in by_component(ha.discovery("faceberry", "door", ["alice"]))["sensor"]
               if c["unique_id"].endswith("_last_event")]
    assert _render(last["value_template"], {"label": "unknown"}) == ha.STRANGER
    assert _render(last["value_template"], {"label": "alice"}) == "alice"
    assert last["json_attributes_topic"] == "faceberry/door/events"  # the payload itself stays as documented


def test_last_command_sensor_shows_every_result_within_the_state_limit() -> None:
    assert not [c for c in by_component(ha.discovery("faceberry", "door", ["alice"]))["sensor"]
                if c["unique_id"].endswith("_last_command")]
    (last,) = [c for c in by_component(ha.discovery("faceberry", "door", ["alice"], commands=True))["sensor"]
               if c["unique_id"].endswith("_last_command")]
    assert last["state_topic"] == last["json_attributes_topic"] == ha.command_result_topic("faceberry", "door")
    refused = _render(last["value_template"], {"ok": False, "message": "no unknown face is stored"})
    assert refused == "refused: no unknown face is stored"
    assert _render(last["value_template"], {"ok": True, "message": "x" * 1000}) == ("ok: " + "x" * 1000)[:255]


def test_icons_and_sw_version() -> None:
    configs = ha.discovery("faceberry", "door", ["alice"], images=True, commands=True, cpu_temp=True,
                           sw_version="1.2.3")
    for _, config in configs:
        assert config["device"]["sw_version"] == "1.2.3"
        # Presence and timestamps keep the icon Home Assistant gives their device_class (it follows the state).
        if config.get("device_class") not in ("presence", "timestamp"):
            assert config.get("icon", "").startswith("mdi:"), config["unique_id"]


def test_the_placeholder_image_is_a_small_constant_jpeg() -> None:
    jpeg = ha.placeholder_jpeg()
    assert jpeg[:2] == b"\xff\xd8" and 0 < len(jpeg) < 4096
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.std() < 2  # plain: no face, nothing to see
    ha.placeholder_jpeg.cache_clear()
    assert ha.placeholder_jpeg() == jpeg


def test_ledger_clears_topics_no_longer_published(tmp_path: Path) -> None:
    path = tmp_path / "discovery.json"
    ledger = ha.DiscoveryLedger(path)
    assert ledger.replace(["a", "b"]) == []
    # A restart: the record is read back, and a topic that went away is returned for clearing.
    assert ha.DiscoveryLedger(path).replace(["b", "c"]) == ["a"]
    path.write_text("{broken")
    assert ha.DiscoveryLedger(path).replace(["x"]) == []


def test_ledger_of_an_upgrade_clears_the_old_topics_first(tmp_path: Path) -> None:
    """The release before had no node id level: <prefix>/<component>/<object id>/config. Its ledger is read
    back, every old topic is returned for an empty retained payload (which the daemon publishes before the
    new configs), and the unique ids do not change, so Home Assistant keeps the entities."""
    path = tmp_path / "discovery-door.json"
    new = ha.discovery("faceberry", "door", ["alice", "Bob Smith"], images=True, commands=True, cpu_temp=False)
    old = {f"{t.split('/')[0]}/{t.split('/')[1]}/{t.split('/')[3]}/config": c for t, c in new}
    path.write_text(json.dumps({"topics": sorted(old)}))
    assert ha.DiscoveryLedger(path).replace(t for t, _ in new) == sorted(old)
    assert {c["unique_id"] for c in old.values()} == {c["unique_id"] for _, c in new}
    assert "homeassistant/binary_sensor/faceberry_door_alice_present/config" in old
    # Once moved, nothing more to clear.
    assert ha.DiscoveryLedger(path).replace(t for t, _ in new) == []


def test_non_latin_labels_get_distinct_unique_ids() -> None:
    """Two names with no ASCII letter or digit used to become the same `_`s; a hash of the label keeps
    them apart. Every other label keeps its id."""
    assert ha.label_id("Bob Smith") == "Bob_Smith" and ha.label_id("Zoë") == "Zoë"
    a, b = ha.label_id("张伟"), ha.label_id("李娜")
    assert a != b and a.startswith("张伟_") and a == ha.label_id("张伟")
    configs = ha.discovery("faceberry", "door", ["张伟", "李娜", "Олег"])
    uids = [c["unique_id"] for _, c in configs]
    assert len(uids) == len(set(uids))
    present = {c["name"]: c["unique_id"] for t, c in configs if t.split("/")[1] == "binary_sensor"}
    assert present["张伟 present"] == f"faceberry_door____{a.split('_')[-1]}_present"
    assert present["张伟 present"] != present["李娜 present"]


def test_diagnostics_payload_and_temperature(tmp_path: Path) -> None:
    out = ha.diagnostics_payload(fps=4.567, ms_per_frame={"detect": 12.345, "classify": 3.0}, dropped_frames=2,
                                 outbox_pending=5, bundle_id="b", people=3, cpu_temp=None)
    assert out["fps"] == 4.57 and out["detect_ms"] == 12.35 and out["align_ms"] is None and out["people"] == 3
    assert out["outbox_lost"] == 0
    assert ha.diagnostics_payload(fps=1.0, ms_per_frame={}, dropped_frames=0, outbox_pending=0, outbox_lost=7,
                                  bundle_id="b", people=3, cpu_temp=None)["outbox_lost"] == 7
    # Align and classify per face; nothing measured yet (no frame, no face) is null, not 0.
    out = ha.diagnostics_payload(fps=None, ms_per_frame={"detect": 10.0, "align": 0.1, "classify": 0.2},
                                 ms_per_face={}, dropped_frames=0, outbox_pending=0, bundle_id="b", people=3,
                                 cpu_temp=None)
    assert out["fps"] is None and out["detect_ms"] == 10.0 and out["align_ms"] is None and out["classify_ms"] is None
    out = ha.diagnostics_payload(fps=1.0, ms_per_frame={"detect": 10.0, "align": 0.1, "classify": 0.2},
                                 ms_per_face={"align": 0.5, "classify": 2.0}, dropped_frames=0, outbox_pending=0,
                                 bundle_id="b", people=3, cpu_temp=None)
    assert (out["align_ms"], out["classify_ms"]) == (0.5, 2.0)
    zone = tmp_path / "temp"
    zone.write_text("48312\n")
    assert ha.cpu_temperature(zone) == 48.3
    assert ha.cpu_temperature(tmp_path / "absent") is None


# --- the daemon through a real mosquitto -------------------------------------------------------------------


def face_then_blanks(tmp_path: Path, photo: Path, blanks: int, name: str = "a_person.jpg") -> Path:
    """A camera folder: one face, then `blanks` empty frames (the person leaves, so the track ends)."""
    camera = tmp_path / "camera"
    camera.mkdir()
    link(photo, camera / name)
    for i in range(blanks):
        blank(camera / f"b_empty_{i:02d}.jpg")
    return camera


def gallery_photo(tiny: dict) -> tuple[str, Path]:
    """A training photo of an enrolled person that the tiny bundle recognises as them."""
    for person in tiny["people"]:
        photos = sorted((Path(tiny["base"]) / "photos" / person).iterdir())[:6]
        for photo, (label, _, _) in zip(photos, predictions(Path(tiny["bundle"]), photos), strict=True):
            if label == person:
                return person, photo
    raise AssertionError("the tiny bundle recognises none of its people's training photos")


@pytest.mark.broker
def test_discovery_presence_images_and_diagnostics_through_mosquitto(
        tmp_path, mosquitto_factory, tiny) -> None:
    broker = mosquitto_factory()
    person, photo = gallery_photo(tiny)
    camera = face_then_blanks(tmp_path, photo, 10)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    # A person deleted while the daemon was stopped: their retained config is still on the broker.
    gone = f"{DP}/binary_sensor/faceberry_{DEVICE}/faceberry_{DEVICE}_Gone_present/config"
    mqtt_publish.single(gone, json.dumps({"name": "Gone present"}), qos=1, retain=True, hostname=broker.host,
                        port=broker.port)
    # An upgrade: the release before published its configs without the node id level
    # (<prefix>/<component>/<object id>/config), and its ledger holds those topics.
    legacy = f"{DP}/event/faceberry_{DEVICE}_face/config"
    mqtt_publish.single(legacy, json.dumps({"name": "Face", "unique_id": f"faceberry_{DEVICE}_face"}), qos=1,
                        retain=True, hostname=broker.host, port=broker.port)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / f"discovery-{DEVICE}.json").write_text(json.dumps({"topics": [gone, legacy]}))

    config = ha_config(tmp_path, bundle, broker, camera, homeassistant={"presence_timeout": 0.4, "images": True},
                       stats_interval=0.5)
    d = Daemon(config, broker)
    presence = ha.presence_topic("faceberry", DEVICE, person)
    try:
        # The person is seen (ON), then gone for longer than presence_timeout (OFF), and back (ON).
        d.wait(lambda m: [p for t, p, _ in m if t == presence][-3:] == [b"ON", b"OFF", b"ON"], 90)
        images = {t: p for t, p, _ in d.sub.messages if "/image/" in t}
        # The one published at start has no fps yet (null); the stats interval's have.
        d.wait(lambda m: any(t == ha.diagnostics_topic("faceberry", DEVICE) and json.loads(p)["fps"]
                             for t, p, _ in m), 30)
        diag = [x for x in d.json_on(ha.diagnostics_topic("faceberry", DEVICE)) if x["fps"]][-1]
        events = d.json_on(f"faceberry/{DEVICE}/events")
        assert events and {e["label"] for e in events} == {person}, events

        # The removed person's config was cleared (empty retained payload).
        assert any(t == gone and p == b"" for t, p, _ in d.sub.messages)
        # The old-form config is cleared before the same entity's new one is published: Home Assistant
        # ignores a config whose unique id another config still holds.
        topics = [(t, p) for t, p, _ in d.sub.messages]
        cleared = topics.index((legacy, b""))
        moved = f"{DP}/event/faceberry_{DEVICE}/faceberry_{DEVICE}_face/config"
        assert cleared < min(i for i, (t, p) in enumerate(topics) if t == moved and p), topics

        # A newcomer (Home Assistant restarted) gets every config retained.
        late = Subscriber(broker.host, broker.port, f"{DP}/#")
        time.sleep(1.0)
        retained = {t: json.loads(p) for t, p, r in late.messages if r and p and t.endswith("/config")}
        late.close()
        expected = {t for t, _ in ha.discovery("faceberry", DEVICE, [*tiny["people"]], images=True,
                                               cpu_temp=ha.cpu_temperature() is not None)}
        assert set(retained) == expected, set(retained) ^ expected
        (event_cfg,) = [c for t, c in retained.items() if t.split("/")[1] == "event"]
        assert event_cfg["event_types"] == [*tiny["people"], "unknown"]
        from faceberry.device import __version__
        assert {c["device"].get("sw_version") for c in retained.values()} == {__version__}

        # Home Assistant says it is online again: every config is published once more, and the device's
        # availability with its presence ahead of it — where the broker no longer holds the retained `online`
        # (cleared here; a clustered broker keeping retained messages per node), Home Assistant would
        # otherwise show the device unavailable until its next connection.
        status = status_topic("faceberry", DEVICE)
        mqtt_publish.single(status, b"", qos=1, retain=True, hostname=broker.host, port=broker.port)
        mark = d.send("online", f"{DP}/status")
        d.wait(lambda m: {t for t, _, _ in m[mark:] if t.endswith("/config")} >= expected, 30)
        d.wait(lambda m: (status, b"online") in [(t, p) for t, p, _ in m[mark:]], 30)
        again = [t for t, p, _ in list(d.sub.messages)[mark:] if t in (status, presence) and p]
        assert again.index(presence) < again.index(status), again
    finally:
        err = d.stop()
    assert images[ha.image_topic("faceberry", DEVICE, "last_face")][:2] == b"\xff\xd8"  # a JPEG
    assert set(diag) >= {"fps", "detect_ms", "align_ms", "classify_ms", "dropped_frames", "outbox_pending",
                         "cpu_temperature", "bundle_id", "people"}
    assert diag["people"] == len(tiny["people"]) and diag["fps"] > 0 and diag["detect_ms"] > 0
    assert diag["align_ms"] > 0 and diag["classify_ms"] > 0  # per face: a face was seen
    assert "home assistant is online: publishing discovery and availability again" in err
    assert len(client_connections(broker, f"faceberry-{DEVICE}")) == 1
    # Nothing but the daemon's own status ended as offline.
    assert d.sub.on(status_topic("faceberry", DEVICE))[-1] == b"offline"


@pytest.mark.broker
@pytest.mark.parametrize("layout", ["directory", "store"])
def test_naming_the_last_unknown_face_from_a_command(tmp_path, mosquitto_factory, tiny, layout) -> None:
    """`directory`: the bundle is a plain folder, updated in place; `store`: the Pi's layout
    (bundles/<bundle_id>/ and `current`), where the naming writes a new version and switches `current`."""
    broker = mosquitto_factory()
    name = tiny["newcomer"]
    photo, _ = newcomer_unknown(tiny)
    camera = face_then_blanks(tmp_path, photo, 3, "a_newcomer.jpg")
    if layout == "store":
        from faceberry.device.ops.store import BundleStore

        store = BundleStore(tmp_path / "bundles", create=True)
        store.switch(store.add(Path(tiny["bundle"])).name)
        bundle = store.root / "current"
    else:
        bundle = tmp_path / "bundle"
        shutil.copytree(tiny["bundle"], bundle)
    config = ha_config(tmp_path, bundle, broker, camera, homeassistant={"commands": True})
    d = Daemon(config, broker)
    events_topic = f"faceberry/{DEVICE}/events"
    try:
        d.wait(lambda m: any(t == events_topic for t, _, _ in m), 90)
        first = d.json_on(events_topic)[0]
        assert first["label"] == "unknown", first

        # Untrusted input first: each refused with the reason, the daemon keeps running.
        for bad, why in ((b"{not json", "JSON"), (b"x" * 5000, "limit is 4096"),
                         (b'{"command": "name_last_unknown", "name": "A", "rm": "-rf"}', "Extra inputs"),
                         (b'{"command": "reboot"}', "unknown command"),
                         # Valid, but refused by enroll's own rules: the daemon answers, logs, goes on.
                         (b'{"command": "name_last_unknown", "name": "unknown"}', "not enrolled")):
            result = d.result_after(d.send(bad), 30)
            assert result["ok"] is False and why in result["message"], result

        mark = d.send(json.dumps({"command": "name_last_unknown", "name": name, "request_id": "n1"}))
        result = d.result_after(mark)
        assert result["ok"] is True and result["request_id"] == "n1", (result, d.text())
        new_id = result["bundle_id"]
        assert new_id != first["model"]
        # The next frames of that person: their name, the new bundle.
        d.wait(lambda m: any(t == events_topic and json.loads(p)["label"] == name for t, p, _ in m[mark:]), 60)
        named = [e for e in d.json_on(events_topic, mark) if e["label"] == name]
        assert {e["model"] for e in named} == {new_id}
        if layout == "store":
            # A new version beside the old one, `current` switched to it (a relative link).
            assert os.readlink(bundle) == new_id and (bundle.parent / first["model"]).is_dir()
        # Discovery now lists the new person.
        d.wait(lambda m: any(t.endswith(f"faceberry_{DEVICE}_{name}_present/config") for t, _, _ in m[mark:]), 30)
        assert d.proc.poll() is None
    finally:
        err = d.stop()
    assert err.count("command (unreadable) refused") + err.count("command reboot refused") >= 1
    assert "command name_last_unknown accepted" in err
    # `faceberry status` reads the counts: 5 refused, 1 accepted; the named face's crops are gone.
    memory = json.loads((tmp_path / "state" / f"status-{DEVICE}.json").read_text())["memory"]
    assert (memory["commands_refused"], memory["commands_accepted"]) == (5, 1), memory
    # Same process, same broker session.
    assert len(client_connections(broker, f"faceberry-{DEVICE}")) == 1


@pytest.mark.broker
def test_wrong_turns_a_false_accept_into_unknown_and_undo_restores_it(
        tmp_path, mosquitto_factory, tiny) -> None:
    broker = mosquitto_factory()
    # With the accept threshold at 0 every face is taken for its nearest person: a false accept.
    stranger = Path(tiny["newcomer_probes"][0])
    (label, best, _), = predictions(tiny["bundle"], [stranger], threshold=0.0)
    assert label == best != "unknown"
    person, own_photo = gallery_photo(tiny)
    camera = tmp_path / "camera"
    camera.mkdir()
    link(stranger, camera / "a_stranger.jpg")
    blank(camera / "b_empty.jpg")
    link(own_photo, camera / "c_person.jpg")
    blank(camera / "d_empty.jpg")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    config = ha_config(tmp_path, bundle, broker, camera, homeassistant={"commands": True},
                       recognition={"threshold": 0.0})
    d = Daemon(config, broker)
    events_topic = f"faceberry/{DEVICE}/events"

    def of(source: str, start: int) -> list[dict]:
        return [e for e in d.json_on(events_topic, start) if e["source"] and e["source"].endswith(source)]

    try:
        d.wait(lambda m: len(of("a_stranger.jpg", 0)) >= 1, 90)
        wrong = of("a_stranger.jpg", 0)[0]
        assert wrong["label"] == best
        result = d.result_after(d.send(json.dumps({"command": "wrong", "event_id": wrong["event_id"]})))
        assert result["ok"] is True and result["not"] == best, result
        mark = len(d.sub.messages)
        d.wait(lambda m: len(of("a_stranger.jpg", mark)) >= 2 and len(of("c_person.jpg", mark)) >= 1, 60)
        assert {e["label"] for e in of("a_stranger.jpg", mark)} == {"unknown"}
        # The person's own photo is not their stranger look-alike: still accepted.
        if person == best:
            assert {e["label"] for e in of("c_person.jpg", mark)} == {person}
        # The correction is kept on disk, and undo takes it back.
        assert json.loads((tmp_path / "state" / f"negatives-{DEVICE}.json").read_text())["corrections"]
        result = d.result_after(d.send(b'{"command": "undo"}'))
        assert result["ok"] is True, result
        mark = len(d.sub.messages)
        d.wait(lambda m: len(of("a_stranger.jpg", mark)) >= 1, 60)
        assert {e["label"] for e in of("a_stranger.jpg", mark)} == {best}
    finally:
        d.stop()


def without_person(source: Path, dest: Path, person: str) -> Path:
    """A copy of an embedding bundle with `person` taken out of labels.txt and the gallery."""
    from faceberry.bundle import MANIFEST, load_bundle, write_manifest

    shutil.copytree(source, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    files = list(manifest.pop("files"))
    labels = [lab for lab in (dest / manifest["labels"]["file"]).read_text().split() if lab != person]
    (dest / manifest["labels"]["file"]).write_text("\n".join(labels) + "\n")
    manifest["labels"]["count"] = len(labels)
    with np.load(dest / manifest["gallery"]["file"]) as data:
        keep = data["labels"] != person
        emb, names = data["embeddings"][keep], data["labels"][keep]
    with open(dest / manifest["gallery"]["file"], "wb") as fh:
        np.savez(fh, embeddings=emb, labels=names)
    manifest["bundle_id"] = f"{manifest['bundle_id']}-without"
    write_manifest(dest, manifest, files)
    assert person not in load_bundle(dest).labels
    return dest


@pytest.mark.broker
def test_a_person_removed_by_a_reload_loses_their_entities(tmp_path, mosquitto_factory, tiny) -> None:
    from tests.plugins.daemon import switch_current

    broker = mosquitto_factory()
    store = tmp_path / "store"
    (store / "bundles").mkdir(parents=True)
    shutil.copytree(tiny["bundle"], store / "bundles" / "v1")
    gone = tiny["people"][-1]
    without_person(Path(tiny["bundle"]), store / "bundles" / "v2", gone)
    switch_current(store, "v1")
    camera = tmp_path / "camera"
    camera.mkdir()
    blank(camera / "empty.jpg")
    # No stats line within the test: the diagnostics seen come from the start and the reload themselves.
    config = ha_config(tmp_path, store / "bundles" / "current", broker, camera, stats_interval=3600)
    d = Daemon(config, broker)
    uid = f"faceberry_{DEVICE}_{gone}"
    their = {f"{DP}/binary_sensor/faceberry_{DEVICE}/{uid}_present/config",
             f"{DP}/sensor/faceberry_{DEVICE}/{uid}/config"}
    diagnostics = ha.diagnostics_topic("faceberry", DEVICE)
    try:
        d.wait(lambda m: their <= {t for t, p, _ in m if p}, 60)
        d.wait(lambda m: any(t == diagnostics for t, _, _ in m), 30)
        at_start = d.json_on(diagnostics)[-1]
        mark = len(d.sub.messages)
        switch_current(store, "v2")
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda m: their <= {t for t, p, _ in m if not p}, 60)
        event_topic = f"{DP}/event/faceberry_{DEVICE}/faceberry_{DEVICE}_face/config"
        d.wait(lambda m: gone not in json.loads([p for t, p, _ in m if t == event_topic][-1])["event_types"], 30)
        # Bundle and People enrolled follow the reload at once, not a stats interval later.
        d.wait(lambda m: any(t == diagnostics for t, _, _ in m[mark:]), 30)
        after = d.json_on(diagnostics, mark)[-1]
    finally:
        d.stop()
    assert at_start["people"] == len(tiny["people"]), at_start
    assert after["people"] == len(tiny["people"]) - 1 and after["bundle_id"] != at_start["bundle_id"], after
    # Nobody in view: no per-face time was measured, and it says so (null) instead of 0.0 ms.
    assert after["align_ms"] is None and after["classify_ms"] is None and after["detect_ms"] > 0, after
    late = Subscriber(broker.host, broker.port, f"{DP}/#")
    time.sleep(1.0)
    retained = {t for t, p, r in late.messages if r and p}
    late.close()
    assert not their & retained and f"{DP}/event/faceberry_{DEVICE}/faceberry_{DEVICE}_face/config" in retained


def _retained(broker, topic: str, wait: float = 1.5) -> bytes | None:
    """The retained payload on `topic` a new subscriber gets now, or None."""
    sub = Subscriber(broker.host, broker.port, topic)
    try:
        sub.wait_for(lambda m: bool(m), wait)
        got = [p for t, p, retained in sub.messages if t == topic and retained]
    finally:
        sub.close()
    return got[-1] if got and got[-1] else None


@pytest.mark.broker
def test_retained_face_pictures_are_cleared_when_images_go_off_and_by_forget(tmp_path, mosquitto_factory,
                                                                            tiny) -> None:
    """Privacy: a JPEG of a face retained by a run with images on must not stay on the broker after images are
    turned off, nor after `forget`. It is replaced by the plain placeholder, never by an empty payload (Home
    Assistant's image entity takes that as a picture it cannot serve)."""
    broker = mosquitto_factory()
    _, photo = gallery_photo(tiny)
    camera = face_then_blanks(tmp_path, photo, 6)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    face_topic = ha.image_topic("faceberry", DEVICE, "last_face")
    image_topics = {face_topic, ha.image_topic("faceberry", DEVICE, "last_unknown")}

    # A run with images and commands on: the face picture is retained, then `forget` replaces it.
    config = ha_config(tmp_path, bundle, broker, camera, homeassistant={"images": True, "commands": True})
    d = Daemon(config, broker)
    try:
        d.wait(lambda m: any(t == face_topic and p for t, p, _ in m), 90)
        face = _retained(broker, face_topic)
        assert face[:2] == b"\xff\xd8" and face != ha.placeholder_jpeg()  # a JPEG of the face
        result = d.result_after(d.send(json.dumps({"command": "forget"})))
        assert result["ok"] is True, result
    finally:
        d.stop()
    # The camera keeps looping: the face may be seen again after `forget`. What matters: forget put the
    # placeholder on both topics, and no empty image payload was ever published.
    assert {t for t, p, _ in d.sub.messages if t in image_topics and p == ha.placeholder_jpeg()} == image_topics
    assert not [t for t, p, _ in d.sub.messages if t in image_topics and not p]

    # A picture left by an older run (or by hand), then a run with images off: replaced at start.
    mqtt_publish.single(face_topic, b"\xff\xd8old", qos=1, retain=True, hostname=broker.host, port=broker.port)
    assert _retained(broker, face_topic) == b"\xff\xd8old"
    config = ha_config(tmp_path, bundle, broker, camera)
    d = Daemon(config, broker)
    try:
        d.wait(lambda m: any(t.endswith("/events") for t, _, _ in m), 90)
    finally:
        d.stop()
    assert _retained(broker, face_topic) == ha.placeholder_jpeg()
    assert not [t for t, p, _ in d.sub.messages if t in image_topics and not p]

    # Without Home Assistant discovery no image entity exists: the old picture is simply cleared.
    mqtt_publish.single(face_topic, b"\xff\xd8old", qos=1, retain=True, hostname=broker.host, port=broker.port)
    config = write_config(tmp_path / "config.yaml", bundle, broker, {"device": str(camera), "loop": True, "fps": 8})
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "device_id": DEVICE}))
    d = Daemon(config, broker)
    try:
        d.wait(lambda m: any(t.endswith("/events") for t, _, _ in m), 90)
    finally:
        d.stop()
    assert _retained(broker, face_topic) is None


def _order(messages: list[tuple[str, bytes, bool]], presence: str) -> list[str]:
    """The status and presence messages as 'status:online', 'presence:ON' …, in arrival order."""
    status = status_topic("faceberry", DEVICE)
    return [f"{'status' if t == status else 'presence'}:{p.decode()}" for t, p, _ in messages
            if t in (status, presence)]


@pytest.mark.broker
def test_a_restart_never_shows_an_arrival_that_did_not_happen(tmp_path, mosquitto_factory, tiny) -> None:
    """The false "arrived": the ON retained before a stop, still on the broker (a power cut, a SIGKILL) or still
    in the outbox, must never reach a subscriber after the new `online`. Home Assistant shows an entity's
    retained state as soon as its availability says online, so presence must be right before that."""
    from faceberry.device.messaging.outbox import Outbox

    broker = mosquitto_factory()
    person, photo = gallery_photo(tiny)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    presence = ha.presence_topic("faceberry", DEVICE, person)
    status = status_topic("faceberry", DEVICE)

    # 1. A clean stop while the person is in view: OFF reaches the broker before `offline`.
    camera = tmp_path / "camera"
    camera.mkdir()
    link(photo, camera / "a_person.jpg")
    config = ha_config(tmp_path, bundle, broker, camera, homeassistant={"presence_timeout": 3600})
    d = Daemon(config, broker)
    try:
        d.wait(lambda m: b"ON" in [p for t, p, _ in m if t == presence], 90)
    finally:
        d.stop()
    order = _order(d.sub.messages, presence)
    assert order[-2:] == ["presence:OFF", "status:offline"], order
    assert _retained(broker, presence) == b"OFF"

    # 2. What a power cut leaves: the ON retained on the broker with the last will's `offline`, and an ON the
    # broker never acknowledged still in the outbox. The next start sees nobody.
    for topic, payload in ((presence, b"ON"), (status, b"offline")):
        mqtt_publish.single(topic, payload, qos=1, retain=True, hostname=broker.host, port=broker.port)
    outbox = Outbox(tmp_path / "state" / f"outbox-{DEVICE}.sqlite3")
    outbox.put(presence, b"ON", qos=1, retain=True)
    outbox.close()
    shutil.rmtree(camera)
    camera.mkdir()
    for i in range(4):
        blank(camera / f"empty_{i}.jpg")
    d = Daemon(config, broker)  # its subscriber first gets the retained ON and offline, as Home Assistant would
    try:
        d.wait(lambda m: "status:online" in _order(m, presence), 60)
        d.wait(lambda m: len([t for t, _, _ in m if t.endswith("/diagnostics")]) >= 3, 60)
    finally:
        d.stop()
    order = _order(d.sub.messages, presence)
    online = order.index("status:online")
    assert sorted(order[:2]) == ["presence:ON", "status:offline"], order  # retained from before the start
    # What a subscriber holds when it sees the device available again is OFF (Home Assistant shows the
    # retained state at `online`: an ON here was the false arrival), and no ON comes after.
    assert [o for o in order[:online] if o.startswith("presence")][-1] == "presence:OFF", order
    assert "presence:ON" not in order[online:], order
    assert order[-1] == "status:offline" and _retained(broker, presence) == b"OFF", order


@pytest.mark.broker
def test_a_reconnection_restores_the_presence_before_online(tmp_path, mosquitto_factory, tiny) -> None:
    """A broker that restarts without its retained messages: at the reconnection the daemon puts the presence
    it knows (ON for the person in view) back on the broker ahead of `online`, not after it."""
    broker = mosquitto_factory()
    person, photo = gallery_photo(tiny)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    camera = tmp_path / "camera"
    camera.mkdir()
    link(photo, camera / "a_person.jpg")
    presence = ha.presence_topic("faceberry", DEVICE, person)
    config = ha_config(tmp_path, bundle, broker, camera, homeassistant={"presence_timeout": 3600})
    d = Daemon(config, broker)
    try:
        d.wait(lambda m: b"ON" in [p for t, p, _ in m if t == presence], 90)
        d.sub.close()
        broker.stop()  # no persistence: every retained message is gone with it
        broker.start()
        # Subscribed before the daemon's reconnection (its retry delay is at least a second): what it gets
        # is live, in publish order (not retained, whose order on subscribing says nothing).
        late = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/#")

        def live(m: list) -> list:
            return [x for x in m if not x[2]]

        try:
            assert late.wait_for(lambda m: "status:online" in _order(live(m), presence), 60), d.text()
            order = _order(live(list(late.messages)), presence)
        finally:
            late.close()
        d.sub = Subscriber(broker.host, broker.port, "#")
    finally:
        d.stop()
    assert order.index("presence:ON") < order.index("status:online"), order
