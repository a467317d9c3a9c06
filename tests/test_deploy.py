"""`faceberry deploy`, `rollback` and `status` on a store laid out like the Pi's, by the real CLI.

Without a daemon: versions switch, rollback restores the old one (twice: back again), a corrupt bundle is
refused with current unchanged. With a real daemon (`python -m device run` over a looping folder camera and
a real mosquitto, `bundle: <store>/current`): deploy and rollback change the status file's bundle_id in the
same process over the same broker connection, and a bundle whose model cannot load is refused before
`current` switches.
`--host` goes through a real sshd and rsync on localhost where one can be started.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faceberry.bundle import MANIFEST, load_bundle, write_manifest
from faceberry.device.ops.store import BundleStore
from tests.plugins.broker import Subscriber, client_connections
from tests.plugins.daemon import folder_of_photos, start_daemon, write_config
from tests.plugins.files import assert_owned_like_root, corrupt, pi_root, variant
from tests.plugins.processes import finish, free_port, module, run

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "deploycam"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return module("device", *args, check=check, what=f"device {' '.join(args)}", unset=["FACEBERRY_CONFIG"],
                  timeout=180)


def test_deploy_switches_versions_rollback_restores_and_a_corrupt_bundle_is_refused(tmp_path, gallery_bundle) -> None:
    root = pi_root(tmp_path)
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(f"bundle: {root / 'current'}\ndevice_id: {DEVICE}\nstate_dir: {state}\n")
    v1 = variant(gallery_bundle, tmp_path / "src" / "v1", "deploy-v1")
    v2 = variant(gallery_bundle, tmp_path / "src" / "v2", "deploy-v2")
    bad = corrupt(variant(gallery_bundle, tmp_path / "src" / "bad", "deploy-bad"))

    first = cli("deploy", "--bundle", str(v1), "--config", str(config))  # the store: the config's current link
    assert "deployed deploy-v1" in first.stdout and "no faceberry daemon is running" in first.stdout
    assert os.readlink(root / "current") == "deploy-v1"
    cli("deploy", "--bundle", str(v2), "--store", str(root), "--config", str(config))
    assert os.readlink(root / "current") == "deploy-v2"
    assert_owned_like_root(root / "deploy-v2", root)

    back = cli("rollback", "--config", str(config))
    assert "current is deploy-v1" in back.stdout
    assert load_bundle(root / "current").bundle_id == "deploy-v1"
    cli("rollback", "--config", str(config))  # a second rollback undoes the first
    assert load_bundle(root / "current").bundle_id == "deploy-v2"
    cli("rollback", "--config", str(config))

    refused = cli("deploy", "--bundle", str(bad), "--config", str(config), check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: refused:") and "sha256" in refused.stderr
    assert os.readlink(root / "current") == "deploy-v1"
    assert sorted(BundleStore(root).versions()) == ["deploy-v1", "deploy-v2"]
    assert not list(root.glob(".incoming-*"))

    status = cli("status", "--config", str(config), "--json", check=False)
    assert status.returncode == 3  # nothing running
    view = json.loads(status.stdout)
    assert view["daemons"] == []
    assert view["store"]["current"] == "deploy-v1" and view["store"]["previous"] == "deploy-v2"
    text = cli("status", "--config", str(config), check=False).stdout
    assert "* deploy-v1 (current)" in text and "  deploy-v2 (previous)" in text


@pytest.fixture
def sshd(tmp_path: Path):
    """A private sshd on a loopback port accepting a fresh key for this user; skipped where it cannot run."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).is_file() or not shutil.which("ssh-keygen") or not shutil.which("rsync"):
        pytest.skip("sshd, ssh-keygen or rsync is not installed (apt install openssh-server rsync)")
    if os.geteuid() != 0:
        pytest.skip("a private sshd is started only when the tests run as root (privilege separation)")
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host", "client"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True, timeout=60)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n")
    ssh = (f"ssh -p {port} -i {d / 'client'} -o BatchMode=yes -o StrictHostKeyChecking=no "
           "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
        try:
            for _ in range(50):
                if proc.poll() is not None:
                    pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
                if run([*ssh.split(), f"{getpass.getuser()}@localhost", "true"], timeout=20).returncode == 0:
                    break
                time.sleep(0.2)
            else:
                pytest.skip(f"could not log in to the private sshd: {(d / 'sshd.log').read_text()[-500:]}")
            yield ssh
        finally:
            proc.terminate()
            proc.wait(10)


def test_deploy_over_ssh_and_rsync_to_localhost(tmp_path, gallery_bundle, sshd: str) -> None:
    root = pi_root(tmp_path)
    v1 = variant(gallery_bundle, tmp_path / "src" / "v1", "ssh-v1")
    v2 = variant(gallery_bundle, tmp_path / "src" / "v2", "ssh-v2")
    host = f"{getpass.getuser()}@localhost"
    # The host's faceberry: this checkout's, as /opt/faceberry/venv/bin/faceberry would be on a Pi.
    remote = f"env PYTHONPATH={ROOT} {sys.executable} -m device"
    for bundle in (v1, v2):
        proc = cli("deploy", "--bundle", str(bundle), "--host", host, "--store", str(root), "--ssh", sshd,
                   "--remote-command", remote, "--remote-sudo", "")
        assert f"deployed {load_bundle(bundle).bundle_id}" in proc.stdout, proc.stdout
    assert os.readlink(root / "current") == "ssh-v2" and os.readlink(root / "previous") == "ssh-v1"
    assert_owned_like_root(root / "ssh-v2", root)
    assert not list(root.glob(".incoming-*"))  # the rsynced copy was moved into place
    bad = corrupt(variant(gallery_bundle, tmp_path / "src" / "bad", "ssh-bad"))
    refused = cli("deploy", "--bundle", str(bad), "--host", host, "--store", str(root), "--ssh", sshd,
                  "--remote-command", remote, "--remote-sudo", "", check=False)
    assert refused.returncode == 2 and "sha256" in refused.stderr  # refused here, before copying
    assert os.readlink(root / "current") == "ssh-v2"


def _wait_status(path: Path, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = json.loads(path.read_text())
            if predicate(last):
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    pytest.fail(f"status file {path} never matched; last: {last}")


@pytest.mark.broker
def test_deploy_and_rollback_reload_the_running_daemon_in_place(
        tmp_path, mosquitto_factory, gallery_bundle, heldout_photos) -> None:
    broker = mosquitto_factory()
    root = pi_root(tmp_path)
    v1 = variant(gallery_bundle, tmp_path / "src" / "v1", "live-v1")
    v2 = variant(gallery_bundle, tmp_path / "src" / "v2", "live-v2")
    # Checksums right, model garbage: load_bundle accepts it, LiteRT cannot load it.
    garbage = variant(gallery_bundle, tmp_path / "src" / "garbage", "live-garbage")
    manifest = json.loads((garbage / MANIFEST).read_text())
    (garbage / manifest["classifier"]["file"]).write_bytes(b"not a tflite model" * 64)
    files = list(manifest.pop("files"))
    write_manifest(garbage, manifest, files)
    load_bundle(garbage)

    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", root / "current", broker,
                          {"device": str(camera), "loop": True, "fps": 10})
    config.write_text(config.read_text().replace("device_id: testcam", f"device_id: {DEVICE}"))
    status_path = tmp_path / "state" / f"status-{DEVICE}.json"
    cli("deploy", "--bundle", str(v1), "--config", str(config))

    sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/events")
    proc = start_daemon(config)
    logged: list[str] = []
    reader = threading.Thread(target=lambda: logged.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        _wait_status(status_path, lambda s: s.get("pid") == proc.pid and s.get("frames", 0) > 0)
        out = cli("deploy", "--bundle", str(v2), "--config", str(config), "--timeout", "60")
        assert f"reload: the daemon (pid {proc.pid}, SIGHUP) now serves live-v2" in out.stdout, out.stdout
        status = json.loads(status_path.read_text())
        assert (status["bundle_id"], status["pid"], status["running"]) == ("live-v2", proc.pid, True)
        mark = len(sub.messages)
        assert sub.wait_for(lambda m: len(m) > mark + 1, 60), "".join(logged)[-3000:]
        assert json.loads(sub.messages[-1][1])["model"] == "live-v2"

        out = cli("rollback", "--config", str(config), "--timeout", "60")
        assert "now serves live-v1" in out.stdout and f"pid {proc.pid}" in out.stdout, out.stdout
        assert json.loads(status_path.read_text())["bundle_id"] == "live-v1"

        # Checksums right, model garbage: refused before `current` switches; the daemon is not asked.
        out = cli("deploy", "--bundle", str(garbage), "--config", str(config), "--timeout", "60", check=False)
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.startswith("error: refused:") and "reload:" not in out.stdout
        assert os.readlink(root / "current") == "live-v1" and "live-garbage" not in BundleStore(root).versions()
        status = json.loads(status_path.read_text())
        assert (status["bundle_id"], status["pid"]) == ("live-v1", proc.pid)
        assert status["bundle"] == {"id": "live-v1", "reloads": 2, "refused": 0}

        shown = cli("status", "--config", str(config), "--json")
        view = json.loads(shown.stdout)
        (daemon,) = view["daemons"]
        assert daemon["running"] and daemon["pid"] == proc.pid and daemon["bundle_id"] == "live-v1"
        assert view["store"]["current"] == "live-v1"
        assert f"running, pid {proc.pid}" in cli("status", "--config", str(config)).stdout
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
    rc, _ = finish(proc, timeout=30)
    reader.join(5)
    sub.close()
    assert rc == 0, "".join(logged)[-3000:]
    assert len(client_connections(broker, f"faceberry-{DEVICE}")) == 1  # one MQTT session throughout
    after = cli("status", "--config", str(config), check=False)
    assert after.returncode == 3 and "stopped" in after.stdout
    # Killed without its last word (kill -9, a power cut): the file still says running, its pid is gone.
    gone = subprocess.Popen(["true"])
    gone.wait()
    status = json.loads(status_path.read_text())
    status_path.write_text(json.dumps({**status, "running": True, "pid": gone.pid}))
    stale = cli("status", "--config", str(config), check=False)
    assert stale.returncode == 3 and f"not running (pid {gone.pid} is gone" in stale.stdout
