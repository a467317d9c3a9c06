"""A small MQTT 3.1.1 broker in pure Python, for the demo on machines without mosquitto.

It is not a production broker: on the Pi and with Home Assistant use mosquitto (or any real broker).
It implements what faceberry and a subscriber need, over plain TCP, without authentication:

- CONNECT/CONNACK (protocol level 4, and level 3 "MQIsdp"), client-id takeover, keep-alive timeout;
- PUBLISH at QoS 0, 1 (PUBACK) and 2 (PUBREC/PUBREL/PUBCOMP on the way in); delivery to subscribers at
  QoS 0 or 1 (a QoS 2 subscription is granted QoS 1);
- SUBSCRIBE/SUBACK and UNSUBSCRIBE/UNSUBACK with `+` and `#` wildcards (and `$`-topics kept out of them);
- retained messages (an empty retained payload deletes the topic's message);
- last will, published when a client goes away without DISCONNECT (closed socket, keep-alive expired,
  protocol error) and discarded after a clean DISCONNECT;
- PINGREQ/PINGRESP.

Sessions are always clean (no queued messages for offline clients): that is enough for a demo.

Run it alone with `python -m device.minibroker --port 1883`, or embed it:

    broker = MiniBroker(port=0).start()   # port 0: any free port, then read broker.port
    ...
    broker.stop()
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_BAD_CLIENT_ID = 2
MAX_PACKET = 16 * 1024 * 1024  # far above anything faceberry sends (events, JPEG snapshots)


class ProtocolError(Exception):
    """The client broke the protocol: the connection is closed and its will published."""


def encode_length(n: int) -> bytes:
    """MQTT's variable-length 'remaining length' (1–4 bytes, 7 bits each)."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_string(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + encode_length(len(body)) + body


def valid_topic_name(topic: str) -> bool:
    """A topic a message is published to: non-empty, no wildcards, no NUL."""
    return bool(topic) and not any(c in topic for c in "+#\0")


def valid_topic_filter(flt: str) -> bool:
    """A subscription filter: `+` fills a whole level, `#` only as the whole last level."""
    if not flt or "\0" in flt:
        return False
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(flt: str, topic: str) -> bool:
    """Whether a topic name matches a subscription filter (MQTT 3.1.1 section 4.7)."""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    f_levels = flt.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class _Reader:
    """Reads whole MQTT packets off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by the client")
            buf += chunk
        return bytes(buf)

    def read(self, only: int | None = None) -> tuple[int, int, bytes]:
        first = self._exact(1)[0]
        if only is not None and first >> 4 != only:
            # Checked before reading a length: a stray HTTP request should not hang the connection.
            raise ProtocolError(f"expected packet type {only}, got {first >> 4}")
        length, shift = 0, 0
        for _ in range(4):
            byte = self._exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            raise ProtocolError("malformed remaining length")
        if length > MAX_PACKET:
            raise ProtocolError(f"packet of {length} bytes is larger than {MAX_PACKET}")
        return first >> 4, first & 0x0F, self._exact(length)


class _Body:
    """Cursor over a packet's variable header and payload."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u8(self) -> int:
        if self.pos + 1 > len(self.data):
            raise ProtocolError("packet too short")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("packet too short")
        (value,) = struct.unpack_from("!H", self.data, self.pos)
        self.pos += 2
        return value

    def raw(self) -> bytes:
        n = self.u16()
        if self.pos + n > len(self.data):
            raise ProtocolError("string runs past the end of the packet")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def text(self) -> str:
        try:
            return self.raw().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    def more(self) -> bool:
        return self.pos < len(self.data)


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    address: str
    client_id: str = ""
    will: Message | None = None
    keepalive: int = 0
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> granted QoS
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    next_id: int = 0
    closed: bool = False

    def send(self, data: bytes) -> None:
        with self.send_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def packet_id(self) -> int:
        with self.send_lock:
            self.next_id = self.next_id % 65535 + 1
            return self.next_id


class MiniBroker:
    """A threaded MQTT 3.1.1 broker on one TCP port (one thread per client)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._server: socket.socket | None = None
        self._lock = threading.RLock()
        self._clients: dict[str, _Client] = {}
        self._retained: dict[str, Message] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> MiniBroker:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind((self.host, self.port))
        except OSError as exc:
            server.close()
            raise OSError(f"cannot listen on {self.host}:{self.port} ({exc.strerror}); pick another --port") from exc
        server.listen(64)
        self.port = server.getsockname()[1]
        self._server = server
        thread = threading.Thread(target=self._accept_loop, name="minibroker-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        log.info("minibroker listening on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            self._close(client)
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> MiniBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def retained(self) -> dict[str, bytes]:
        """A copy of the retained messages, topic -> payload (for tests and debugging)."""
        with self._lock:
            return {t: m.payload for t, m in self._retained.items()}

    # ---- connections -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                sock, addr = self._server.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = _Client(sock, f"{addr[0]}:{addr[1]}")
            thread = threading.Thread(target=self._serve, args=(client,), name=f"minibroker-{client.address}",
                                      daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _close(self, client: _Client) -> None:
        with client.send_lock:
            client.closed = True
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)
        client.sock.close()

    def _serve(self, client: _Client) -> None:
        reader = _Reader(client.sock)
        clean_exit = False
        try:
            client.sock.settimeout(10)  # the CONNECT must come soon
            ptype, flags, body = reader.read(only=CONNECT)
            if not self._on_connect(client, _Body(body)):
                return
            # MQTT: the broker may drop a client silent for 1.5 × its keep-alive.
            client.sock.settimeout(client.keepalive * 1.5 if client.keepalive else None)
            while not self._stopping.is_set():
                ptype, flags, body = reader.read()
                if ptype == DISCONNECT:
                    client.will = None
                    clean_exit = True
                    return
                self._dispatch(client, ptype, flags, _Body(body))
        except TimeoutError:
            log.info("client %s: keep-alive expired", client.client_id or client.address)
        except (ConnectionError, OSError) as exc:
            if not client.closed:
                log.info("client %s: connection lost (%s)", client.client_id or client.address, exc)
        except ProtocolError as exc:
            log.warning("client %s: protocol error (%s); closing", client.client_id or client.address, exc)
        finally:
            with self._lock:
                if client.client_id and self._clients.get(client.client_id) is client:
                    del self._clients[client.client_id]
            will, client.will = client.will, None
            self._close(client)
            if will is not None and not clean_exit and not self._stopping.is_set():
                log.info("client %s gone: publishing its last will on %s", client.client_id, will.topic)
                self._route(will)

    def _on_connect(self, client: _Client, body: _Body) -> bool:
        name = body.text()
        level = body.u8()
        if (name, level) not in (("MQTT", 4), ("MQIsdp", 3)):
            client.send(packet(CONNACK, 0, bytes([0, CONNACK_BAD_PROTOCOL])))
            log.warning("client %s: unsupported protocol %r level %d", client.address, name, level)
            return False
        flags = body.u8()
        if flags & 0x01:
            raise ProtocolError("reserved CONNECT flag is set")
        clean_session = bool(flags & 0x02)
        client.keepalive = body.u16()
        client_id = body.text()
        if not client_id:
            if not clean_session:
                client.send(packet(CONNACK, 0, bytes([0, CONNACK_BAD_CLIENT_ID])))
                return False
            client_id = f"auto-{client.address}"
        if flags & 0x04:
            will_topic = body.text()
            will_payload = body.raw()
            will_qos = (flags >> 3) & 0x03
            if will_qos > 2 or not valid_topic_name(will_topic):
                raise ProtocolError("bad last will")
            client.will = Message(will_topic, will_payload, will_qos, bool(flags & 0x20))
        if flags & 0x80:
            body.text()  # username: accepted, not checked (demo broker, loopback only)
        if flags & 0x40:
            body.raw()
        client.client_id = client_id
        with self._lock:
            old = self._clients.get(client_id)
            self._clients[client_id] = client
        if old is not None:
            log.info("client %s connected again: closing its old connection", client_id)
            self._close(old)
        client.send(packet(CONNACK, 0, bytes([0, CONNACK_ACCEPTED])))
        log.info("client %s connected from %s (keep-alive %d s)", client_id, client.address, client.keepalive)
        return True

    # ---- packets ---------------------------------------------------------------------------------

    def _dispatch(self, client: _Client, ptype: int, flags: int, body: _Body) -> None:
        if ptype == PUBLISH:
            self._on_publish(client, flags, body)
        elif ptype == PUBREL:
            client.send(packet(PUBCOMP, 0, struct.pack("!H", body.u16())))
        elif ptype in (PUBACK, PUBCOMP):
            pass  # acks for what we sent at QoS 1; sessions are clean, nothing to retry
        elif ptype == PUBREC:
            client.send(packet(PUBREL, 0x02, struct.pack("!H", body.u16())))
        elif ptype == SUBSCRIBE:
            self._on_subscribe(client, flags, body)
        elif ptype == UNSUBSCRIBE:
            pid = body.u16()
            with self._lock:
                while body.more():
                    client.subscriptions.pop(body.text(), None)
            client.send(packet(UNSUBACK, 0, struct.pack("!H", pid)))
        elif ptype == PINGREQ:
            client.send(packet(PINGRESP, 0, b""))
        else:
            raise ProtocolError(f"unexpected packet type {ptype}")

    def _on_publish(self, client: _Client, flags: int, body: _Body) -> None:
        qos = (flags >> 1) & 0x03
        retain = bool(flags & 0x01)
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        topic = body.text()
        if not valid_topic_name(topic):
            raise ProtocolError(f"invalid topic name {topic!r}")
        pid = body.u16() if qos else 0
        payload = body.rest()
        self._route(Message(topic, payload, qos, retain))
        if qos == 1:
            client.send(packet(PUBACK, 0, struct.pack("!H", pid)))
        elif qos == 2:
            # Delivered once already (above); PUBREC/PUBREL/PUBCOMP completes the handshake.
            client.send(packet(PUBREC, 0, struct.pack("!H", pid)))

    def _on_subscribe(self, client: _Client, flags: int, body: _Body) -> None:
        if flags != 0x02:
            raise ProtocolError("SUBSCRIBE with wrong fixed-header flags")
        pid = body.u16()
        granted: list[int] = []
        new_filters: list[tuple[str, int]] = []
        while body.more():
            flt = body.text()
            qos = body.u8() & 0x03
            if qos == 3 or not valid_topic_filter(flt):
                granted.append(0x80)
                continue
            qos = min(qos, 1)
            granted.append(qos)
            new_filters.append((flt, qos))
        if not granted:
            raise ProtocolError("SUBSCRIBE without topic filters")
        with self._lock:
            for flt, qos in new_filters:
                client.subscriptions[flt] = qos
            retained = list(self._retained.values())
        client.send(packet(SUBACK, 0, struct.pack("!H", pid) + bytes(granted)))
        for flt, qos in new_filters:
            for msg in retained:
                if topic_matches(flt, msg.topic):
                    self._deliver(client, msg, min(qos, msg.qos), retain=True)

    # ---- routing ---------------------------------------------------------------------------------

    def _route(self, msg: Message) -> None:
        with self._lock:
            if msg.retain:
                if msg.payload:
                    self._retained[msg.topic] = msg
                else:
                    self._retained.pop(msg.topic, None)
            targets = []
            for client in self._clients.values():
                qos = max((q for f, q in client.subscriptions.items() if topic_matches(f, msg.topic)), default=-1)
                if qos >= 0:
                    targets.append((client, min(qos, msg.qos)))
        for client, qos in targets:
            # Live messages go out with retain cleared (MQTT 3.1.1, 3.3.1.3).
            self._deliver(client, msg, qos, retain=False)

    def _deliver(self, client: _Client, msg: Message, qos: int, retain: bool) -> None:
        header = (qos << 1) | (0x01 if retain else 0)
        body = encode_string(msg.topic)
        if qos:
            body += struct.pack("!H", client.packet_id())
        client.send(packet(PUBLISH, header, body + msg.payload))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m device.minibroker",
        description="A small MQTT 3.1.1 broker for trying faceberry without mosquitto (no TLS, no passwords: "
        "keep it on 127.0.0.1; use mosquitto on a real installation).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default 1883; 0 picks a free one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        broker = MiniBroker(args.host, args.port).start()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"minibroker listening on {broker.host}:{broker.port} (Ctrl-C to stop)", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
