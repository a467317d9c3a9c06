"""Ask the running daemon to load the bundle `current` points to, and confirm it from its status file.

Used by `faceberry deploy`, `rollback` and `enroll` after they switch `current`. The daemon is found by
its status file (`<state_dir>/status-<device_id>.json`, device/loop.py): a pid that is alive, still a
faceberry process, and serving a version of this store. It is asked the way it runs:

- `systemctl reload faceberry` when systemd's faceberry unit is that process (the unit's ExecReload
  sends SIGHUP, and systemd knows a reload happened);
- otherwise SIGHUP to the pid (a daemon started from a shell);
- nobody running: nothing to ask; the next start loads `current`.

A reload is reported only once the status file shows it: the daemon counts every reload and refusal
there, so the answer is "serving X", "refused X because …", or "no answer within the timeout", never
a guess.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faceberry.device.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR, ConfigError, load_config
from faceberry.device.messaging.outbox import default_state_dir
from faceberry.device.ops.status_file import StatusFile, read_status
from faceberry.device.ops.store import default_root

log = logging.getLogger(__name__)

UNIT = "faceberry"
DEFAULT_TIMEOUT = 30.0


@dataclass
class Setup:
    """What the local config says about where things are (defaults when there is no readable config)."""

    bundle: str | None
    state_dirs: list[Path]
    device_id: str | None
    config: str | None = None
    note: str | None = None  # why the config was not used


def read_setup(config: str | None) -> Setup:
    """The config's bundle, state_dir and device_id; `config` None means $FACEBERRY_CONFIG or the default file.

    A config named explicitly must load; the default one may be absent (a laptop) or unreadable to this
    user (it holds the broker password), and then the defaults are used.
    """
    explicit = config or os.environ.get("FACEBERRY_CONFIG")
    path = explicit or DEFAULT_CONFIG
    state_dirs = [DEFAULT_STATE_DIR]
    try:
        cfg = load_config(path, log_warnings=False)
    except ConfigError as exc:
        if explicit:
            raise
        fallback = default_state_dir()
        return Setup(None, [*state_dirs, fallback], None, None, note=str(exc))
    # A daemon started by hand without a writable state_dir keeps its files in the fallback
    # (faceberry.device.app.state_dir).
    dirs = [Path(cfg.state_dir)]
    if Path(cfg.state_dir) == DEFAULT_STATE_DIR:
        dirs.append(default_state_dir())
    return Setup(cfg.bundle, dirs, cfg.device_id, str(path))


def store_root(args_store: str | None, setup: Setup) -> Path:
    return Path(args_store) if args_store else default_root(setup.bundle)


# --- finding the daemon -----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_faceberry(pid: int) -> bool:
    """The pid runs `faceberry run` / `python -m device run`: a stale status file's pid may be reused.

    Where /proc is missing the answer is yes (nothing better to go on).
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False
    words = [os.path.basename(a.decode(errors="replace")) for a in argv if a]
    return "run" in words and ("device" in words or "faceberry" in words)


@dataclass
class Daemon:
    pid: int
    status_path: Path
    status: StatusFile | None  # None: found through systemd, its status file not readable here

    @property
    def answered(self) -> int:
        """Reloads done plus refused: grows by one with every reload the daemon serves."""
        return 0 if self.status is None else self.status.bundle.reloads + self.status.bundle.refused


def serves(bundle_path: str | None, target: Path) -> bool:
    """A daemon serving `bundle_path` is one to reload for `target`: a version of the store at `target`,
    or (a plain bundle directory updated in place) that directory itself."""
    if not bundle_path:
        return False
    real, top = os.path.realpath(bundle_path), os.path.realpath(target)
    return real == top or os.path.dirname(real) == top


def status_files(state_dirs: list[Path], device_id: str | None = None) -> list[Path]:
    found: list[Path] = []
    for directory in dict.fromkeys(state_dirs):
        pattern = f"status-{device_id}.json" if device_id else "status-*.json"
        try:
            found.extend(sorted(directory.glob(pattern)))
        except OSError:
            continue
    return found


def running_daemons(state_dirs: list[Path], root: Path, device_id: str | None = None) -> list[Daemon]:
    """Live daemons serving a version of the store at `root` (or the bundle directory `root`)."""
    daemons = []
    for path in status_files(state_dirs, device_id):
        status = read_status(path)
        if status is None or not status.running:
            continue
        pid = status.pid
        if not pid_alive(pid) or not is_faceberry(pid):
            continue
        if not serves(status.bundle_path, root):
            log.info("the daemon (pid %d) serves %s, not a version of %s: not asked to reload", pid,
                     status.bundle_path, root)
            continue
        daemons.append(Daemon(pid, path, status))
    return daemons


def systemd_main_pid(unit: str = UNIT) -> int | None:
    """The pid of the unit's main process when systemd runs it, else None."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return None
    try:
        out = subprocess.run(["systemctl", "show", "--property=MainPID", "--value", unit], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(out) if out.isdigit() and int(out) > 0 else None


# --- asking it ---------------------------------------------------------------------------------------------


@dataclass
class ReloadReport:
    state: str  # reloaded | refused | not-running | unconfirmed | failed
    message: str
    pid: int | None = None
    bundle_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state in ("reloaded", "not-running")


def _wait(daemon: Daemon, timeout: float) -> StatusFile | None:
    """The status file once it shows one more reload answered; None if not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status(daemon.status_path)
        if status is not None:
            now = Daemon(daemon.pid, daemon.status_path, status)
            if status.pid != daemon.pid or now.answered > daemon.answered or not status.running:
                return status
        time.sleep(0.2)
    return None


def _ask(daemon: Daemon, unit_pid: int | None, unit: str) -> str | None:
    """Send the request; returns an error text, or None when sent."""
    failed = ""
    if unit_pid == daemon.pid:
        proc = subprocess.run(["systemctl", "reload", unit], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return None
        # The service user itself may not ask systemd, but may signal its own daemon: what ExecReload does.
        failed = f"`systemctl reload {unit}` failed ({(proc.stderr or proc.stdout).strip()}) and "
    try:
        os.kill(daemon.pid, signal.SIGHUP)
    except PermissionError:
        return f"{failed}not allowed to signal the daemon (pid {daemon.pid}); run this command with sudo"
    except ProcessLookupError:
        return f"the daemon (pid {daemon.pid}) exited meanwhile; its next start loads current"
    return None


def reload_daemons(state_dirs: list[Path], root: Path, expected: str, device_id: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT, unit: str = UNIT) -> list[ReloadReport]:
    """Ask every daemon serving this store to load `current` (which names `expected`); one report each."""
    daemons = running_daemons(state_dirs, root, device_id)
    unit_pid = systemd_main_pid(unit)
    if not daemons and unit_pid is not None:
        # The unit runs but its status file is not readable here (or not written yet): reload, unconfirmed.
        err = _ask(Daemon(unit_pid, Path(), None), unit_pid, unit)
        if err:
            return [ReloadReport("failed", err, unit_pid)]
        return [ReloadReport("unconfirmed", f"asked systemd to reload {unit} (pid {unit_pid}); its status file "
                             f"was not readable here to confirm: see `journalctl -u {unit}`", unit_pid)]
    if not daemons:
        return [ReloadReport("not-running", f"no faceberry daemon is running for {root}: its next start loads "
                             f"{expected}")]
    reports = []
    for daemon in daemons:
        how = f"systemctl reload {unit}" if unit_pid == daemon.pid else "SIGHUP"
        err = _ask(daemon, unit_pid, unit)
        if err:
            reports.append(ReloadReport("failed", err, daemon.pid))
            continue
        status = _wait(daemon, timeout)
        if status is None:
            reports.append(ReloadReport(
                "unconfirmed", f"asked the daemon (pid {daemon.pid}, {how}) to reload, but its status file "
                f"{daemon.status_path} showed no reload within {timeout:.0f} s; it may be busy or stuck: check its "
                f"log (`journalctl -u {unit}`)", daemon.pid))
            continue
        if status.pid != daemon.pid or not status.running:
            reports.append(ReloadReport("not-running", f"the daemon (pid {daemon.pid}) stopped meanwhile; its next "
                                        f"start loads {expected}", daemon.pid))
            continue
        last, serving, details = status.last_reload, status.bundle_id, status.model_dump(mode="json")
        if last is not None and last.ok and serving == expected:
            reports.append(ReloadReport("reloaded", f"the daemon (pid {daemon.pid}, {how}) now serves {serving}",
                                        daemon.pid, serving, details))
        elif last is not None and last.ok:
            reports.append(ReloadReport("unconfirmed", f"the daemon (pid {daemon.pid}) reloaded, but serves "
                                        f"{serving}, not {expected} (current changed again meanwhile?)",
                                        daemon.pid, serving, details))
        else:
            reports.append(ReloadReport("refused", f"the daemon (pid {daemon.pid}) refused {expected} "
                                        f"({last.error if last else None}) and still serves {serving}", daemon.pid,
                                        serving, details))
    return reports


# --- the CLI side, shared by deploy, rollback and enroll -------------------------------------------------


def add_store_arguments(parser: argparse.ArgumentParser, reload: bool = True) -> None:
    parser.add_argument("--store", default=None,
                        help="the versions store (default: the parent of the config's `bundle:` when that is "
                        f"<store>/current, else {default_root(None)})")
    parser.add_argument("--config", default=None,
                        help=f"config file naming the bundle and state_dir (default: $FACEBERRY_CONFIG or "
                        f"{DEFAULT_CONFIG}, when readable)")
    if reload:
        parser.add_argument("--no-reload", action="store_true",
                            help="switch `current` only; the daemon loads it at its next reload or start")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                            help="seconds to wait for the daemon to confirm the reload "
                            f"(default {DEFAULT_TIMEOUT:.0f})")


def reload_and_report(args: argparse.Namespace, setup: Setup, root: Path, expected: str) -> list[ReloadReport]:
    """Ask the daemon(s) to reload unless --no-reload, and print one `reload:` line each."""
    if getattr(args, "no_reload", False):
        print(f"reload: not asked (--no-reload); the daemon loads {expected} at its next reload or start "
              f"(`sudo systemctl reload {UNIT}`)")
        return []
    reports = reload_daemons(setup.state_dirs, root, expected, setup.device_id, timeout=args.timeout)
    for report in reports:
        print(f"reload: {report.message}")
    return reports
