"""The broker connection: paho-mqtt 2.x, QoS 1, retained status with a last will, reconnects, and the
durable outbox every event goes through.

Flow of a message: `MqttPublisher.publish()` appends it to the on-disk `Outbox` (device/outbox.py) and
returns; a sender thread hands the oldest waiting rows to paho while the broker is connected (at most
`mqtt.queue_size` unacknowledged at a time) and deletes each row when its PUBACK arrives. So the queue
that matters lives on disk and is ours: a broker outage, a stop, a SIGKILL or a crash loses nothing that
reached `publish()`, within the outbox bounds (`mqtt.outbox`); the next start replays what is left, in
order, with the original payloads. Delivery is at least once: subscribers de-duplicate by `event_id`.

The status topic (online/offline, and the last will) bypasses the outbox: it describes the connection
itself, so replaying an old one would be a lie.

Failures are loud and specific: every failed connection attempt is explained (TLS verification, refused
credentials, a plain client on a TLS port, DNS, nothing listening) with the fix, logged once per distinct
reason and repeated at most every `REPEAT_S` while it lasts; `state` carries it to the stats. If paho's
network thread dies of an exception, `fatal` says why and the daemon stops with a non-zero code instead
of running on with no MQTT.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device.errors import FaceberryError
from device.events import OFFLINE, ONLINE, status_topic
from device.outbox import Outbox, default_state_dir

log = logging.getLogger(__name__)

# A failure that persists is logged again at most this often (seconds), with how long it has lasted.
REPEAT_S = 60.0


class MqttError(FaceberryError):
    """The broker settings cannot work (bad TLS files …), the broker refused us, or the client died."""


class _Client(paho.Client):
    """paho's client, remembering why the last connection attempt failed and whether its thread died.

    paho catches the OSError of a failed attempt and calls on_connect_fail without it; the reason
    (an ssl verification message, "connection refused", a DNS error) is what the user needs to see.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connect_error: OSError | None = None
        self.got_connack = False
        self.crash: BaseException | None = None

    def reconnect(self) -> MQTTErrorCode:
        self.connect_error = None
        self.got_connack = False
        try:
            return super().reconnect()
        except OSError as exc:
            self.connect_error = exc
            raise

    def loop_forever(self, timeout: float = 1.0, retry_first_connection: bool = False) -> MQTTErrorCode:
        # loop_start() runs this in paho's thread; an exception (a callback's bug, a value paho cannot
        # encode) would end the thread with a traceback and leave the daemon publishing into nothing.
        try:
            return super().loop_forever(timeout, retry_first_connection)
        except Exception as exc:
            self.crash = exc
            log.error("the MQTT client's network thread died: %s: %s", type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return MQTTErrorCode.MQTT_ERR_UNKNOWN


def make_client(cfg: Any, client_id: str, password: str | None) -> _Client:
    """A configured (not yet connected) paho client for an MqttConfig."""
    client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, clean_session=True)
    if cfg.username:
        client.username_pw_set(cfg.username, password)
    if cfg.tls.enabled:
        try:
            client.tls_set(
                ca_certs=cfg.tls.ca or None,
                certfile=cfg.tls.cert or None,
                keyfile=cfg.tls.key or None,
                cert_reqs=ssl.CERT_NONE if cfg.tls.insecure else ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise MqttError(f"mqtt.tls: cannot load the certificates ({exc}); check mqtt.tls.ca/cert/key") from exc
        if cfg.tls.insecure:
            client.tls_insecure_set(True)
    return client


def explain_connect_error(exc: BaseException, cfg: Any) -> tuple[str, str]:
    """(a key naming the kind of failure, one line with the reason and the fix) for a failed attempt."""
    where = f"{cfg.host}:{cfg.port}"
    tls = bool(getattr(getattr(cfg, "tls", None), "enabled", False))
    if isinstance(exc, ssl.SSLCertVerificationError):
        # The words OpenSSL users search for, then OpenSSL's own reason.
        detail = f"certificate verify failed: {exc.verify_message}" if exc.verify_message else str(exc)
        if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
            return "tls-hostname", (f"TLS: the broker's certificate at {where} is not valid for the name "
                                    f"{cfg.host!r} ({detail}); set mqtt.host to a name the certificate lists")
        if "expired" in detail.lower() or "not yet valid" in detail.lower():
            return "tls-expired", (f"TLS: the broker's certificate at {where} is out of date ({detail}); "
                                   "renew it, and check this device's clock")
        return "tls-verify", (f"TLS: the broker's certificate at {where} is not trusted ({detail}); set "
                              "mqtt.tls.ca to the CA certificate that signed it")
    if isinstance(exc, ssl.SSLError):
        text = str(exc)
        if "WRONG_VERSION_NUMBER" in text or "EOF" in text.upper() or "record layer" in text.lower():
            return "tls-protocol", (f"TLS handshake with {where} failed ({text}): this port does not speak "
                                    "TLS; use the broker's TLS port (usually 8883) or set mqtt.tls.enabled: false")
        return "tls", f"TLS handshake with {where} failed ({text}); check mqtt.tls and the broker's TLS listener"
    if isinstance(exc, socket.gaierror):
        return "dns", (f"cannot reach the broker: host name {cfg.host!r} does not resolve ({exc}); check "
                       "mqtt.host and DNS")
    if isinstance(exc, ConnectionRefusedError):
        return "refused", (f"cannot reach the broker {where}: connection refused; is the broker running, and is "
                           "mqtt.port right?")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout", f"cannot reach the broker {where}: no answer (timeout); check the network and firewalls"
    if isinstance(exc, OSError):
        hint = " (with TLS)" if tls else ""
        return f"os-{exc.errno}", f"cannot reach the broker {where}{hint}: {exc}; check the network and mqtt.host"
    return "other", f"cannot connect to the broker {where}: {type(exc).__name__}: {exc}"


def explain_refusal(reason: Any, cfg: Any) -> tuple[str, str]:
    """(key, line) for a CONNACK that refused us, with the fix for each reason code."""
    text = str(reason)
    lowered = text.lower()
    where = f"{cfg.host}:{cfg.port}"
    if "user name or password" in lowered or "bad authentication" in lowered:
        return "auth", (f"the broker {where} refused the login ({text}): check mqtt.username and the password "
                        "in mqtt.password_file")
    if "not authori" in lowered:
        if cfg.username:
            # mosquitto answers a wrong password with "Not authorized" too: name both suspects.
            return "not-authorized", (f"the broker {where} refused the login of user {cfg.username!r} ({text}): "
                                      "check mqtt.username and the password in mqtt.password_file, and the "
                                      "broker's ACL for this user")
        return "not-authorized", (f"the broker {where} does not authorise anonymous clients ({text}): set "
                                  "mqtt.username and mqtt.password_file")
    if "identifier" in lowered:
        return "client-id", f"the broker {where} rejected the client id ({text}); set mqtt.client_id"
    if "protocol" in lowered:
        return "protocol", f"the broker {where} refused MQTT 3.1.1 ({text}); upgrade the broker"
    return f"refused-{text}", f"the broker {where} refused the connection ({text}); see the broker's log"


class _FailureLog:
    """Logs each distinct failure once, repeats a persisting one at most every `repeat_s`."""

    def __init__(self, repeat_s: float = REPEAT_S) -> None:
        self.repeat_s = repeat_s
        self._last: dict[str, float] = {}
        self.attempts = 0
        self.since: float | None = None

    def report(self, key: str, message: str, level: int) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.since is None:
            self.since = now
        last = self._last.get(key)
        if last is None:
            log.log(level, "%s", message)
            self._last[key] = now
        elif now - last >= self.repeat_s:
            log.log(level, "%s (still failing: %d attempts in %.0f s)", message, self.attempts, now - self.since)
            self._last[key] = now

    def recovered(self) -> str | None:
        """A line for the log if there were failures, and forget them."""
        if not self.attempts:
            return None
        line = f"after {self.attempts} failed attempts over {time.monotonic() - (self.since or 0):.0f} s"
        self._last.clear()
        self.attempts = 0
        self.since = None
        return line


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "_"


class MqttPublisher:
    """Publishes to one broker for one device through a durable outbox.

    `status` is retained online/offline with a last will. `outbox` is an `Outbox` or the path of its
    file (default: outbox-<client id>.sqlite3 in `default_state_dir()`); the publisher owns it and
    closes it in `stop()`.
    """

    def __init__(self, cfg: Any, device_id: str, prefix: str = "faceberry", password: str | None = None, *,
                 outbox: Outbox | str | Path | None = None, summary_interval: float = 60.0) -> None:
        self.cfg = cfg
        self.qos = int(cfg.qos)
        self.status_topic = status_topic(prefix, device_id)
        client_id = cfg.client_id or f"faceberry-{device_id}"
        if outbox is None:
            outbox = default_state_dir() / f"outbox-{_file_safe(client_id)}.sqlite3"
        if not isinstance(outbox, Outbox):
            settings = getattr(cfg, "outbox", None)
            outbox = Outbox(outbox, max_messages=getattr(settings, "max_messages", 10_000),
                            max_bytes=getattr(settings, "max_bytes", 50_000_000),
                            sync=getattr(settings, "sync", "normal"))
        self.outbox = outbox
        if outbox.recovered:
            log.info("outbox %s: %d messages left by the last run are sent first", outbox.path, outbox.recovered)
        self.client = make_client(cfg, client_id, password)
        self.client.reconnect_delay_set(int(cfg.reconnect_min_delay), int(cfg.reconnect_max_delay))
        self.client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        # Unacknowledged messages handed to paho; the rest wait on disk.
        self.max_inflight = max(1, int(getattr(cfg, "queue_size", 1000)))
        self.summary_interval = float(summary_interval)
        self._failures = _FailureLog()
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._stopping = False
        self._acked: deque[int] = deque()  # mids from paho's thread, resolved by the sender thread
        self._inflight: dict[int, tuple[int, int]] = {}  # paho mid -> (outbox row id, qos)
        self._sent_upto = 0  # highest outbox id handed to paho by this process
        self._sender: threading.Thread | None = None
        self._drops_logged = 0
        self._drops_logged_at = float("-inf")  # the first drops are reported at once
        self.published = 0  # acknowledged by the broker
        self.rejected = 0  # refused by paho itself (cannot be encoded): dropped, never retried
        self.connects = 0
        self.state = "connecting"
        self.last_error: str | None = None
        self._on_connect_hooks: list[Any] = []
        self._subscriptions: dict[str, tuple[int, Any]] = {}  # topic -> (qos, handler)
        self._status_info: paho.MQTTMessageInfo | None = None  # the latest `online`, outside the outbox

    # --- paho callbacks: they run in paho's network thread, and must not touch the database ---------

    def _on_connect(self, client: _Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.got_connack = True
        if reason.is_failure:
            key, line = explain_refusal(reason, self.cfg)
            self._fail(key, line, logging.ERROR)
            return
        self.connects += 1
        recovered = self._failures.recovered()
        self.state = "connected"
        log.info("connected to broker %s:%s%s%s", self.cfg.host, self.cfg.port,
                 "" if self.connects == 1 else f" (reconnect {self.connects - 1})",
                 f" {recovered}" if recovered else "")
        self._status_info = client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        # clean_session: the broker forgot our subscriptions with the last connection.
        for topic, (qos, _) in list(self._subscriptions.items()):
            client.subscribe(topic, qos=qos)
        for hook in self._on_connect_hooks:
            hook()
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, client: _Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            return
        if was:
            self.state = f"disconnected: {reason}"
            log.warning("lost the broker %s:%s (%s); reconnecting, events wait in the outbox (%d now)",
                        self.cfg.host, self.cfg.port, reason, len(self.outbox))
        elif not client.got_connack:
            # The TCP connection opened but the broker hung up before any CONNACK: the classic sign of a
            # plain client talking to a TLS listener (or a broker that drops us for its own reasons).
            if self.cfg.tls.enabled:
                line = (f"the broker {self.cfg.host}:{self.cfg.port} closed the connection before answering "
                        f"({reason}); see the broker's log")
            else:
                line = (f"the broker {self.cfg.host}:{self.cfg.port} closed the connection before answering "
                        f"({reason}): if this port is a TLS listener, set mqtt.tls.enabled: true (and mqtt.tls.ca)")
            self._fail("closed-before-connack", line, logging.ERROR)

    def _on_connect_fail(self, client: _Client, userdata: Any) -> None:
        exc = client.connect_error
        if exc is None:
            self._fail("unknown", f"cannot reach the broker {self.cfg.host}:{self.cfg.port}", logging.WARNING)
            return
        key, line = explain_connect_error(exc, self.cfg)
        # An unreachable broker may just not be up yet (a Pi boots faster); a TLS failure is a setting.
        level = logging.ERROR if key.startswith("tls") else logging.WARNING
        self._fail(key, f"{line}; retrying in the background, events wait in the outbox", level)

    def _fail(self, key: str, line: str, level: int) -> None:
        self.last_error = line
        self.state = f"error: {line}"
        self._failures.report(key, line, level)

    def _on_message(self, client: _Client, userdata: Any, msg: Any) -> None:
        # paho's thread: hand the bytes over and return; the handler must only queue them.
        entry = self._subscriptions.get(msg.topic)
        if entry is None:
            return
        try:
            entry[1](msg.topic, bytes(msg.payload))
        except Exception:  # a handler's bug must not kill paho's network thread
            log.exception("the handler of %s failed", msg.topic)

    def _on_publish(self, client: _Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # Called under paho's message lock: hand the mid over and return.
        self._acked.append(mid)
        self._wake.set()

    # --- the sender thread: outbox → paho, PUBACK → delete ----------------------------------------------

    def _send_loop(self) -> None:
        connects_seen = 0
        while not self._closing.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                if self.connected and self.connects != connects_seen:
                    connects_seen = self.connects
                    self._forget_qos0()
                if self.connected:
                    self._hand_over()
                self._resolve_acks()
                self._log_drops()
            except Exception:  # a bug here must not silently stop delivery: make it fatal
                log.exception("the MQTT sender thread failed")
                self.client.crash = self.client.crash or RuntimeError("the MQTT sender thread failed")
                return

    def _hand_over(self) -> None:
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for msg in self.outbox.after(self._sent_upto, room):
            if not self.connected:
                return
            try:
                info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            except (ValueError, TypeError) as exc:
                # paho refuses it outright (a wildcard in the topic, too large): retrying cannot help.
                self.rejected += 1
                log.error("cannot publish to %r: %s; the message is dropped", msg.topic, exc)
                self.outbox.ack([msg.id])
                self._sent_upto = msg.id
                continue
            self._inflight[info.mid] = (msg.id, msg.qos)
            self._sent_upto = msg.id

    def _resolve_acks(self) -> None:
        # Every mid recorded in _inflight was recorded by this thread before it got here, so a mid we
        # do not know belongs to a message that bypassed the outbox (status).
        done: list[int] = []
        while self._acked:
            entry = self._inflight.pop(self._acked.popleft(), None)
            if entry is not None:
                done.append(entry[0])
        if done:
            self.outbox.ack(done)
            self.published += len(done)

    def _forget_qos0(self) -> None:
        # paho discards QoS 0 messages it had not sent when the connection dropped: at most once is
        # what QoS 0 means, so their rows go too rather than blocking a slot forever.
        lost = [mid for mid, (_, qos) in self._inflight.items() if qos == 0]
        if lost:
            self.outbox.ack([self._inflight.pop(mid)[0] for mid in lost])

    def _log_drops(self, force: bool = False) -> None:
        dropped = self.outbox.dropped
        now = time.monotonic()
        if dropped > self._drops_logged and (force or now - self._drops_logged_at >= self.summary_interval):
            log.warning("outbox full (limits %d messages, %d bytes): dropped the %d oldest messages in the last "
                        "%.0f s (%d in all); raise mqtt.outbox.max_messages/max_bytes or bring the broker back",
                        self.outbox.max_messages, self.outbox.max_bytes, dropped - self._drops_logged,
                        min(now - self._drops_logged_at, self.summary_interval), dropped)
            self._drops_logged = dropped
            self._drops_logged_at = now

    # --- the public side ----------------------------------------------------------------------------------

    def on_connect(self, hook: Any) -> None:
        """Run `hook()` after every (re)connection, e.g. to republish discovery configs."""
        self._on_connect_hooks.append(hook)

    def subscribe(self, topic: str, handler: Any, qos: int = 1) -> None:
        """Call `handler(topic, payload)` in paho's thread for each message on `topic` (an exact topic, no
        wildcards), from now on and after every reconnection. The handler must only queue the message."""
        if "+" in topic or "#" in topic:
            raise ValueError(f"subscribe to exact topics only, not {topic!r}")
        self._subscriptions[topic] = (int(qos), handler)
        if self.connected:
            self.client.subscribe(topic, qos=int(qos))

    def start(self) -> None:
        """Connect in the background; the daemon runs (events wait on disk) even while the broker is down."""
        try:
            self.client.connect_async(self.cfg.host, int(self.cfg.port), keepalive=int(self.cfg.keepalive))
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self.cfg.host}:{self.cfg.port}: {exc}; check mqtt.host and "
                            "mqtt.port") from exc
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-outbox", daemon=True)
        self._sender.start()
        self.client.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def fatal(self) -> str | None:
        """Why MQTT cannot go on in this process (paho's thread died), else None."""
        crash = self.client.crash
        return None if crash is None else f"the MQTT client stopped: {type(crash).__name__}: {crash}"

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, qos: int | None = None) -> bool:
        """Store a message for delivery; False only if it could not be written to the outbox."""
        try:
            self.outbox.put(topic, payload, qos=self.qos if qos is None else qos, retain=retain)
        except Exception as exc:  # sqlite3.Error, OSError: a full or failing disk
            self._failures.report("outbox-write", f"cannot write to the outbox {self.outbox.path}: {exc}; "
                                  "the message is lost; check the free space in state_dir", logging.ERROR)
            return False
        self._wake.set()
        return True

    @property
    def pending(self) -> int:
        """Messages accepted and not yet acknowledged by the broker (on disk)."""
        return len(self.outbox)

    @property
    def dropped(self) -> int:
        return self.outbox.dropped

    def flush(self, timeout: float) -> bool:
        """Wait until every stored message (and `online`) is acknowledged (only possible while connected)."""
        deadline = time.monotonic() + timeout

        def done() -> bool:
            status = self._status_info
            return not self.pending and (status is None or status.is_published())

        while not done() and time.monotonic() < deadline and self.fatal is None:
            self._wake.set()
            time.sleep(0.02)
        return done()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is waiting (up to `timeout`), publish offline, disconnect, close the outbox.

        Whatever the broker has not acknowledged stays in the outbox for the next start. Idempotent.
        """
        if self._closing.is_set():
            return
        deadline = time.monotonic() + timeout
        if not self.connected and self.fatal is None:
            # Just started and still connecting: give it the time. A broker already known to be
            # unreachable gets a moment only; nothing is lost by not waiting, it is all on disk.
            self.wait_connected(timeout if not self._failures.attempts else min(timeout, 1.0))
        self._stopping = True
        if self.connected:
            if not self.flush(max(0.0, deadline - time.monotonic())):
                log.warning("stopping with %d messages not acknowledged by the broker: kept in the outbox %s "
                            "for the next start", self.pending, self.outbox.path)
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline: %s", exc)
        elif self.pending:
            log.warning("stopping while the broker is unreachable: %d messages kept in the outbox %s for the "
                        "next start", self.pending, self.outbox.path)
        self._closing.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        self._resolve_acks()
        self._log_drops(force=True)
        self.outbox.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state.split(":")[0] if self.state.startswith("error") else self.state,
                               "published": self.published, "pending": self.pending,
                               "inflight": len(self._inflight), "dropped": self.outbox.dropped,
                               "connects": self.connects}
        if self.rejected:
            out["rejected"] = self.rejected
        if self.last_error and not self.connected:
            out["error"] = self.last_error
        return out


def probe(cfg: Any, client_id: str, password: str | None, timeout: float = 5.0) -> str | None:
    """Connect once and disconnect: None if the broker accepted us, else the reason with its fix."""
    client = make_client(cfg, client_id, password)
    result: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        result["reason"] = reason
        done.set()

    def on_disconnect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        result.setdefault("closed", reason)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(cfg.host, int(cfg.port), keepalive=int(cfg.keepalive))
    except (OSError, ValueError) as exc:
        return explain_connect_error(exc, cfg)[1] if isinstance(exc, OSError) else \
            f"cannot connect to {cfg.host}:{cfg.port}: {exc}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"no answer from {cfg.host}:{cfg.port} within {timeout:g}s"
        if "reason" not in result:
            return (f"the broker {cfg.host}:{cfg.port} closed the connection before answering "
                    f"({result.get('closed')}); if this port is a TLS listener, set mqtt.tls.enabled: true")
        reason = result["reason"]
        if reason.is_failure:
            return explain_refusal(reason, cfg)[1]
        return None
    finally:
        client.disconnect()
        client.loop_stop()
