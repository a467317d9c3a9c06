"""The suite's one broker launcher: a real mosquitto on a free loopback port (a pytest plugin).

`mosquitto` (session scope) is shared by tests that only publish and subscribe; `mosquitto_factory`
(function scope) hands out brokers a test may stop and restart on the same port, for the
"broker goes away and comes back" tests (with persistence, so a subscriber's session survives).
`Subscriber` is a paho client that records what it receives, for assertions. Password and TLS brokers are
`mosquitto_factory(anonymous=False, extra_config=...)` with `password_file()` and the `tls_files` fixture.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.plugins.processes import free_port, run, stop_server, wait_accepting


def _mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(candidate).is_file():
            return candidate
    return None


class Mosquitto:
    """One mosquitto process; `stop()` and `start()` keep the same port."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None, persistent: bool = False,
                 anonymous: bool = True, extra_config: str = "") -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.config = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        # Persistence keeps sessions and retained messages across a restart (saved when mosquitto stops).
        persistence = f"persistence true\npersistence_location {workdir}/\n" if persistent else "persistence false\n"
        # Started as root (CI containers), mosquitto would switch to the `mosquitto` user, which cannot
        # write the persistence file in our temp dir; as anyone else this line is ignored.
        user = f"user {getpass.getuser()}\n"
        self.config.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous {'true' if anonymous else 'false'}\n"
            f"{persistence}{user}{extra_config}\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n",
            encoding="utf-8",
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        self._log = log
        if wait_accepting(self.proc, self.host, self.port, timeout, 0.05):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-500:]}")
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        stop_server(self.proc, self.host, self.port, wait=5, kill_wait=5, free_within=5, poll=0.05)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _need_binary() -> str:
    binary = _mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt install mosquitto): the broker tests need a real broker")
    return binary


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker shared by the session: `.host`, `.port`."""
    broker = Mosquitto(_need_binary(), tmp_path_factory.mktemp("mosquitto")).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start private brokers (stoppable, restartable on the same port); all are stopped afterwards.

    `mosquitto_factory(persistent=True)` keeps sessions and retained messages across `stop()`/`start()`;
    `anonymous=False` and `extra_config` (mosquitto.conf lines: password_file, cafile …) make an
    authenticating or TLS broker.
    """
    binary = _need_binary()
    brokers: list[Mosquitto] = []

    def make(persistent: bool = False, anonymous: bool = True, extra_config: str = "") -> Mosquitto:
        workdir = tmp_path / f"broker{len(brokers)}"
        workdir.mkdir()
        broker = Mosquitto(binary, workdir, persistent=persistent, anonymous=anonymous,
                           extra_config=extra_config).start()
        brokers.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            broker.stop()


class Subscriber:
    """A paho client subscribed to `topic` that records (topic, payload, retain) in arrival order.

    With `session` (a client id), it keeps a persistent QoS 1 session, so messages published while it is
    disconnected, or while a persistent broker restarts, are still delivered to it.
    """

    def __init__(self, host: str, port: int, topic: str = "#", session: str | None = None) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=session or "",
                                  clean_session=session is None)
        self.client.reconnect_delay_set(1, 1)

        def on_connect(client, userdata, flags, reason, properties) -> None:
            client.subscribe(topic, qos=1)

        def on_subscribe(client, userdata, mid, reasons, properties) -> None:
            self._subscribed.set()

        def on_message(client, userdata, msg) -> None:
            with self._cond:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscriber could not subscribe")

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 20.0) -> bool:
        """Wait until predicate(messages so far) is true; returns whether it became true."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self.messages)), timeout)

    def on(self, topic: str) -> list[bytes]:
        with self._cond:
            return [payload for t, payload, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- TLS and passwords ---------------------------------------------------------------------------------------

class TlsFiles:
    """A test CA, a server certificate signed by it (see make_tls), and an unrelated CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca.crt"
        self.server_cert = root / "server.crt"
        self.server_key = root / "server.key"
        self.other_ca = root / "other-ca.crt"

    def listener_config(self) -> str:
        return f"cafile {self.ca}\ncertfile {self.server_cert}\nkeyfile {self.server_key}\n"


def _openssl(*args: str, cwd: Path) -> None:
    run(["openssl", *args], cwd=cwd, check=True, what=f"openssl {' '.join(args[:2])}", timeout=60)


def make_tls(root: Path, name: str = "DNS:localhost") -> TlsFiles:
    """A test CA, a server certificate for `name` only (a subjectAltName: DNS:host or IP:address) and an
    unrelated CA, made with the openssl command under `root` (skips when it is absent)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: the TLS tests make their own test CA with it")
    files = TlsFiles(root)
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=faceberry test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=root)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name.split(':', 1)[1]}", "-keyout", "server.key",
             "-out", "server.csr", cwd=root)
    (root / "san.ext").write_text(f"subjectAltName={name}\n", encoding="utf-8")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=root)
    return files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """make_tls's certificates for `localhost`, once per session."""
    return make_tls(tmp_path_factory.mktemp("tls"))


def password_file(directory: Path, user: str | dict[str, str], password: str = "", name: str = "passwd") -> Path:
    """A mosquitto password file (hashed by mosquitto_passwd) holding `user` or every {user: password}."""
    path = directory / name
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(binary).is_file():
        pytest.skip("mosquitto_passwd is not installed (it comes with mosquitto)")
    users = user if isinstance(user, dict) else {user: password}
    for i, (login, secret) in enumerate(users.items()):
        run([binary, *(["-c"] if i == 0 else []), "-b", str(path), login, secret], check=True, timeout=30)
    path.chmod(0o644)  # mosquitto may run as another user; these are test credentials
    return path


def client_connections(broker: Mosquitto, client_prefix: str) -> list[str]:
    """mosquitto's `New client connected ... as <client id>` lines for our daemon's client."""
    return [line for line in broker.log.read_text(errors="replace").splitlines()
            if "New client connected" in line and f" as {client_prefix}" in line]
