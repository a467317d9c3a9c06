"""The README's mosquitto ACL, run as written: a real mosquitto with a password file and the README's
`/etc/mosquitto/acl` block, paho clients for each user, and a watcher with full rights that sees what the
broker really let through.

What must hold: the daemon's user writes every topic the daemon publishes (events, status, person and
presence state, diagnostics, images, command results, its discovery configs) and reads its command topic and
Home Assistant's status; it can neither write its own command topic, `homeassistant/status`, another Pi's
topics nor any discovery config but its own (another Pi's, another integration's), nor read anything else
(another Pi's commands, other devices' discovery). Home Assistant's
user may command it. A refused publish is answered 0x87 (not authorised) on MQTT 5, and silently dropped on
MQTT 3.1.1 (the daemon's protocol) without ending the connection. Then the real daemon runs under that ACL:
discovery, events and a command's answer go through, and the broker refuses it one publish only, the clear
of a retained command it was not allowed to make.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from faceberry.device.outputs import homeassistant as ha
from faceberry.device.outputs.events import bundle_topic, events_topic, person_topic, snapshot_topic, status_topic
from tests.conftest import ROOT
from tests.plugins.broker import password_file

pytestmark = pytest.mark.broker

DEVICE = "front-door"  # the README's example
DAEMON = f"faceberry-{DEVICE}"
USERS = {"homeassistant": "ha-secret", DAEMON: "pi-secret", "faceberry-back-door": "other-secret",
         "watcher": "watch-secret"}
NOT_AUTHORIZED = 0x87


def readme_acl() -> str:
    """The ```text block of the README that starts with `# /etc/mosquitto/acl`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```text\n(# /etc/mosquitto/acl\n.*?)```", text, re.S)
    assert match, "the README has no ```text block starting with # /etc/mosquitto/acl"
    return match.group(1)


def other_pi_block(acl: str) -> str:
    """The daemon's block for a second Pi, as a reader of the README would write it."""
    block = acl[acl.index(f"user {DAEMON}"):]
    return block.replace(DEVICE, "back-door")


@pytest.fixture
def broker(tmp_path: Path, mosquitto_factory):
    passwd = password_file(tmp_path, USERS)
    acl_text = readme_acl()
    acl = tmp_path / "acl"
    acl.write_text(f"{acl_text}\n{other_pi_block(acl_text)}\nuser watcher\ntopic readwrite #\n", encoding="utf-8")
    acl.chmod(0o644)
    return mosquitto_factory(anonymous=False, extra_config=f"password_file {passwd}\nacl_file {acl}\n")


class Client:
    """A paho client logged in as `user`, recording PUBACK reason codes, SUBACKs and messages."""

    def __init__(self, broker, user: str, protocol: int = paho.MQTTv5) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.username_pw_set(user, USERS[user])
        self.acks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: list[list[int]] = []
        self._cond = threading.Condition()
        self.connected = threading.Event()
        self.refused: object = None

        def on_connect(client, userdata, flags, reason, properties) -> None:
            if reason.is_failure:
                self.refused = reason
            self.connected.set()

        def on_publish(client, userdata, mid, reason, properties) -> None:
            with self._cond:
                self.acks[mid] = reason.value
                self._cond.notify_all()

        def on_subscribe(client, userdata, mid, reasons, properties) -> None:
            with self._cond:
                self.subacks.append([r.value for r in reasons])
                self._cond.notify_all()

        def on_message(client, userdata, msg) -> None:
            with self._cond:
                self.messages.append((msg.topic, bytes(msg.payload)))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_publish = on_publish
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(10) and self.refused is None, f"{user} could not log in: {self.refused}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The PUBACK's reason code (0 on MQTT 3.1.1, where the broker cannot say no)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, 10), f"no PUBACK for {topic}"
            return self.acks[info.mid]

    def subscribe(self, *topics: str) -> list[int]:
        count = len(self.subacks)
        self.client.subscribe([(t, 1) for t in topics])
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.subacks) > count, 10)
            return self.subacks[count]

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self.messages)), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _watcher(broker) -> Client:
    """Full rights, subscribed to everything: what the broker really delivers (anonymous clients are refused)."""
    watcher = Client(broker, "watcher")
    assert watcher.subscribe("#")[0] < 0x80
    return watcher


def daemon_topics() -> list[str]:
    """One topic of every kind the daemon publishes, from the functions that name them."""
    prefix = "faceberry"
    configs = ha.discovery(prefix, DEVICE, ["alice", "Ann Lee"], images=True, commands=True, cpu_temp=True)
    return [status_topic(prefix, DEVICE), events_topic(prefix, DEVICE), bundle_topic(prefix, DEVICE),
            person_topic(prefix, DEVICE, "alice"), snapshot_topic(prefix, DEVICE, "alice"),
            ha.presence_topic(prefix, DEVICE, "Ann Lee"), ha.diagnostics_topic(prefix, DEVICE),
            ha.image_topic(prefix, DEVICE, "last_face"), ha.image_topic(prefix, DEVICE, "last_unknown"),
            ha.command_result_topic(prefix, DEVICE), *(topic for topic, _ in configs)]


REFUSED_TO_THE_DAEMON = [
    ha.command_topic("faceberry", DEVICE),  # its own commands: its credentials must not command it
    "homeassistant/status",  # Home Assistant's birth message: every integration would republish
    "faceberry/back-door/events",  # another Pi
    "faceberry/back-door/command",
    "faceberry/front-door/anything-else",  # a topic of its own it never publishes
    "faceberry/front-door/command/result/x",
    "homeassistant/sensor/x/state",  # not a discovery config
    # Another Pi's discovery config (its node id level is not this Pi's), and one of another integration.
    "homeassistant/sensor/faceberry_back-door/faceberry_back-door_fps/config",
    "homeassistant/binary_sensor/faceberry_back-door/faceberry_back-door_alice_present/config",
    "homeassistant/light/kitchen/config",
    "homeassistant/sensor/zigbee2mqtt/kitchen_temperature/config",
    # The form without a node id level, older releases' (see the README's upgrade note).
    "homeassistant/sensor/faceberry_front-door_fps/config",
    "zigbee2mqtt/bridge/request/permit_join",
]


def wait_for(watcher: Client, topic: str, payload: bytes, timeout: float = 5.0) -> bool:
    return watcher.wait_for(lambda m: any(t == topic and p == payload for t, p in m), timeout)


def test_the_daemon_writes_its_own_topics_and_nothing_else(broker) -> None:
    watcher = _watcher(broker)
    daemon = Client(broker, DAEMON)
    try:
        for topic in daemon_topics():
            payload = f"allowed {topic}".encode()
            assert daemon.publish(topic, payload) == 0, topic
            assert wait_for(watcher, topic, payload), f"{topic} was acknowledged but not delivered"
        for topic in REFUSED_TO_THE_DAEMON:
            payload = f"refused {topic}".encode()
            assert daemon.publish(topic, payload) == NOT_AUTHORIZED, topic
        # Refused ones never reach anyone (the last allowed publish after them arrives first proves it).
        marker = f"after refusals {time.monotonic()}".encode()
        assert daemon.publish(events_topic("faceberry", DEVICE), marker) == 0
        assert wait_for(watcher, events_topic("faceberry", DEVICE), marker)
        assert not [t for t, p in watcher.messages if p.startswith(b"refused ")]
    finally:
        daemon.close()
        watcher.close()


def test_the_daemon_reads_its_commands_and_home_assistant_status_only(broker) -> None:
    watcher = _watcher(broker)
    daemon = Client(broker, DAEMON)
    home = Client(broker, "homeassistant")
    try:
        mine = ha.command_topic("faceberry", DEVICE)
        # mosquitto grants any subscription and checks each message against the read rules on delivery.
        assert all(code < 0x80 for code in daemon.subscribe(mine, "homeassistant/status", "faceberry/#",
                                                             "homeassistant/#", "#"))
        # Home Assistant commands this Pi and announces itself; the rest is not the daemon's to read.
        assert home.publish(mine, b'{"command": "undo"}') == 0
        assert home.publish("homeassistant/status", b"online") == 0
        assert home.publish("faceberry/back-door/command", b'{"command": "forget"}') == 0
        assert home.publish("homeassistant/sensor/other_device/config", b"{}") == 0
        assert watcher.publish("faceberry/back-door/events", b"{}") == 0
        assert watcher.publish("zigbee2mqtt/bridge/state", b"online") == 0
        marker = b"last"
        assert home.publish("homeassistant/status", marker) == 0
        assert daemon.wait_for(lambda m: ("homeassistant/status", marker) in m, 10), daemon.messages
        assert set(daemon.messages) == {(mine, b'{"command": "undo"}'), ("homeassistant/status", b"online"),
                                        ("homeassistant/status", marker)}, daemon.messages
        # Home Assistant reads what the daemon publishes.
        assert home.subscribe("faceberry/#")[0] < 0x80
        # A second Pi's credentials cannot command this one, or write as it.
        other = Client(broker, "faceberry-back-door")
        try:
            assert other.publish(mine, b'{"command": "forget"}') == NOT_AUTHORIZED
            assert other.publish(events_topic("faceberry", DEVICE), b"forged") == NOT_AUTHORIZED
            assert other.publish(events_topic("faceberry", "back-door"), b"its own") == 0
        finally:
            other.close()
        assert wait_for(watcher, events_topic("faceberry", "back-door"), b"its own")
        assert not [p for t, p in watcher.messages if p == b"forged" or (t == mine and b"forget" in p)]
    finally:
        home.close()
        daemon.close()
        watcher.close()


def test_a_refused_publish_on_mqtt_311_is_dropped_and_the_connection_stays(broker) -> None:
    """The daemon speaks MQTT 3.1.1: its attempt to clear a retained command on its own command topic is
    acknowledged and dropped, and it stays connected (no reconnection loop)."""
    watcher = _watcher(broker)
    daemon = Client(broker, DAEMON, protocol=paho.MQTTv311)
    try:
        mine = ha.command_topic("faceberry", DEVICE)
        assert daemon.publish(mine, b"", retain=True) == 0
        assert daemon.publish(mine, b'{"command": "forget"}') == 0
        marker = b"still connected"
        assert daemon.publish(events_topic("faceberry", DEVICE), marker) == 0
        assert wait_for(watcher, events_topic("faceberry", DEVICE), marker)
        assert daemon.client.is_connected()
        assert not [p for t, p in watcher.messages if t == mine]
    finally:
        daemon.close()
        watcher.close()


def test_the_daemon_runs_under_the_readme_acl(tmp_path, broker, gallery_bundle, heldout_photos) -> None:
    import json

    import yaml

    from tests.plugins.daemon import Daemon, folder_of_photos, write_config
    broker.stop()
    broker.config.write_text(broker.config.read_text() + "log_type debug\n", encoding="utf-8")
    broker.start()
    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=1, broken=False)
    secret = tmp_path / "mqtt-password"
    secret.write_text(USERS[DAEMON] + "\n", encoding="utf-8")
    secret.chmod(0o600)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, broker, {"device": str(camera), "loop": True,
                                                                            "fps": 8},
                          homeassistant={"commands": True, "images": True}, events={"homeassistant": True},
                          mqtt={"username": DAEMON, "password_file": str(secret)})
    data = yaml.safe_load(config.read_text())
    data["device_id"] = DEVICE
    config.write_text(yaml.safe_dump(data))
    watcher = _watcher(broker)
    home = Client(broker, "homeassistant")
    mine = ha.command_topic("faceberry", DEVICE)
    result = ha.command_result_topic("faceberry", DEVICE)
    # An old command retained on the broker: the daemon refuses it and tries to clear it, which this ACL denies.
    assert home.publish(mine, b'{"command": "forget", "request_id": "old"}', retain=True) == 0
    d = Daemon(config, stays_up=True)
    try:
        assert watcher.wait_for(lambda m: (status_topic("faceberry", DEVICE), b"online") in m, 60), "".join(d.log)
        assert watcher.wait_for(lambda m: any(t == events_topic("faceberry", DEVICE) for t, _ in m), 120)
        assert watcher.wait_for(lambda m: any(t == result and b'"old"' in p for t, p in m), 30)
        assert home.publish(mine, b'{"command": "undo", "request_id": "acl-1"}') == 0
        assert watcher.wait_for(lambda m: any(t == result and b'"acl-1"' in p for t, p in m), 30)
        configs = {t for t, p in watcher.messages if t.startswith("homeassistant/") and t.endswith("/config") and p}
        expected = {t for t, _ in ha.discovery("faceberry", DEVICE, [], images=True, commands=True)}
        assert expected <= configs, expected - configs
        for topic in (ha.diagnostics_topic("faceberry", DEVICE), ha.image_topic("faceberry", DEVICE, "last_face")):
            assert watcher.wait_for(lambda m, topic=topic: any(t == topic for t, _ in m), 30), topic
        assert watcher.wait_for(lambda m: any(t.startswith(f"faceberry/{DEVICE}/presence/") and p == b"ON"
                                              for t, p in m), 30)
    finally:
        err = d.stop()
        home.close()
        watcher.close()
    answers = {json.loads(p)["request_id"]: json.loads(p) for t, p in watcher.messages if t == result}
    assert "retained command ignored" in answers["old"]["message"] and answers["acl-1"]["ok"] is False
    assert "command undo refused: no correction to undo" in err
    denied = [line for line in broker.log.read_text(errors="replace").splitlines() if "Denied" in line]
    assert denied and all(f"Denied PUBLISH from {DAEMON}-" in line and f"'{mine}'" in line for line in denied), denied
    assert len({line.split("'")[1] for line in denied}) == 1
