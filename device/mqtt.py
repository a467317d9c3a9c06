"""The broker connection: paho-mqtt 2.x, QoS 1, retained status with a last will, reconnects.

paho keeps every QoS ≥ 1 message in its outgoing queue until the broker acknowledges it, across
disconnections, and resends it after reconnecting. We bound that queue ourselves (`queue_size`): while
the broker is away events pile up there, and within the bound none is lost; beyond it new events are
refused, counted and logged rather than hidden. Status messages (online/offline, discovery) are never
refused, so a full queue cannot leave the device looking offline.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device.events import OFFLINE, ONLINE, status_topic

log = logging.getLogger(__name__)


class MqttError(RuntimeError):
    """The broker settings cannot work (bad TLS files …) or the broker refused us."""


def make_client(cfg: Any, client_id: str, password: str | None) -> paho.Client:
    """A configured (not yet connected) paho client for an MqttConfig."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                         clean_session=True)
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


class MqttPublisher:
    """Publishes to one broker for one device; `status` is retained online/offline with a last will."""

    def __init__(self, cfg: Any, device_id: str, prefix: str = "faceberry", password: str | None = None) -> None:
        self.cfg = cfg
        self.qos = int(cfg.qos)
        self.status_topic = status_topic(prefix, device_id)
        self.client = make_client(cfg, cfg.client_id or f"faceberry-{device_id}", password)
        self.client.reconnect_delay_set(int(cfg.reconnect_min_delay), int(cfg.reconnect_max_delay))
        self.client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self._failures = 0
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self.published = 0  # acknowledged by the broker
        self.queued = 0  # handed to paho
        self.dropped = 0  # refused because the queue was full
        self.connects = 0
        self.last_error: str | None = None
        self._on_connect_hooks: list[Any] = []

    # paho callbacks run in its network thread.
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.last_error = str(reason)
            log.error("broker %s:%s refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            return
        self.connects += 1
        self._failures = 0
        log.info("connected to broker %s:%s%s", self.cfg.host, self.cfg.port,
                 "" if self.connects == 1 else f" (reconnect {self.connects - 1})")
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        for hook in self._on_connect_hooks:
            hook()
        self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            log.warning("lost the broker %s:%s (%s); reconnecting, events are queued (up to %d)",
                        self.cfg.host, self.cfg.port, reason, self.cfg.queue_size)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._failures += 1
        # Say it once, then quietly keep trying with backoff (the journal must not fill up).
        if self._failures == 1:
            log.warning("cannot reach the broker %s:%s; retrying in the background, events are queued (up to %d)",
                        self.cfg.host, self.cfg.port, self.cfg.queue_size)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            self.published += 1

    _stopping = False

    def on_connect(self, hook: Any) -> None:
        """Run `hook()` after every (re)connection, e.g. to republish discovery configs."""
        self._on_connect_hooks.append(hook)

    def start(self) -> None:
        """Connect in the background; the daemon runs (queuing events) even while the broker is down."""
        try:
            self.client.connect_async(self.cfg.host, int(self.cfg.port), keepalive=int(self.cfg.keepalive))
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self.cfg.host}:{self.cfg.port}: {exc}") from exc
        self.client.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, qos: int | None = None) -> bool:
        """Queue a message; False if it was dropped because the offline queue is full."""
        if self.pending >= self.cfg.queue_size:
            with self._lock:
                self.dropped += 1
            log.warning("MQTT queue full (%d messages waiting for the broker): dropped a message to %s",
                        self.cfg.queue_size, topic)
            return False
        self.client.publish(topic, payload, qos=self.qos if qos is None else qos, retain=retain)
        with self._lock:
            self.queued += 1
        return True

    @property
    def pending(self) -> int:
        """Messages handed to paho and not yet acknowledged."""
        # No public accessor in paho 2.x; len() of a dict is atomic, and taking paho's mutex here could
        # deadlock against its network thread.
        return len(self.client._out_messages)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message is acknowledged (only possible while connected)."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.pending

    def stop(self, timeout: float = 5.0) -> None:
        """Publish offline, wait for the queue to drain (up to `timeout`), disconnect."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        if not self.connected:
            # Just started, or reconnecting: give queued events (and the online/offline pair) a chance.
            self.wait_connected(timeout)
        if self.connected:
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline: %s", exc)
            if not self.flush(max(0.0, deadline - time.monotonic())):
                log.warning("shutting down with %d messages not acknowledged by the broker", self.pending)
        elif self.pending:
            log.warning("shutting down while the broker is unreachable: %d queued messages are lost", self.pending)
        self.client.disconnect()
        self.client.loop_stop()

    def stats(self) -> dict[str, int]:
        return {"queued": self.queued, "published": self.published, "pending": self.pending,
                "dropped": self.dropped, "connects": self.connects}


def probe(cfg: Any, client_id: str, password: str | None, timeout: float = 5.0) -> str | None:
    """Connect once and disconnect: None if the broker accepted us, else the reason."""
    client = make_client(cfg, client_id, password)
    result: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, int(cfg.port), keepalive=int(cfg.keepalive))
    except (OSError, ValueError) as exc:
        return f"cannot connect to {cfg.host}:{cfg.port}: {exc}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"no answer from {cfg.host}:{cfg.port} within {timeout:g}s"
        reason = result["reason"]
        if reason.is_failure:
            return f"broker refused the connection: {reason} (check mqtt.username and the password)"
        return None
    finally:
        client.disconnect()
        client.loop_stop()
