"""systemd's readiness and watchdog protocol (sd_notify), for `Type=notify` and `WatchdogSec=`.

The protocol is one datagram of `KEY=value` lines sent to the AF_UNIX socket named by $NOTIFY_SOCKET
(a path, or '@name' for the abstract namespace). It is small enough to write here (about 30 lines)
rather than depend on python-systemd (a C extension apt builds for one Python, not in a venv's wheels)
or sdnotify (unmaintained): nothing extra to install on the Pi, and the same code runs everywhere.

What the daemon sends (device/loop.py):
    READY=1            once the models are loaded and the camera delivered its first frame
    WATCHDOG=1         from the frame loop itself, at most every half of $WATCHDOG_USEC: a loop stuck
                       in a pipeline call stops pinging and systemd restarts the service
    STATUS=...         fps, bundle id, camera and MQTT state (`systemctl status` shows it)
    RELOADING=1        while a SIGHUP reload runs (then READY=1 again), with MONOTONIC_USEC as systemd asks
    STOPPING=1         on the way out
Without $NOTIFY_SOCKET (a shell, a test, a unit of another Type=) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; a no-op when $NOTIFY_SOCKET is unset."""

    def __init__(self, env: Mapping[str, str] | None = None, clock=time.monotonic) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # '@' means the abstract namespace, which the kernel spells with a leading NUL.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.clock = clock
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd expects pings from; another one (a child) must not ping.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._last_ping = float("-inf")
        self._sock: socket.socket | None = None
        self._warned = False
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send one datagram of `lines`; False if disabled or it could not be sent (never raises)."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            # systemd not listening (any more) is no reason to stop recognising faces: say it once.
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s; Type=notify and the watchdog will not see us",
                            self.address.replace("\0", "@"), exc)
                self._warned = True
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Ping the watchdog if it is on and half its interval has passed since the last ping."""
        if self.watchdog_s is None or not self.address:
            return False
        now = self.clock()
        if now - self._last_ping < self.watchdog_s / 2:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
