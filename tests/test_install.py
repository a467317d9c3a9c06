"""systemd/install.sh into a temporary root without systemd (`--root`): the files it promises, with their modes
and owners, a second run that changes nothing, a failed check that puts the previous install back, and a
--dry-run/--help that print the plan and touch nothing.

Kept fast and offline: the root's venv is made beforehand with --system-site-packages from the interpreter of
.venv-device plus a .pth line to .venv-device's site-packages, so pip finds every dependency already there,
and the faceberry package comes as a wheel built from a copy of this checkout (`--wheelhouse`, i.e.
`pip --no-index`). What is left out is the download itself; bench/pi_emulation.sh runs the whole thing,
apt and PyPI included, in an arm64 Bookworm root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.plugins.bundles import make_loadable_bundle as make_bundle
from tests.plugins.processes import run

INSTALL = ROOT / "systemd" / "install.sh"
DEVICE_VENV = ROOT / ".venv-device"


def _need_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh sets owners (chown): run as root")
    for tool in ("useradd", "usermod"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not (DEVICE_VENV / "bin" / "python").exists():
        pytest.skip(".venv-device is absent (./quickstart.sh setup makes it)")
    if subprocess.run([sys.executable, "-c", "import setuptools, wheel"]).returncode != 0:
        pytest.skip("this interpreter cannot build a wheel offline (setuptools and wheel)")


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root: type and mode, owner, content hash or link target."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", st.st_uid, st.st_gid, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid)
        else:
            out[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                        hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    # The user's own environment, untouched: install.sh builds a venv that must not see this checkout.
    return run(["bash", str(INSTALL), "--root", str(root), "--no-apt", *args], timeout=300, cwd=Path("/"),
               raw_env=os.environ)


def mode_owner(path: Path) -> tuple[str, int, int]:
    st = path.lstat()
    return oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid


def make_root(root: Path, with_venv: bool = True) -> Path:
    """An empty system root with the accounts files every Debian root has (and a venv whose packages are met)."""
    (root / "etc").mkdir(parents=True)
    # useradd --prefix adds to them.
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\n")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "gshadow").write_text("root:*::\nvideo:*::\n")
    if not with_venv:
        return root
    venv = root / "opt" / "faceberry" / "venv"
    base_python = Path(os.path.realpath(DEVICE_VENV / "bin" / "python"))
    subprocess.run([str(base_python), "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    device_site = next((DEVICE_VENV / "lib").glob("python3*/site-packages")).resolve()
    (next((venv / "lib").glob("python3*/site-packages")) / "device_env.pth").write_text(f"{device_site}\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, detector_path: Path) -> dict:
    _need_tools()
    base = tmp_path_factory.mktemp("install")
    root = make_root(base / "root")

    # The package as a wheel, built from a copy of the tracked files (the build writes into its source tree).
    src = base / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheels = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(src)], check=True, timeout=300, capture_output=True)

    bundle = make_bundle(base / "bundle", detector_path, "person")
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump({"bundle": "/var/lib/faceberry/bundles/current", "device_id": "install-test",
                                      "camera": {"source": "folder", "device": "/var/tmp/photos"}}))
    args = ("--wheelhouse", str(wheels), "--config", str(config), "--bundle", str(bundle))
    proc = install(root, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "args": args, "first": proc, "tree": tree(root), "base": base, "bundle": bundle,
            "detector": detector_path}


def test_the_promised_files_modes_and_owners(setup: dict) -> None:
    root = setup["root"]
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    user = passwd["faceberry"]
    uid, gid = int(user[2]), int(user[3])
    assert uid != 0 and user[5] == "/var/lib/faceberry" and user[6] == "/usr/sbin/nologin"
    video = next(g for g in (root / "etc" / "group").read_text().splitlines() if g.startswith("video:"))
    assert "faceberry" in video.split(":")[3].split(",")

    assert mode_owner(root / "etc/faceberry") == ("0o750", 0, gid)
    assert mode_owner(root / "etc/faceberry/config.yaml") == ("0o640", 0, gid)
    assert mode_owner(root / "etc/faceberry/mqtt_password") == ("0o600", 0, 0)
    assert (root / "etc/faceberry/mqtt_password").read_bytes() == b""
    assert mode_owner(root / "var/lib/faceberry") == ("0o750", uid, gid)
    assert mode_owner(root / "var/lib/faceberry/bundles") == ("0o750", uid, gid)
    unit = root / "etc/systemd/system/faceberry.service"
    assert mode_owner(unit) == ("0o644", 0, 0)
    assert unit.read_text() == (ROOT / "systemd" / "faceberry.service").read_text()
    # The unit's Documentation= names a file the installer put there.
    docs = [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith("Documentation=")]
    assert docs and all(d.startswith("file:") for d in docs)
    for doc in docs:
        assert (root / doc.removeprefix("file:").lstrip("/")).read_text() == (ROOT / "docs" / "PI.md").read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/faceberry.service"
    assert os.readlink(wants) == "/etc/systemd/system/faceberry.service"
    # The console script works from any directory, without the checkout.
    faceberry = root / "opt/faceberry/venv/bin/faceberry"
    proc = subprocess.run([str(faceberry), "check", "--help"], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr
    assert os.readlink(root / "usr/local/bin/faceberry") == "/opt/faceberry/venv/bin/faceberry"
    # Nothing of the run's snapshot is left behind.
    assert not list(root.rglob("*.prev"))
    out = setup["first"].stdout
    assert "NOT started" in out and "checking the config only" in out
    current = root / "var/lib/faceberry/bundles/current"
    assert not os.path.isabs(os.readlink(current)) and (current / "manifest.json").is_file()
    version = current.resolve()
    assert version.parent == (root / "var/lib/faceberry/bundles").resolve()
    for path in [version, *version.rglob("*")]:
        assert path.lstat().st_uid == uid, f"{path} is not owned by faceberry"
        assert path.stat().st_mode & stat.S_IRGRP, f"{path} is not readable by the group"


def test_a_second_run_changes_nothing(setup: dict) -> None:
    proc = install(setup["root"], *setup["args"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = tree(setup["root"])
    changed = sorted(k for k in set(after) | set(setup["tree"]) if after.get(k) != setup["tree"].get(k))
    assert not changed, changed[:20]


def test_dry_run_and_help_print_the_plan_and_change_nothing(setup: dict) -> None:
    proc = install(setup["root"], "--dry-run", *setup["args"])
    assert proc.returncode == 0, proc.stderr
    for step in ("1. packages", "2. user", "3. stop", "4. snapshot", "5. package", "6. config", "7. systemd unit",
                 "8. check", "9. start"):
        assert f"== {step}" in proc.stdout
    assert "+ " in proc.stdout and "--wheelhouse" not in proc.stdout  # commands, not the options echoed
    assert tree(setup["root"]) == setup["tree"]
    usage = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "The plan" in usage.stdout
    assert "set -euo pipefail" not in usage.stdout and "stop" in usage.stdout and "put back" in usage.stdout


def test_a_failed_check_puts_the_previous_install_back(setup: dict) -> None:
    bad = setup["base"] / "bad.yaml"
    bad.write_text("bundle: /var/lib/faceberry/bundles/current\ncamera: {sorce: folder}\n")
    args = list(setup["args"])
    args[args.index("--config") + 1] = str(bad)
    # With a new bundle too: deploy adds a version and moves current (and previous) before the check fails.
    args[args.index("--bundle") + 1] = str(make_bundle(setup["base"] / "bundle-2", setup["detector"], "other"))
    proc = install(setup["root"], *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "deployed" in proc.stdout + proc.stderr
    assert "unknown key 'camera.sorce'" in proc.stdout and "putting back what was installed before" in proc.stderr
    after = tree(setup["root"])
    changed = sorted(k for k in set(after) | set(setup["tree"]) if after.get(k) != setup["tree"].get(k))
    assert not changed, changed[:20]


def test_a_refused_bundle_puts_the_previous_install_back(setup: dict) -> None:
    bad = shutil.copytree(setup["bundle"], setup["base"] / "bad-bundle")
    (bad / "labels.txt").write_text("someone else\n")  # no longer matches its sha256 in the manifest
    args = list(setup["args"])
    args[args.index("--bundle") + 1] = str(bad)
    proc = install(setup["root"], *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the bundle was refused" in proc.stderr and "putting back" in proc.stderr
    after = tree(setup["root"])
    changed = sorted(k for k in set(after) | set(setup["tree"]) if after.get(k) != setup["tree"].get(k))
    assert not changed, changed[:20]


def test_a_failed_pip_install_puts_the_previous_install_back(setup: dict) -> None:
    empty = setup["base"] / "no-wheels"
    empty.mkdir()
    args = list(setup["args"])
    args[args.index("--wheelhouse") + 1] = str(empty)  # an offline Pi without the wheel: pip finds nothing
    proc = install(setup["root"], *args)
    assert proc.returncode != 0 and "putting back" in proc.stderr, proc.stdout + proc.stderr
    after = tree(setup["root"])
    changed = sorted(k for k in set(after) | set(setup["tree"]) if after.get(k) != setup["tree"].get(k))
    assert not changed, changed[:20]


def test_the_emulation_script_parses_and_explains_itself() -> None:
    script = ROOT / "bench" / "pi_emulation.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--photos N" in proc.stdout and "cpuinfo" in proc.stdout


def test_a_failed_first_install_leaves_nothing_that_would_start_at_boot(setup: dict) -> None:
    """Nothing of faceberry's was there: a failed check must not leave the unit enabled (it would exit 2 at
    the next boot with no bundle), nor a venv, config, state directory, guide or command link of its own."""
    root = make_root(setup["base"] / "first", with_venv=False)
    # The installer makes the venv itself (python3 -m venv): python3 is the device interpreter, and the
    # dependencies are met from .venv-device's site-packages on PYTHONPATH, so pip stays offline.
    bindir = setup["base"] / "first-bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(os.path.realpath(DEVICE_VENV / "bin" / "python"))
    device_site = next((DEVICE_VENV / "lib").glob("python3*/site-packages")).resolve()
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(device_site)}
    accounts = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")  # useradd's: the user stays
    before = {k: v for k, v in tree(root).items() if not k.startswith(accounts)}
    bad = setup["base"] / "first-bad.yaml"
    bad.write_text("bundle: /var/lib/faceberry/bundles/current\ncamera: {sorce: folder}\n")
    args = list(setup["args"])
    args[args.index("--config") + 1] = str(bad)
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-apt", *args], capture_output=True,
                          text=True, timeout=300, cwd="/", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unknown key 'camera.sorce'" in proc.stdout and "putting back what was installed before" in proc.stderr
    # It got as far as a venv, a deployed bundle and an enabled unit (steps 5-7) before the check failed.
    assert "== 7. systemd unit" in proc.stdout and "deployed" in proc.stdout + proc.stderr
    assert not (root / "etc/systemd/system/multi-user.target.wants/faceberry.service").is_symlink()
    assert not (root / "etc/systemd/system/faceberry.service").exists()
    assert not (root / "usr/local/bin/faceberry").is_symlink()
    after = {k: v for k, v in tree(root).items() if not k.startswith(accounts)}
    changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
    assert not changed, changed[:20]


def test_the_unit_does_not_restart_what_restarting_cannot_fix() -> None:
    """Issue 21: `source: picamera2` without picamera2 exited 3, and the unit reloaded the models every 10 s
    for ever. A missing camera library, a bundle absent or with nobody enrolled, a bad config, a file the
    service may not read: permanent, the exit code RestartPreventExitStatus= names. A camera that is out: not."""
    import configparser

    from faceberry.bundle import BundleError
    from faceberry.device.capture.camera import CameraError, CameraSetupError
    from faceberry.device.config import ConfigError
    from faceberry.errors import EXIT_UNAVAILABLE, EXIT_USAGE

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "systemd" / "faceberry.service")
    prevented = {int(code) for code in unit["Service"]["RestartPreventExitStatus"].split()}
    assert unit["Service"]["Restart"] == "on-failure"
    for permanent in (CameraSetupError("x"), BundleError("x"), ConfigError("x")):
        assert permanent.exit_code in prevented, type(permanent).__name__
    assert EXIT_USAGE in prevented and EXIT_UNAVAILABLE not in prevented
    assert CameraError("x").exit_code == EXIT_UNAVAILABLE
