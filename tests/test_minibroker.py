"""The demo's embedded MQTT broker, driven by real paho-mqtt clients.

The behaviour tests run against the minibroker and, where it is installed, against mosquitto too:
the reference broker must pass the same assertions, so they test MQTT, not our reading of it.
"""

from __future__ import annotations

import queue
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest

from device.minibroker import MiniBroker, encode_length, topic_matches, valid_topic_filter
from tests.fixtures_broker import free_port

TIMEOUT = 5.0


@dataclass
class Endpoint:
    host: str
    port: int


@pytest.fixture(params=["minibroker", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    if request.param == "minibroker":
        mini = MiniBroker(port=0).start()
        try:
            yield Endpoint(mini.host, mini.port)
        finally:
            mini.stop()
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


# ---- pure functions -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("+/+", "/x", True),  # an empty level is still a level
        ("#", "faceberry/pi/events", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("faceberry/+/person/+", "faceberry/door/person/alice", True),
        ("faceberry/+/person/+", "faceberry/door/events", False),
    ],
)
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


@pytest.mark.parametrize(("flt", "ok"), [("a/#", True), ("a/#/b", False), ("a/b#", False), ("a+/b", False),
                                         ("+", True), ("", False)])
def test_valid_topic_filter(flt: str, ok: bool) -> None:
    assert valid_topic_filter(flt) is ok


@pytest.mark.parametrize(("n", "encoded"), [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"),
                                            (16383, b"\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01")])
def test_encode_length(n: int, encoded: bytes) -> None:
    assert encode_length(n) == encoded


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


def test_last_will_on_abrupt_disconnect_not_on_clean_one(broker: Endpoint) -> None:
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

        polite = Client(broker, "polite", will=("faceberry/hall/status", b"offline", 1, False))
        polite.close()
        assert watcher.nothing(0.5)
    finally:
        watcher.close()


def test_last_will_when_keepalive_expires(broker: Endpoint) -> None:
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


def test_same_client_id_takes_over(broker: Endpoint) -> None:
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


# ---- minibroker only -----------------------------------------------------------------------------

def test_refuses_other_protocol_versions() -> None:
    with MiniBroker(port=0) as mini:
        sock = socket.create_connection((mini.host, mini.port), timeout=TIMEOUT)
        body = struct.pack("!H", 4) + b"MQTT" + bytes([5, 0x02]) + struct.pack("!H", 30) + struct.pack("!H", 1) + b"x"
        sock.sendall(bytes([0x10]) + encode_length(len(body)) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x01"  # unacceptable protocol version
        sock.close()


def test_garbage_closes_the_connection_and_the_broker_lives_on() -> None:
    with MiniBroker(port=0) as mini:
        sock = socket.create_connection((mini.host, mini.port), timeout=TIMEOUT)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert sock.recv(16) == b""  # closed
        sock.close()
        ok = Client(Endpoint(mini.host, mini.port), "after")
        ok.subscribe("x")
        ok.publish("x", b"fine")
        assert ok.get().payload == b"fine"
        ok.close()


def test_command_line_broker_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "device.minibroker", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert f"127.0.0.1:{port}" in line
        client = Client(Endpoint("127.0.0.1", port), "cli")
        client.subscribe("t")
        client.publish("t", b"ok")
        assert client.get().payload == b"ok"
        client.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_command_line_reports_a_busy_port() -> None:
    with MiniBroker(port=0) as mini:
        proc = subprocess.run([sys.executable, "-m", "device.minibroker", "--port", str(mini.port)],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot listen on") and "--port" in proc.stderr
