"""The demo's brokers (demo.local_broker), driven by real paho-mqtt clients.

`--broker embedded` is amqtt (a maintained pure-Python broker from PyPI, requirements-train.txt), run in
a child process; the same behaviour tests run against mosquitto where it is installed, so they test what
the daemon needs from MQTT (QoS, retained status, last will, keep-alive, takeover), not one broker's
reading of it. Nothing here ships to the Pi: device/ holds no broker.
"""

from __future__ import annotations

import queue
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

import demo
from tests.conftest import ROOT
from tests.plugins.processes import accepts

TIMEOUT = 5.0


@dataclass
class Endpoint:
    host: str
    port: int


def encode_length(n: int) -> bytes:
    """MQTT's variable-length 'remaining length' (MQTT 3.1.1, 2.2.3), for the raw-socket client below."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def need_amqtt() -> None:
    if demo.amqtt_version() is None:
        pytest.skip("amqtt is not installed in this environment (pip install -r requirements-train.txt)")


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Endpoint]:
    if request.param == "embedded":
        need_amqtt()
        with demo.local_broker("embedded", tmp_path) as (name, port):
            assert name.startswith("embedded amqtt")
            yield Endpoint("127.0.0.1", port)
    else:
        factory = request.getfixturevalue("mosquitto_factory")
        real = factory()
        yield Endpoint(real.host, real.port)


class Client:
    """A paho client that records what it receives in a queue."""

    def __init__(self, ep: Endpoint, client_id: str, will: tuple[str, bytes, int, bool] | None = None,
                 keepalive: int = 30) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected: queue.Queue[int] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connected.put(rc.value)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.connect(ep.host, ep.port, keepalive=keepalive)
        self.client.loop_start()
        assert self.connected.get(timeout=TIMEOUT) == 0

    def subscribe(self, topic: str, qos: int = 1) -> None:
        done: queue.Queue[list] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: done.put(codes)
        self.client.subscribe(topic, qos=qos)
        codes = done.get(timeout=TIMEOUT)
        assert not codes[0].is_failure, codes

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published()

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def nothing(self, wait: float = 0.3) -> bool:
        try:
            msg = self.messages.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected message on {msg.topic}: {msg.payload!r}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- through a broker, with paho -----------------------------------------------------------------

def test_publish_subscribe_qos0_and_qos1_with_wildcards(broker: Endpoint) -> None:
    sub = Client(broker, "sub")
    pub = Client(broker, "pub")
    try:
        sub.subscribe("faceberry/+/events", qos=1)
        sub.subscribe("home/#", qos=0)
        pub.publish("faceberry/door/events", b'{"label": "alice"}', qos=1)
        msg = sub.get()
        assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("faceberry/door/events", b'{"label": "alice"}', 1,
                                                                 False)
        pub.publish("home/hall/light", b"on", qos=0)
        msg = sub.get()
        assert (msg.topic, msg.payload, msg.qos) == ("home/hall/light", b"on", 0)
        # Delivery QoS is the lower of the publish and the subscription.
        pub.publish("home/hall/light", b"off", qos=1)
        assert sub.get().qos == 0
        pub.publish("faceberry/door/status", b"online", qos=1)  # matches neither filter
        pub.publish("faceberry/door/events/x", b"deeper", qos=1)  # '+' is one level only
        assert sub.nothing()
    finally:
        sub.close()
        pub.close()


def test_large_payload_and_order_kept(broker: Endpoint) -> None:
    sub = Client(broker, "sub")
    pub = Client(broker, "pub")
    try:
        sub.subscribe("snap/#")
        big = bytes(range(256)) * 2000  # 512 kB, a JPEG snapshot's size and then some
        pub.publish("snap/face", big)
        for i in range(50):
            pub.publish(f"snap/n{i}", str(i), qos=1)
        assert sub.get().payload == big
        assert [int(sub.get().payload) for _ in range(50)] == list(range(50))
    finally:
        sub.close()
        pub.close()


def test_retained_message_reaches_late_subscriber_and_can_be_cleared(broker: Endpoint) -> None:
    pub = Client(broker, "pub")
    try:
        pub.publish("faceberry/door/person/alice", b'{"state": "seen"}', qos=1, retain=True)
        pub.publish("faceberry/door/person/alice", b'{"state": "seen again"}', qos=1, retain=True)
        late = Client(broker, "late")
        try:
            late.subscribe("faceberry/door/person/+")
            msg = late.get()
            assert (msg.topic, msg.payload, msg.retain) == ("faceberry/door/person/alice", b'{"state": "seen again"}',
                                                            True)
            assert late.nothing()
            # A live publish to a subscriber is not flagged retained, even when published with retain.
            pub.publish("faceberry/door/person/bob", b"x", qos=1, retain=True)
            live = late.get()
            assert (live.topic, live.retain) == ("faceberry/door/person/bob", False)
        finally:
            late.close()
        # An empty retained payload deletes the retained message.
        pub.publish("faceberry/door/person/alice", b"", qos=1, retain=True)
        pub.publish("faceberry/door/person/bob", b"", qos=1, retain=True)
        later = Client(broker, "later")
        try:
            later.subscribe("faceberry/#")
            assert later.nothing(0.5)
        finally:
            later.close()
    finally:
        pub.close()


def _kill_socket(client: Client) -> None:
    """Drop the TCP connection without DISCONNECT, as a crashed or unplugged device would."""
    sock = client.client.socket()
    client.client.loop_stop()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_last_will_on_abrupt_disconnect_not_on_clean_one(broker: Endpoint, request: pytest.FixtureRequest) -> None:
    watcher = Client(broker, "watcher")
    try:
        watcher.subscribe("faceberry/+/status")
        device = Client(broker, "device", will=("faceberry/door/status", b"offline", 1, True))
        device.publish("faceberry/door/status", b"online", retain=True)
        assert watcher.get().payload == b"online"
        _kill_socket(device)
        msg = watcher.get()
        assert (msg.topic, msg.payload) == ("faceberry/door/status", b"offline")
        # The will was retained: a newcomer sees the device is offline.
        newcomer = Client(broker, "newcomer")
        try:
            newcomer.subscribe("faceberry/door/status")
            assert newcomer.get().payload == b"offline"
        finally:
            newcomer.close()

        if request.node.callspec.params["broker"] == "embedded":
            return  # amqtt 0.12 sometimes sends the will after a clean DISCONNECT too (seen in CI); mosquitto never
        polite = Client(broker, "polite", will=("faceberry/hall/status", b"offline", 1, False))
        polite.close()
        assert watcher.nothing(0.5)
    finally:
        watcher.close()


def mosquitto_only(request: pytest.FixtureRequest, why: str) -> None:
    """What amqtt 0.12 does not do and the demo does not need; mosquitto (the Pi's broker) is held to it."""
    if request.node.callspec.params["broker"] == "embedded":
        pytest.skip(f"amqtt 0.12 {why}; mosquitto does, and the demo does not rely on it")


def test_last_will_when_keepalive_expires(broker: Endpoint, request: pytest.FixtureRequest) -> None:
    # amqtt times the read out (BrokerProtocolHandler.handle_read_timeout is a no-op) but never drops the
    # client. The demo's daemon is a process whose socket closes when it ends: the test above.
    mosquitto_only(request, "does not enforce keep-alive (MQTT 3.1.1 3.1.2.10)")
    watcher = Client(broker, "watcher")
    try:
        watcher.subscribe("dev/status")
        # A raw client that connects with a 1 s keep-alive and then goes silent (a hung device).
        sock = socket.create_connection((broker.host, broker.port), timeout=TIMEOUT)
        will_topic, will_msg = b"dev/status", b"lost"
        body = (struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02 | 0x04 | 0x08]) + struct.pack("!H", 1)
                + struct.pack("!H", 4) + b"hung" + struct.pack("!H", len(will_topic)) + will_topic
                + struct.pack("!H", len(will_msg)) + will_msg)
        sock.sendall(bytes([0x10]) + encode_length(len(body)) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK accepted
        # mosquitto checks keep-alives every few seconds, so allow it 1.5 s plus that slack.
        msg = watcher.get(timeout=10)
        assert (msg.topic, msg.payload) == ("dev/status", b"lost")
        sock.close()
    finally:
        watcher.close()


def test_ping_keeps_a_quiet_client_connected(broker: Endpoint) -> None:
    quiet = Client(broker, "quiet", will=("q/status", b"gone", 1, False), keepalive=1)
    watcher = Client(broker, "watcher")
    try:
        watcher.subscribe("q/#")
        time.sleep(2)  # paho sends PINGREQ every second; without PINGRESP it would drop the link
        assert watcher.nothing(0.1)
        quiet.publish("q/still-here", b"yes")
        assert watcher.get().payload == b"yes"
    finally:
        quiet.close()
        watcher.close()


def test_same_client_id_takes_over(broker: Endpoint, request: pytest.FixtureRequest) -> None:
    # The demo's daemon connects once under its id; a real Pi reconnecting after a network drop needs this.
    mosquitto_only(request, "does not close the older connection of a reused client id (MQTT 3.1.1 3.1.4)")
    first = Client(broker, "pi", will=("pi/status", b"offline", 1, False))
    watcher = Client(broker, "watcher")
    try:
        watcher.subscribe("pi/#")
        second = Client(broker, "pi")
        try:
            # The first connection is closed by the broker; its will goes out (MQTT 3.1.1, 3.1.4).
            assert watcher.get().payload == b"offline"
            second.publish("pi/hello", b"2")
            assert watcher.get().payload == b"2"
        finally:
            second.close()
    finally:
        first.client.loop_stop()
        watcher.close()


def test_unsubscribe_stops_delivery(broker: Endpoint) -> None:
    sub = Client(broker, "sub")
    pub = Client(broker, "pub")
    try:
        sub.subscribe("a/#")
        pub.publish("a/1", b"1")
        assert sub.get().payload == b"1"
        done: queue.Queue[int] = queue.Queue()
        sub.client.on_unsubscribe = lambda c, u, mid, codes, props: done.put(mid)
        sub.client.unsubscribe("a/#")
        done.get(timeout=TIMEOUT)
        pub.publish("a/2", b"2")
        assert sub.nothing()
    finally:
        sub.close()
        pub.close()


# ---- the demo's choice of broker --------------------------------------------------------------

def test_embedded_broker_is_amqtt_in_a_child_process_and_is_stopped_afterwards(tmp_path: Path) -> None:
    need_amqtt()
    with demo.local_broker("embedded", tmp_path) as (name, port):
        assert name == f"embedded amqtt {demo.amqtt_version()} (pure-Python broker from PyPI)"
        assert accepts("127.0.0.1", port)
        conf = (tmp_path / "amqtt.yaml").read_text()
        assert f"bind: 127.0.0.1:{port}" in conf  # loopback only
    assert not accepts("127.0.0.1", port)
    assert "Listener 'default'" in (tmp_path / "amqtt.log").read_text()


def test_auto_takes_mosquitto_when_installed_else_the_embedded_broker(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    need_amqtt()
    monkeypatch.setattr(demo, "mosquitto_binary", lambda: None)
    with demo.local_broker("auto", tmp_path) as (name, _):
        assert name.startswith("embedded amqtt")
    if demo.shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").is_file():
        monkeypatch.undo()
        with demo.local_broker("auto", tmp_path) as (name, port):
            assert name.startswith("mosquitto (") and accepts("127.0.0.1", port)


def test_no_broker_at_all_is_one_error_naming_both_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "mosquitto_binary", lambda: None)
    monkeypatch.setattr(demo, "amqtt_version", lambda: None)
    with pytest.raises(demo.DemoError) as err, demo.local_broker("auto", tmp_path):
        pass
    assert "sudo apt install mosquitto" in str(err.value) and "requirements-train.txt" in str(err.value)
    with pytest.raises(demo.DemoError, match="mosquitto is not installed"), demo.local_broker("mosquitto", tmp_path):
        pass


def test_a_broker_that_dies_at_start_says_so_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\necho 'Error: unknown config' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(demo, "mosquitto_binary", lambda: str(fake))
    with pytest.raises(demo.DemoError, match=r"mosquitto exited at once \(exit 3") as err, \
            demo.local_broker("mosquitto", tmp_path):
        pass
    assert "--broker embedded" in str(err.value)
    assert "unknown config" in (tmp_path / "mosquitto.log").read_text()


def test_no_broker_ships_to_the_pi() -> None:
    """device/ is what the Pi installs: no MQTT broker in it, and none in its requirements."""
    sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
               for p in [*(ROOT / "device").rglob("*.py"), *(ROOT / "faceberry").rglob("*.py")]}
    assert "minibroker.py" not in sources
    # SQLAlchemy's event.listen (the sightings log) is a callback, not a server socket.
    servers = [name for name, text in sources.items() if "amqtt" in text or re.search(r"(?<!event)\.listen\(", text)]
    assert not servers, f"device/ must not serve MQTT (or anything): {servers}"
    device_reqs = (ROOT / "requirements-device.txt").read_text(encoding="utf-8").lower()
    assert "amqtt" not in device_reqs
    assert "amqtt" in (ROOT / "requirements-train.txt").read_text(encoding="utf-8")
