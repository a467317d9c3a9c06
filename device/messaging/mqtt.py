"""The broker connection: paho-mqtt 2.x, QoS 1, retained status with a last will, reconnects, and the
durable outbox every event goes through.

Flow of a message: `MqttPublisher.publish()` appends it to the on-disk `Outbox` (device/messaging/outbox.py) and
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
of running on with no MQTT. A failure that is a setting, not an absence (refused credentials, a
certificate that does not verify), lasting `mqtt.fatal_after_s`, ends the daemon with exit code 2 so systemd
shows it as failed (RestartPreventExitStatus=2) instead of a healthy-looking unit that publishes nothing; a
broker that is merely away never ends it.

Identity: the default client id is `faceberry-<device_id>-<install id>`, where the install id is 8 hex
characters derived from /etc/machine-id (an HMAC of it, never the id itself: systemd's rule for machine-id)
or, without one, a random id kept in the state directory. So two Pis given the same device_id (the
example's, or the stock hostname) do not knock each other off the broker, and one install keeps its id
across restarts. Two clients that do share a client id (an explicit `mqtt.client_id` copied to two Pis)
take the session from each other in a loop; that is detected (`TAKEOVER_COUNT` disconnects, each within
`TAKEOVER_SESSION_S` of connecting, in `TAKEOVER_WINDOW_S`), logged once with the fix and shown in the stats.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import sqlite3
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from faceberry.device.config import MqttConfig
from faceberry.device.messaging.outbox import Outbox, OutboxError, OutboxWriteError, default_state_dir
from faceberry.device.messaging.topics import Topics
from faceberry.device.outputs.events import OFFLINE, ONLINE
from faceberry.errors import EXIT_USAGE, FaceberryError
from faceberry.statefile import RateLimitedLog

log = logging.getLogger(__name__)

# Receives (topic, payload, retain) of a message on a subscribed topic, in paho's thread.
MessageHandler = Callable[[str, bytes, bool], None]

# A failure that persists is logged again at most this often (seconds), with how long it has lasted.
REPEAT_S = 60.0


# Where systemd (and D-Bus, on older systems) keep the machine id.
MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
INSTALL_ID_FILE = "install-id"  # in the state directory, when there is no machine id
INSTALL_ID_RE = re.compile(r"^[0-9a-f]{8}$")
# MQTT 3.1.1 only obliges a broker to accept client ids of 1-23 characters of 0-9 a-z A-Z; mosquitto, EMQX,
# HiveMQ, VerneMQ and NanoMQ accept much longer ones, so the readable default is longer and a strict broker
# gets a suggestion of this length (see explain_refusal).
MQTT311_CLIENT_ID_MAX = 23

# A session that the broker ends this soon after it began, TAKEOVER_COUNT times within TAKEOVER_WINDOW_S,
# is another client connecting with our client id (on MQTT 3.1.1 paho sees a plain disconnect).
TAKEOVER_SESSION_S = 10.0
TAKEOVER_COUNT = 3
TAKEOVER_WINDOW_S = 120.0

# Failures that are settings, not absences: lasting mqtt.fatal_after_s they end the daemon (exit 2).
PERMANENT_FAILURES = frozenset({"auth", "not-authorized", "client-id", "protocol", "tls-verify", "tls-hostname",
                                "tls-expired", "tls-protocol"})


class MqttError(FaceberryError):
    """The broker settings cannot work (bad TLS files …), the broker refused us, or the client died."""


class MqttConfigError(MqttError):
    """The broker keeps refusing this configuration (credentials, certificates): exit 2, do not restart."""

    exit_code = EXIT_USAGE


def install_id(state_dir: Path | None = None, machine_id_files: tuple[Path, ...] | None = None) -> str:
    """8 hex characters naming this install: the same at every start, different on another Pi.

    From the machine id when there is one (an HMAC keyed by it, so the id itself is never published, as
    machine-id(5) asks), else a random id created once in `state_dir` (default: `default_state_dir()`).
    """
    for path in MACHINE_ID_FILES if machine_id_files is None else machine_id_files:
        try:
            raw = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if raw:
            return hmac.new(raw.encode(), b"faceberry mqtt client id", hashlib.sha256).hexdigest()[:8]
    path = Path(state_dir or default_state_dir()) / INSTALL_ID_FILE
    for _ in range(2):
        try:
            text = path.read_text(encoding="ascii").strip()
            if INSTALL_ID_RE.match(text):
                return text
            log.warning("%s does not hold an install id (%r): making a new one", path, text[:20])
            path.unlink()
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the install id %s (%s): making a new one", path, exc)
        new = secrets.token_hex(4)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: of two daemons starting together, one writes and the other reads what it wrote.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            log.warning("cannot keep an install id in %s (%s): the MQTT client id will change at every start; "
                        "make state_dir writable or set mqtt.client_id", path, exc)
            return new
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(new + "\n")
            out.flush()
            os.fsync(out.fileno())
        return new
    return secrets.token_hex(4)


def default_client_id(device_id: str, install: str) -> str:
    """The client id used when mqtt.client_id is not set: readable in the broker's log, unique per install."""
    return f"faceberry-{device_id}-{install}"


def short_client_id(device_id: str, install: str) -> str:
    """A client id any MQTT 3.1.1 broker must accept (<= 23 of 0-9 a-z A-Z), for mqtt.client_id."""
    alnum = "".join(c for c in device_id if c.isascii() and c.isalnum())
    return ("fb" + alnum)[:MQTT311_CLIENT_ID_MAX - len(install)] + install


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


def make_client(cfg: MqttConfig, client_id: str, password: str | None) -> _Client:
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


def explain_connect_error(exc: BaseException, cfg: MqttConfig) -> tuple[str, str]:
    """(a key naming the kind of failure, one line with the reason and the fix) for a failed attempt."""
    where = f"{cfg.host}:{cfg.port}"
    tls = cfg.tls.enabled
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


def explain_refusal(reason: Any, cfg: MqttConfig, short_id: str | None = None) -> tuple[str, str]:
    """(key, line) for a CONNACK that refused us, with the fix for each reason code.

    `short_id`: a client id to suggest when the broker rejects ours (see `short_client_id`).
    """
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
        hint = ""
        if short_id:
            hint = (f" to at most {MQTT311_CLIENT_ID_MAX} letters and digits (this broker keeps to MQTT 3.1.1's "
                    f"minimum), e.g. mqtt.client_id: {short_id}")
        return "client-id", f"the broker {where} rejected the client id ({text}); set mqtt.client_id{hint}"
    if "protocol" in lowered:
        return "protocol", f"the broker {where} refused MQTT 3.1.1 ({text}); upgrade the broker"
    return f"refused-{text}", f"the broker {where} refused the connection ({text}); see the broker's log"


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "_"


class MqttPublisher:
    """Publishes to one broker for one device through a durable outbox.

    `status` is retained online/offline with a last will. `outbox` is an `Outbox` or the path of its
    file (default: outbox-<client id>.sqlite3 in `default_state_dir()`); the publisher owns it and
    closes it in `stop()`.
    """

    def __init__(self, cfg: MqttConfig, device_id: str, prefix: str = "faceberry", password: str | None = None, *,
                 outbox: Outbox | str | Path | None = None, summary_interval: float = 60.0,
                 topics: Topics | None = None) -> None:
        self.cfg = cfg
        self.qos = int(cfg.qos)
        self.status_topic = (topics or Topics(prefix, device_id)).status
        if outbox is None:
            # Named by device_id, not by client id: the file must be found again by the next start even if
            # the install id had to be made anew.
            outbox = default_state_dir() / f"outbox-{_file_safe(device_id)}.sqlite3"
        outbox_path = outbox.path if isinstance(outbox, Outbox) else Path(outbox)
        install = install_id(outbox_path.parent)
        self.client_id = cfg.client_id or default_client_id(device_id, install)
        self._short_id = short_client_id(device_id, install)
        client_id = self.client_id
        if not isinstance(outbox, Outbox):
            outbox = Outbox(outbox, max_messages=cfg.outbox.max_messages, max_bytes=cfg.outbox.max_bytes,
                            sync=cfg.outbox.sync)
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
        # Unacknowledged messages handed to paho; the rest wait on disk.
        self.max_inflight = max(1, int(cfg.queue_size))
        self.summary_interval = float(summary_interval)
        self._failures = RateLimitedLog(log, repeat_s=REPEAT_S)
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
        self.fatal_after_s = float(cfg.fatal_after_s)
        self._permanent_since: float | None = None  # monotonic start of an unbroken run of permanent failures
        self._permanent_line: str | None = None
        self._connected_at = 0.0
        self._short_sessions: deque[float] = deque()  # monotonic ends of sessions the broker cut short
        self.takeover: str | None = None  # the warning while a client id conflict is going on
        self.takeovers = 0  # conflicts detected (each logged once)
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._before_status_hooks: list[Callable[[], list[tuple[str, bytes]]]] = []
        self._subscriptions: dict[str, int] = {}  # topic -> qos, renewed at every connection
        self._status_info: paho.MQTTMessageInfo | None = None  # the latest `online`, outside the outbox

    # --- paho callbacks: they run in paho's network thread, and must not touch the database ---------

    def _on_connect(self, client: _Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.got_connack = True
        if reason.is_failure:
            key, line = explain_refusal(reason, self.cfg, None if self.cfg.client_id else self._short_id)
            self._fail(key, line, logging.ERROR)
            return
        self.connects += 1
        self._connected_at = time.monotonic()
        self._permanent_since = self._permanent_line = None
        recovered = self._failures.all_clear()
        self.state = "connected"
        # Under a takeover loop every connect and disconnect would be a line: the one warning says it all.
        log.log(logging.DEBUG if self._in_takeover() else logging.INFO, "connected to broker %s:%s%s%s",
                self.cfg.host, self.cfg.port, "" if self.connects == 1 else f" (reconnect {self.connects - 1})",
                f" {recovered}" if recovered else "")
        self._publish_before_status(client)
        self._status_info = client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        # clean_session: the broker forgot our subscriptions with the last connection.
        for topic, qos in list(self._subscriptions.items()):
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
            if self._note_short_session():
                self.state = f"error: {self.takeover}"
                return
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

    def _note_short_session(self) -> bool:
        """Count a session the broker ended soon after it began; True while that looks like a takeover loop."""
        now = time.monotonic()
        if now - self._connected_at < TAKEOVER_SESSION_S:
            self._short_sessions.append(now)
        while self._short_sessions and now - self._short_sessions[0] > TAKEOVER_WINDOW_S:
            self._short_sessions.popleft()
        if len(self._short_sessions) < TAKEOVER_COUNT:
            return False
        if self.takeover is None:
            self.takeovers += 1
            self.takeover = (f"the broker {self.cfg.host}:{self.cfg.port} ended our session "
                             f"{len(self._short_sessions)} times within {TAKEOVER_SESSION_S:g} s of connecting: "
                             f"another client probably uses the client id {self.client_id!r}; give each device "
                             "its own device_id (or mqtt.client_id), and never run two daemons with one config")
            self.last_error = self.takeover
            log.error("%s", self.takeover)
        return True

    def _in_takeover(self) -> bool:
        """Whether a detected takeover loop still goes on (a recent session was cut short)."""
        if self.takeover is None:
            return False
        if not self._short_sessions or time.monotonic() - self._short_sessions[-1] > TAKEOVER_WINDOW_S:
            log.info("client id %r: no session cut short for %.0f s, the conflict seems over", self.client_id,
                     TAKEOVER_WINDOW_S)
            self.takeover = None
            self._short_sessions.clear()
            return False
        return True

    def _fail(self, key: str, line: str, level: int) -> None:
        self.last_error = line
        self.state = f"error: {line}"
        self._failures.fail(key, line, level)
        if key in PERMANENT_FAILURES:
            if self._permanent_since is None:
                self._permanent_since = time.monotonic()
            self._permanent_line = line
        else:
            # The broker away, or the network: never a reason to exit, and it says nothing about the settings.
            self._permanent_since = self._permanent_line = None

    def _on_publish(self, client: _Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # Called under paho's message lock: hand the mid over and return.
        self._acked.append(mid)
        self._wake.set()

    def announce(self) -> bool:
        """Publish the states that precede the status, then `online`, again now (retained, as at a connection);
        False when not connected (the next connection does it). For a broker that does not keep this device's
        retained `online` where Home Assistant reads it (a clustered broker that keeps retained messages per
        node): Home Assistant's birth message then finds the device unavailable until this runs."""
        if not self.connected:
            return False
        self._publish_before_status(self.client)
        self._status_info = self.client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        return True

    def _publish_before_status(self, client: _Client) -> None:
        # Straight to the broker, ahead of `online`/`offline` on the same connection (which keeps their
        # order): the outbox is only handed over after `online`, too late for a state that must be right
        # when Home Assistant sees the device available again.
        for hook in self._before_status_hooks:
            try:
                for topic, payload in hook():
                    client.publish(topic, payload, qos=1, retain=True)
            except Exception:  # a hook's bug must not stop `online` (nor kill paho's thread)
                log.exception("publishing the states that precede the status failed")

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
                self.outbox.retry_deletes()
                self._log_drops()
            except (sqlite3.Error, OutboxError) as exc:
                # The disk, not a bug: the outbox has said what failed; delivery goes on when it can.
                self.outbox.failures.fail("sender", f"the MQTT sender met an outbox failure: {exc}; it goes on",
                                          logging.ERROR)
                self._closing.wait(1.0)
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

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook()` after every (re)connection, e.g. to republish discovery configs."""
        self._on_connect_hooks.append(hook)

    def before_status(self, hook: Callable[[], list[tuple[str, bytes]]]) -> None:
        """Publish the retained `(topic, payload)` pairs `hook()` returns straight to the broker, before
        every `online` and before the `offline` of a clean stop: states of this process (who is present)
        that a subscriber must have before it sees the device available. Not stored: a stale one replayed
        would be a lie, like a stale `online`. `hook` runs in paho's thread, or the stopping one."""
        self._before_status_hooks.append(hook)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        """Call `handler(topic, payload, retain)` in paho's thread for each message on `topic` (an exact topic,
        or a subtree ending in /#), from now on and after every reconnection; `retain` is true for a retained
        message the broker hands over at subscription (at every start and reconnection). The handler must only queue the
        message. Routed by paho itself (message_callback_add); a handler's exception is logged, never raised
        into paho's network thread."""
        # One filter form besides exact topics: a subtree (`…/library/#`), shared by every device.
        exact = topic[:-2] if topic.endswith("/#") else topic
        if "+" in exact or "#" in exact:
            raise ValueError(f"subscribe to exact topics or one subtree (a/b/#) only, not {topic!r}")

        def deliver(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            try:
                # retain: the broker sent it because we subscribed (an old message), not because it was just
                # published.
                handler(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:  # a handler's bug must not kill paho's network thread
                log.exception("the handler of %s failed", msg.topic)

        self._subscriptions[topic] = int(qos)
        self.client.message_callback_add(topic, deliver)
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
        """Why MQTT cannot go on in this process, else None: paho's thread died, or a permanent failure
        (refused credentials, certificates) has lasted mqtt.fatal_after_s."""
        error = self.fatal_error()
        return None if error is None else str(error)

    def fatal_error(self) -> MqttError | None:
        """`fatal` as the exception the daemon ends with: MqttConfigError (exit 2) for a permanent failure."""
        crash = self.client.crash
        if crash is not None:
            return MqttError(f"the MQTT client stopped: {type(crash).__name__}: {crash}; restart the daemon (the "
                             "outbox keeps the undelivered events)")
        since, line = self._permanent_since, self._permanent_line
        if since is not None and line and self.fatal_after_s > 0:
            lasted = time.monotonic() - since
            if lasted >= self.fatal_after_s and not self.connected:
                return MqttConfigError(f"{line} (for {lasted:.0f} s, mqtt.fatal_after_s {self.fatal_after_s:g}; "
                                       "undelivered events stay in the outbox)")
        return None

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, qos: int | None = None) -> bool:
        """Store a message for delivery; False only if it could not be written to the outbox."""
        try:
            self.outbox.put(topic, payload, qos=self.qos if qos is None else qos, retain=retain)
        except OutboxWriteError:
            # A full or failing disk: the outbox counted it as lost and logged the kind of failure (once,
            # then at most every few minutes); the daemon goes on and sends what was written.
            return False
        except Exception as exc:  # anything else the outbox meets must not stop the frame loop either
            self.outbox.lost += 1
            self.outbox.failures.fail(f"publish-{type(exc).__name__}", f"cannot store a message for {topic!r}: "
                                      f"{type(exc).__name__}: {exc}; it is lost (counted in the stats)", logging.ERROR)
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
            # Rows delivered whose delete the disk refused are done as far as the broker goes.
            return self.pending <= self.outbox.undeleted and (status is None or status.is_published())

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
        self.outbox.refresh()  # the line below says what the next start will find
        if self.connected:
            if not self.flush(max(0.0, deadline - time.monotonic())) or self.pending:
                log.warning("stopping with %d messages in the outbox %s for the next start%s", self.pending,
                            self.outbox.path, self._undeleted_note() or " (not acknowledged by the broker)")
            self._publish_before_status(self.client)
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline: %s", exc)
        elif self.pending:
            log.warning("stopping while the broker is unreachable: %d messages kept in the outbox %s for the "
                        "next start%s", self.pending, self.outbox.path, self._undeleted_note())
        self._closing.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        self._resolve_acks()
        self._log_drops(force=True)
        self.outbox.close()

    def close(self) -> None:
        """Never started (the daemon ended before it could): close the outbox, keeping what it holds."""
        self.outbox.close()

    def _undeleted_note(self) -> str:
        n = self.outbox.undeleted
        if not n:
            return ""
        return (f" ({n} of them delivered, but the disk refused to delete them: the next start sends them once "
                "more)")

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state.split(":")[0] if self.state.startswith("error") else self.state,
                               "published": self.published, "pending": self.pending,
                               "inflight": len(self._inflight), "dropped": self.outbox.dropped,
                               "lost": self.outbox.lost, "connects": self.connects}
        if self.rejected:
            out["rejected"] = self.rejected
        # Only when something happened: a damaged outbox at start, deletes the disk refuses.
        for key, value in (("undeleted", self.outbox.undeleted), ("salvaged", self.outbox.salvaged),
                           ("unreadable", self.outbox.unreadable)):
            if value:
                out[key] = value
        if self._in_takeover():
            out["client_id_conflict"] = self.takeover
        if self.last_error and not self.connected:
            out["error"] = self.last_error
        return out


def probe(cfg: MqttConfig, client_id: str, password: str | None, timeout: float = 5.0) -> str | None:
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
