"""A RabbitMQ cluster on loopback, started by the test that needs it (tests/test_cluster.py).

Each node is the distribution's own `rabbitmq-server` (Debian: `apt-get install rabbitmq-server`, 3.10.8 in
bookworm) run as the current user, with its own node name, AMQP, Erlang distribution and MQTT ports, data and
log directories under the test's tmp dir, one Erlang cookie for the cluster (in a HOME of its own) and a
private epmd port, so nothing of a system RabbitMQ (its /etc/rabbitmq, /var/lib/rabbitmq, port 4369 or
1883) is read or touched. The nodes find each other by RabbitMQ's own peer discovery (`classic_config`: the
node list in rabbitmq.conf), the way a site would deploy a fixed cluster; node 1 is started first and every
other node joins it.

Three nodes, not two: RabbitMQ 3.10's MQTT plugin tracks client ids in a Raft cluster spanning every node,
and a node restarted while the others lack a Raft majority waits for one before it serves MQTT again (with
two nodes, one down leaves none: the restarted node hangs in `mqtt_node:join_peers`, observed here).

A node has `.host` and `.port` (its MQTT listener), so it plugs in wherever a `Mosquitto` does
(`write_config`, `Subscriber`, the sightings `Logger`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.plugins.processes import free_port, stop_server, wait_accepting

# Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the `rabbitmq` user and its /var/lib home;
# the script behind it runs as whoever starts it.
_DEBIAN_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
INSTALL_HINT = "apt-get install rabbitmq-server (Debian/Ubuntu; it brings its MQTT plugin)"


def rabbitmq_server() -> str | None:
    """The rabbitmq-server script to run, or None when RabbitMQ is not installed."""
    if _DEBIAN_SCRIPT.is_file():
        return str(_DEBIAN_SCRIPT)
    return shutil.which("rabbitmq-server")


class RabbitNode:
    """One node; `stop()` and `start()` keep its name, ports and data (a restart rejoins the cluster)."""

    def __init__(self, script: str, workdir: Path, name: str, home: Path, epmd_port: int, peers: list[str]) -> None:
        self.script = script
        self.host = "127.0.0.1"
        self.port = free_port()  # MQTT
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.name = name
        self.nodename = f"{name}@localhost"
        self.workdir = workdir
        self.home = home
        self.epmd_port = epmd_port
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "rabbitmq.conf"
        nodes = "".join(f"cluster_formation.classic_config.nodes.{i} = {peer}\n" for i, peer in enumerate(peers, 1))
        self.config.write_text(
            f"listeners.tcp.default = {self.host}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "cluster_formation.peer_discovery_backend = classic_config\n"
            f"{nodes}"
            # A node that is slow to start under a loaded CI machine is waited for, not skipped.
            "cluster_formation.discovery_retry_limit = 60\n"
            "cluster_formation.discovery_retry_interval = 1000\n"
            "log.console = false\nlog.file.level = info\n",
            encoding="utf-8")
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n", encoding="utf-8")
        self.log = workdir / "log" / f"{self.nodename}.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        w = self.workdir
        # Not a RABBITMQ_* or ERL_* setting of the caller's: only ours.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **inherited,
            "HOME": str(self.home),  # its .erlang.cookie is the cluster's
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),  # absent: none
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),  # absent: not /etc/rabbitmq's
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
        }

    def start(self, timeout: float = 180) -> RabbitNode:
        out = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._out = out
        self.proc = subprocess.Popen([self.script], cwd=self.workdir, env=self.env(), stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait_accepting(self.proc, self.host, self.port, timeout, 0.2):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"RabbitMQ node {self.nodename} exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"RabbitMQ node {self.nodename} did not open its MQTT port {self.port} within "
                           f"{timeout:.0f}s:\n{tail}")

    def stop(self, timeout: float = 60) -> None:
        """A clean stop: the script turns SIGTERM into RabbitMQ's own shutdown."""
        stop_server(self.proc, self.host, self.port, wait=timeout, kill_wait=10, free_within=10, poll=0.1,
                    group=True)
        self.proc = None
        if getattr(self, "_out", None) is not None:
            self._out.close()
            self._out = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def version(self) -> str | None:
        """The RabbitMQ version the node logged at start ("3.10.8")."""
        found = re.findall(r"Starting RabbitMQ (\S+) on Erlang", self.log.read_text(errors="replace")) \
            if self.log.is_file() else []
        return found[-1] if found else None

    def log_tail(self, chars: int = 3000) -> str:
        parts = [p.read_text(errors="replace")[-chars:] for p in (self.workdir / "stdout.log", self.log) if p.is_file()]
        return "\n".join(parts)


class RabbitCluster:
    """`size` RabbitMQ nodes clustered on loopback under `workdir`; `stop()` stops them and their epmd."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        script = rabbitmq_server()
        if script is None:
            raise RuntimeError(f"rabbitmq-server is not installed: {INSTALL_HINT}")
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(f"FACEBERRYTEST{os.getpid()}{time.time_ns()}", encoding="ascii")
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        self.epmd_port = free_port()
        names = [f"faceberry{i}" for i in range(1, size + 1)]
        seed = f"{names[0]}@localhost"
        # Node 1 knows only itself, so it forms the cluster at once instead of waiting for peers not yet
        # started; every other node is told of node 1 and joins it.
        self.nodes = [RabbitNode(script, workdir / name, name, self.home, self.epmd_port, [seed])
                      for name in names]

    def start(self) -> RabbitCluster:
        # One after the other: node 1 forms the cluster, each later node finds it running and joins.
        try:
            for node in self.nodes:
                node.start()
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        # erl started a private epmd on our port; it would outlive the test.
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        if Path(epmd).is_file():
            subprocess.run([epmd, "-kill"], env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
                           capture_output=True, timeout=30, check=False)
