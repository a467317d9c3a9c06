"""`python -m device sightings run` as a subprocess and the helpers its tests share (tests/test_sightings.py,
tests/test_bridge.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT

TOPIC = "faceberry/front-door/events"


class Logger:
    """`python -m device sightings run` in a subprocess, its log collected line by line."""

    def __init__(self, broker, db: str, client_id: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "device", "sightings", "run", "--host", broker.host, "--port", str(broker.port),
             "--db", db, "--client-id", client_id, "--stats-interval", "1", "--log-level", "DEBUG"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_log(self, text: str, count: int = 1, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(text in line for line in list(self.lines)) >= count:
                return True
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        return False

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._reader.join(5)
        return rc


def publish(broker, payloads: list[bytes], topic: str = TOPIC) -> None:
    """Publish at QoS 1 and wait for every PUBACK: the broker has them (and queues them for the logger)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def stored_ids(db: str) -> list[str]:
    store = _store(db)
    try:
        return [s.event_id for s in store.rows()]
    finally:
        store.close()


def wait_rows(db: str, want: set[str], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = stored_ids(db)
        except Exception:  # the logger has not created the schema yet
            got = []
        if want <= set(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)




def _store(db: str):
    from faceberry.device.ops.sightings import SightingsStore  # needs SQLAlchemy: the tests that use it skip without it

    return SightingsStore(db, create=False)
