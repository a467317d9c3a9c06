"""systemd's notify protocol against a real AF_UNIX datagram socket bound by the test as NOTIFY_SOCKET.

The daemon's Service runs in a thread over a looping folder of real photos and a real mosquitto: READY=1
after the models loaded and the first frame came, WATCHDOG=1 while frames flow, none once the frame loop
stalls inside the pipeline, STATUS= with fps, the bundle id, camera and MQTT state.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from faceberry.device.ops.notify import Notifier
from tests.plugins.daemon import folder_of_photos, write_config

pytestmark = pytest.mark.broker


class NotifySocket:
    """A datagram socket like systemd's: records every message (a list of KEY=value lines)."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = f"@{abstract}" if abstract else str(path)
        self.sock.bind("\0" + abstract if abstract else str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def lines(self, since: float = 0.0) -> list[str]:
        return [line for at, msg in list(self.messages) if at >= since for line in msg]

    def wait_for(self, line: str, timeout: float = 30.0, since: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(x == line or x.startswith(line) for x in self.lines(since)):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()


def test_notifier_speaks_to_an_abstract_socket_and_rate_limits_the_watchdog(tmp_path) -> None:
    name = f"faceberry-test-{time.monotonic_ns()}"
    server = NotifySocket(abstract=name)
    now = [100.0]
    try:
        notifier = Notifier(env={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "2000000"}, clock=lambda: now[0])
        assert notifier.ready("starting") and notifier.watchdog()
        assert not notifier.watchdog()  # within half the interval: no second ping
        now[0] += 1.0
        assert notifier.watchdog()
        assert notifier.reloading()
        assert server.wait_for("STATUS=starting", 5) and server.wait_for("MONOTONIC_USEC=", 5)
        assert server.lines().count("WATCHDOG=1") == 2
        # WATCHDOG_PID naming another process: that one pings, not us.
        assert Notifier(env={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "2000000",
                             "WATCHDOG_PID": "1"}).watchdog_s is None
    finally:
        server.close()


def test_ready_watchdog_while_frames_flow_and_none_once_the_loop_stalls(tmp_path, mosquitto, monkeypatch,
                                                                       gallery_bundle, heldout_photos) -> None:
    from faceberry.device.app import build
    from faceberry.device.config import load_config

    server = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", server.address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping at most every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=1, broken=False)
    cfg = load_config(write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                                   {"device": str(camera), "loop": True, "fps": 20}))
    service = build(cfg).loop
    real_process = service.pipeline.process
    stall, stalled, release = threading.Event(), threading.Event(), threading.Event()

    def process(image, *args):  # a pipeline that hangs when told to, like a wedged interpreter
        if stall.is_set():
            stalled.set()
            release.wait(60)
        return real_process(image, *args)

    service.pipeline.process = process
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        assert server.wait_for("READY=1", 60), server.lines()
        # READY came with the models loaded and after a frame was processed.
        assert service.frames >= 1
        status = next(line for line in server.lines() if line.startswith("STATUS="))
        assert f"bundle {service.bundle_id}" in status and "fps" in status
        assert "camera ok" in status and "mqtt " in status
        flowing = time.monotonic()
        assert server.wait_for("WATCHDOG=1", 10, since=flowing)
        time.sleep(1.0)
        assert server.lines(flowing).count("WATCHDOG=1") >= 2  # keeps pinging while frames flow

        stall.set()
        assert stalled.wait(10)
        time.sleep(0.5)  # a ping already on its way when the stall began
        quiet = time.monotonic()
        time.sleep(1.5)  # several watchdog intervals
        assert "WATCHDOG=1" not in server.lines(quiet), "the watchdog kept pinging a stalled loop"
        assert runner.is_alive()
    finally:
        stall.clear()
        release.set()
        service.request_stop()
        runner.join(30)
        server.close()
    assert not runner.is_alive()
    assert "STOPPING=1" in server.lines()


def test_ready_with_the_camera_out_at_start_so_systemd_does_not_time_the_start_out(
        tmp_path, mosquitto, monkeypatch, gallery_bundle) -> None:
    """A live camera absent at start is waited for inside the daemon (camera.max_outage_s); READY=1 must not
    wait for it, or systemd would kill the daemon at TimeoutStartSec and start it again, in a loop."""
    from faceberry.device.app import build
    from faceberry.device.config import load_config
    from tests.plugins.processes import free_port

    server = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", server.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    stream = f"http://127.0.0.1:{free_port()}/stream.mjpg"  # nothing listens there
    cfg = load_config(write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                                   {"source": "opencv", "device": stream, "max_outage_s": 600}))
    service = build(cfg).loop
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        assert server.wait_for("READY=1", 60), server.lines()
        assert service.frames == 0 and runner.is_alive()
        status = next(line for line in server.lines() if line.startswith("STATUS="))
        assert "camera out" in status, status
    finally:
        service.request_stop()
        runner.join(30)
        server.close()
    assert not runner.is_alive()
