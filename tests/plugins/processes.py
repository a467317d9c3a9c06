"""The suite's one subprocess runner and its one free port, and the servers the suite starts (up, down).

`run` starts a command the way every test wants it: in the repository, with this checkout first on
PYTHONPATH (so a worktree tests its own code), TensorFlow's C++ logging quiet, no stdin, output captured as
text. `python(...)` is `run` for this interpreter; `check=True` fails the test with the command's last lines.
A server child (mosquitto, a RabbitMQ node) is up once it `accepts` on its port (`wait_accepting`), and down
once its port is free again (`stop_server`), so a restart on the same port succeeds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback TCP port nothing listens on (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(env: Mapping[str, str] | None = None, unset: Iterable[str] = ()) -> dict[str, str]:
    """os.environ with this checkout on PYTHONPATH and TensorFlow quiet, then `env`, less the keys in `unset`
    (a name ending in `*` drops every key with that prefix)."""
    out = {**os.environ, "PYTHONPATH": str(ROOT)}
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out.update(env or {})
    for name in unset:
        for key in [k for k in out if (k.startswith(name[:-1]) if name.endswith("*") else k == name)]:
            del out[key]
    return out


def run(cmd: list[str], *, what: str | None = None, check: bool = False, env: Mapping[str, str] | None = None,
        unset: Iterable[str] = (), timeout: float = 600, nice: bool = False, cwd: Path = ROOT,
        raw_env: Mapping[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, capture its output; with `check`, a non-zero exit fails the test naming `what`.

    `nice` lowers a long CPU-bound child (training) under the test process; `raw_env` replaces the
    environment entirely (for tests of what a user's own shell would do)."""
    prefix = ["nice", "-n", "5"] if nice and shutil.which("nice") else []
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    environ = dict(raw_env) if raw_env is not None else environment(env, unset)
    proc = subprocess.run([*prefix, *cmd], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        pytest.fail(f"{what or ' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}", pytrace=False)
    return proc


def python(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """`python ARGS` with this interpreter, through `run`."""
    return run([sys.executable, *args], **kwargs)


def module(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """`python -m NAME ARGS` (the project's own command lines), through `run`."""
    return run([sys.executable, "-m", name, *args], **kwargs)


def start(cmd: list[str], *, env: Mapping[str, str] | None = None, unset: Iterable[str] = (),
          cwd: Path = ROOT, **kwargs) -> subprocess.Popen:
    """A long-running child (a daemon), stdout and stderr piped as text, unbuffered."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(cmd, cwd=cwd, env=environment({"PYTHONUNBUFFERED": "1", **(env or {})}, unset),
                            text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Wait for a child started by `start`; (exit code, stderr). Kills it and fails the test after `timeout`."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"daemon did not exit within {timeout}s:\n{(err or '')[-3000:]}")
    return proc.returncode, err


def accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_accepting(proc: subprocess.Popen, host: str, port: int, timeout: float, poll: float) -> bool:
    """True once `proc` accepts connections on host:port; False if it exited first (`proc.poll()` says so) or
    did not within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if accepts(host, port):
            return True
        time.sleep(poll)
    return False


def stop_server(proc: subprocess.Popen | None, host: str, port: int, *, wait: float, kill_wait: float,
                free_within: float, poll: float, group: bool = False) -> None:
    """SIGTERM to `proc` (SIGKILL, to its process group if `group`, when it is still running after `wait` s),
    then up to `free_within` s for its port to be free again."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(kill_wait)
    deadline = time.monotonic() + free_within
    while accepts(host, port) and time.monotonic() < deadline:
        time.sleep(poll)
