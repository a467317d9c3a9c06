"""`faceberry status` and the status file it reads: fresh from a daemon's first seconds, honest about a stopped one.

A real daemon (a real mosquitto, a looping folder camera, a bundle that loads through the real code path)
with a stats interval longer than the test: any status file showing frames was written by the frame loop's
own schedule, not by the stats line. After it stops, `status` must not report an MQTT connection.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from faceberry.device.ops.status_file import StatusFile
from tests.plugins.bundles import make_loadable_bundle
from tests.plugins.daemon import start_daemon
from tests.plugins.files import write_frame
from tests.plugins.processes import module

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "statuscam"
pytestmark = pytest.mark.broker


def status(*args: str) -> subprocess.CompletedProcess:
    return module("device", "status", *args, timeout=120)


def test_the_status_file_is_fresh_from_the_start_and_a_stopped_daemon_is_not_connected(
        tmp_path: Path, detector_path: Path, mosquitto) -> None:
    bundle = make_loadable_bundle(tmp_path / "bundle", detector_path)
    write_frame(tmp_path / "pics")
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bundle": str(bundle), "device_id": DEVICE, "state_dir": str(state),
        "camera": {"source": "folder", "device": str(tmp_path / "pics"), "loop": True, "fps": 5},
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        "stats_interval": 3600,  # no stats line (and no status write of its own) during this test
    }))
    path = state / f"status-{DEVICE}.json"
    proc = start_daemon(config, stdout=subprocess.DEVNULL)
    try:
        seen: list[dict] = []
        deadline = time.monotonic() + 90  # a bound on a hung daemon, not a timing being tested
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = None
            if data and (not seen or data["updated_at"] != seen[-1]["updated_at"]):
                seen.append(data)
            if len(seen) >= 3 and seen[-1]["frames"] > seen[1]["frames"] > 0:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        # Rewritten while it runs (three versions, the frames growing), long before the first stats line.
        assert len(seen) >= 3 and seen[-1]["frames"] > seen[1]["frames"] > 0, seen
        assert seen[-1]["running"] is True and seen[-1]["fps"] > 0 and seen[-1]["mqtt_state"] == "connected"
        running = status("--state-dir", str(state))
        assert running.returncode == 0, running.stdout + running.stderr
        assert f"daemon {DEVICE}: running, pid {proc.pid}" in running.stdout
        assert "  mqtt     connected" in running.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0

    stopped = status("--state-dir", str(state))
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    lines = stopped.stdout.splitlines()
    assert lines[0].startswith(f"daemon {DEVICE}: stopped, updated ") and lines[0].endswith(" s ago"), lines
    # The file's last MQTT state was "connected" (its stop came after the broker's last ack, or not): either
    # way it is shown as the past, never as a connection now.
    assert not any(line.startswith("  mqtt ") for line in lines), lines
    last = next(line for line in lines if line.startswith("  last "))
    assert "not now" in last and "frames" in last
    view = json.loads(status("--state-dir", str(state), "--json").stdout)["daemons"][0]
    assert view["running"] is False and view["fps"] == 0.0 and not view["mqtt_state"].startswith("connected")


def test_a_killed_daemons_status_is_stale_with_its_age(tmp_path: Path) -> None:
    """A daemon killed with -9 never wrote `running: false`: the file says running, connected, 12 fps."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    written = time.time() - 120
    # Written as the daemon writes it: every field of the status file's contract.
    (tmp_path / f"status-{DEVICE}.json").write_text(StatusFile(
        device_id=DEVICE, pid=gone.pid, running=True, mqtt_state="connected", fps=12.0, frames=5000, events=7,
        bundle_id="b1", bundle_path="/b", updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written)),
        status="camera ok, mqtt connected", captured=5000, dropped=0, skipped_images=0, faces=5000, suppressed=0,
        tracks=1, camera={"state": "ok", "outages": 0, "outage_s": 0.0}, cameras={},
        bundle={"id": "b1", "reloads": 0, "refused": 0}, ms_per_frame={}, ms_per_face={},
        mqtt={"state": "connected"}).dump())
    out = status("--state-dir", str(tmp_path))
    assert out.returncode == 3
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"daemon {DEVICE}: not running (pid {gone.pid} is gone") and "s ago" in lines[0]
    age = float(lines[0].rsplit("updated ", 1)[1].split()[0])
    assert 100 < age < 1000
    assert not any(line.startswith("  mqtt ") or line.startswith("  fps ") for line in lines), lines
    assert any("mqtt connected (as written" in line and "not now" in line for line in lines), lines


def test_status_without_the_rights_says_run_it_with_sudo(tmp_path: Path) -> None:
    """The installed config belongs to root:faceberry 0640 in a 0750 directory: a user meets EACCES."""
    if os.geteuid() != 0 or subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs root and setpriv to take away root's right to read any file")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.yaml").write_text("bundle: /nowhere\n")
    os.chown(etc, 65534, 65534)
    etc.chmod(0o700)
    # Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH is refused like any other user.
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", "--"]
    for command in (["status"], ["run"], ["check"], ["enroll", "--name", "x", "--photos", str(tmp_path)]):
        proc = subprocess.run([*drop, sys.executable, "-m", "device", *command], cwd=ROOT, capture_output=True,
                              text=True, timeout=120,
                              env={**os.environ, "FACEBERRY_CONFIG": str(etc / "config.yaml")})
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in out and "PermissionError" not in out, (command, out)
        assert f"permission denied reading {etc / 'config.yaml'}: run it with sudo" in out, (command, out)


def test_a_file_that_is_not_a_status_file_is_not_read_as_one(tmp_path: Path) -> None:
    """The status file is a typed contract: a file under its name that breaks it (another program's, or one
    cut short) is no daemon, and `status` names the file and what is wrong with it rather than showing half a
    dict or saying there is no file."""
    path = tmp_path / f"status-{DEVICE}.json"
    path.write_text(json.dumps({"device_id": DEVICE, "pid": os.getpid(), "running": True, "fps": "fast"}))
    out = status("--state-dir", str(tmp_path))
    assert out.returncode == 3
    first = out.stdout.splitlines()[0]
    assert first.startswith(f"status file {path} is not one this faceberry writes ("), out.stdout
    assert "no status file" not in out.stdout, out.stdout
    assert not any(line.startswith("daemon ") for line in out.stdout.splitlines()), out.stdout
    path.write_bytes(b'{"device_id": "' + b"\xff" * 3)  # cut short, and not even text
    out = status("--state-dir", str(tmp_path), "--json")
    assert out.returncode == 3
    report = json.loads(out.stdout)
    assert report["daemons"] == [] and list(report["unreadable_status_files"]) == [str(path)], report


def test_what_the_daemon_writes_reads_back_nulls_included(tmp_path: Path) -> None:
    """The writer and the reader hold one contract: a file written with empty fields (an accepted reload has no
    error, a daemon before its first bundle no bundle id) reads back equal."""
    from faceberry.device.ops.status_file import read_status

    written = StatusFile(
        device_id=DEVICE, pid=os.getpid(), running=True, mqtt_state="connected", fps=0.0, frames=0, events=0,
        bundle_id=None, bundle_path=None, updated_at="2026-01-31T08:00:00.000Z", status="starting", captured=0,
        dropped=0, skipped_images=0, faces=0, suppressed=0, tracks=0, camera={"state": "ok", "outages": 0,
        "outage_s": 0.0}, cameras={}, bundle={"id": None, "reloads": 1, "refused": 0}, ms_per_frame={},
        ms_per_face={}, mqtt={"state": "connected"},
        last_reload={"ok": True, "bundle_id": "b2", "path": "/b2", "error": None, "at": "2026-01-31T08:00:00Z"})
    path = tmp_path / f"status-{DEVICE}.json"
    path.write_text(written.dump())
    assert read_status(path) == written
