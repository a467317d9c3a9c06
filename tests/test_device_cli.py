"""`python -m device`: help for every flag, `check`, and bad input → one clear `error:` line, non-zero exit."""

from __future__ import annotations

import argparse
import configparser
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faceberry.device import cli
from faceberry.device.config import CREDENTIAL_NAME
from tests.plugins.broker import make_tls, password_file
from tests.plugins.files import write_frame
from tests.plugins.processes import module

ROOT = Path(__file__).resolve().parent.parent


def device_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return module("device", *args, timeout=timeout, env={"FACEBERRY_LOG_LEVEL": "INFO"})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a failed command must print (and no traceback)."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def make_config(tmp_path: Path, bundle: Path | str, camera: dict | None = None, port: int = 1, **extra) -> Path:
    data = {"bundle": str(bundle), "device_id": "clitest",
            "camera": camera or {"source": "folder", "device": str(tmp_path)},
            "mqtt": {"host": "127.0.0.1", "port": port}, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- help ------------------------------------------------------------------------------------------------

def test_top_level_help_lists_every_command() -> None:
    proc = device_cli("--help")
    assert proc.returncode == 0
    for command in ("run", "check", "eval", "enroll", "--log-level"):
        assert command in proc.stdout


COMMANDS = [path for path, command in cli.TREE.items() if command.module]


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_flag_is_explained(path: tuple[str, ...]) -> None:
    parser = cli.build_parser(path)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{path}: {action.option_strings} has no help"
    # The tree's help line (what `faceberry --help` lists without importing anything) is the module's own.
    module = importlib.import_module(cli.TREE[path].module)
    assert getattr(module, "HELP", cli.TREE[path].help) == cli.TREE[path].help
    if path[0] in ("train", "convert", "models"):
        return  # their --help runs in test_aliases_enter_the_same_tree and test_readme
    proc = device_cli(*path, "--help")
    assert proc.returncode == 0 and "usage: python -m device " + " ".join(path) in proc.stdout


def test_no_command_prints_usage_and_fails() -> None:
    proc = device_cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


# --- bad input: one clear line, non-zero exit ------------------------------------------------------------

def test_missing_config_file(tmp_path: Path) -> None:
    line = one_error_line(device_cli("run", "--config", str(tmp_path / "nope.yaml")))
    assert "config file not found" in line and "nope.yaml" in line


def test_unknown_config_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("bundle: /b\ncamera:\n  sorce: folder\n")
    line = one_error_line(device_cli("run", "--config", str(path)))
    assert "unknown key 'camera.sorce'" in line and str(path) in line


def test_password_in_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("bundle: /b\nmqtt: {password: hunter2}\n")
    line = one_error_line(device_cli("run", "--config", str(path)))
    assert "mqtt.password" in line and "password_file" in line and "hunter2" not in line


def test_missing_bundle(tmp_path: Path) -> None:
    line = one_error_line(device_cli("run", "--config", str(make_config(tmp_path, tmp_path / "no-bundle"))))
    assert "bundle directory not found" in line and "python -m convert" in line


def test_missing_store_current_points_to_deploy(tmp_path: Path) -> None:
    """A store's `current` link with no version yet (docs/PI.md) is filled by deploy, not by convert."""
    line = one_error_line(device_cli("run", "--config", str(make_config(tmp_path, tmp_path / "bundles" / "current"))))
    assert "no version deployed yet" in line and f"--store {tmp_path / 'bundles'}" in line
    assert "python -m convert" not in line


def test_corrupt_bundle_manifest(tmp_path: Path, loadable_bundle: Path) -> None:
    bundle = shutil.copytree(loadable_bundle, tmp_path / "bundle")
    (bundle / "manifest.json").write_text('{"schema": 1, "files": {')
    # Beside its checksum file the damage is caught before parsing; an older bundle without one gets the
    # JSON error.
    line = one_error_line(device_cli("run", "--config", str(make_config(tmp_path, bundle))))
    assert "manifest.json was edited or damaged" in line
    (bundle / "manifest.sha256").unlink()
    line = one_error_line(device_cli("run", "--config", str(make_config(tmp_path, bundle))))
    assert "manifest.json is not valid JSON" in line


def test_checksum_mismatch(tmp_path: Path, loadable_bundle: Path) -> None:
    bundle = shutil.copytree(loadable_bundle, tmp_path / "bundle")
    with open(bundle / "classifier.tflite", "r+b") as handle:  # one flipped byte, as a bad copy would do
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    line = one_error_line(device_cli("run", "--config", str(make_config(tmp_path, bundle))))
    assert "classifier.tflite does not match its sha256" in line and "copy the bundle again" in line


def test_bundle_file_missing(tmp_path: Path, loadable_bundle: Path) -> None:
    bundle = shutil.copytree(loadable_bundle, tmp_path / "bundle")
    (bundle / "labels.txt").unlink()
    line = one_error_line(device_cli("run", "--config", str(make_config(tmp_path, bundle))))
    assert "labels.txt is missing from the bundle" in line


@pytest.mark.parametrize(
    ("camera", "message"),
    [({"source": "opencv", "device": "/dev/video97"}, "camera /dev/video97 does not exist"),
     ({"source": "opencv", "device": 97}, "cannot open camera 97"),
     ({"source": "folder", "device": "/nonexistent/pics"}, "image folder not found"),
     ({"source": "picamera2"}, "picamera2")],
)
def test_unreachable_camera(tmp_path: Path, loadable_bundle: Path, camera: dict, message: str) -> None:
    if camera["source"] == "picamera2" and shutil.which("rpicam-hello"):
        pytest.skip("this machine has a Pi camera stack")
    # A live camera absent at start is waited for (an outage) up to camera.max_outage_s, then the same
    # one line; a missing folder or camera library fails at once.
    proc = device_cli("run", "--config", str(make_config(tmp_path, loadable_bundle, {**camera, "max_outage_s": 1})))
    assert message in one_error_line(proc)
    # A camera that is not there is "unavailable" (3: systemd may retry); a camera library that is not
    # installed is permanent (2: RestartPreventExitStatus=2, no restart loop).
    assert proc.returncode == (2 if camera["source"] == "picamera2" else 3), proc.stderr


def test_bad_input_exits_2(tmp_path: Path) -> None:
    """A bundle that is not there is bad input: exit 2, which the unit's RestartPreventExitStatus=2 keeps
    from a restart loop."""
    (tmp_path / "p").mkdir()
    proc = device_cli("eval", "--bundle", str(tmp_path / "nope"), "--photos", str(tmp_path / "p"))
    assert proc.returncode == 2 and "bundle directory not found" in one_error_line(proc)


def test_folder_with_unreadable_images_only_runs_and_ends(tmp_path: Path, loadable_bundle: Path, mosquitto) -> None:
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.jpg").write_bytes(b"broken")
    config = make_config(tmp_path, loadable_bundle, {"source": "folder", "device": str(pics)}, port=mosquitto.port)
    proc = device_cli("run", "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping unreadable image" in proc.stderr and "a.jpg" in proc.stderr


# --- check -----------------------------------------------------------------------------------------------


def test_check_all_ok(tmp_path: Path, loadable_bundle: Path, mosquitto) -> None:
    write_frame(tmp_path / "pics")
    config = make_config(tmp_path, loadable_bundle, {"source": "folder", "device": str(tmp_path / "pics")},
                         port=mosquitto.port)
    proc = device_cli("check", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert set(lines) == {"config", "bundle", "camera", "broker"}
    assert all(v.startswith("OK") for v in lines.values()), proc.stdout
    assert "16 people" in lines["bundle"] and "64×48" in lines["camera"]


def test_check_reports_every_failure(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "missing-bundle", {"source": "opencv", "device": "/dev/video97"},
                         port=_closed_port())
    proc = device_cli("check", "--config", str(config), "--timeout", "2")
    assert proc.returncode == 1
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert lines["config"].startswith("OK")
    assert lines["bundle"].startswith("FAIL") and "bundle directory not found" in lines["bundle"]
    assert lines["camera"].startswith("FAIL") and "/dev/video97 does not exist" in lines["camera"]
    assert lines["broker"].startswith("FAIL") and "refused" in lines["broker"].lower()


def test_check_stops_at_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("bundle: /b\nnope: 1\n")
    proc = device_cli("check", "--config", str(path))
    assert proc.returncode == 1
    assert proc.stdout.startswith("config  FAIL") and "unknown key 'nope'" in proc.stdout
    assert "fix the config first" in proc.stdout


def _closed_port() -> int:
    from tests.plugins.processes import free_port

    return free_port()  # bound and released: nothing listens there


def test_log_level_is_accepted_after_the_command(tmp_path: Path) -> None:
    proc = device_cli("check", "--log-level", "debug", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 1 and "config file not found" in proc.stdout


# --- one command line (issue 22) ----------------------------------------------------------------------------

SHIPPED = ("device", "train", "convert", "models")


def _shipped_sources() -> dict[str, str]:
    return {str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
            for package in SHIPPED for path in sorted((ROOT / package).rglob("*.py"))}


def test_one_parser_one_error_printer_one_logging_set_up() -> None:
    """The tree in device/cli.py is the only place that builds a parser, adds --log-level, configures logging
    or prints `error:`; no command dispatches on its first argument."""
    for name, text in _shipped_sources().items():
        if name == "device/cli.py":
            continue
        assert "ArgumentParser(" not in text, f"{name} builds its own parser"
        assert not re.search(r'add_argument\(\s*"--log-level"', text), f"{name} adds its own --log-level"
        assert "basicConfig" not in text, f"{name} configures logging"
        # faceberry/startup.py's guard is the one other: the line for a dependency missing before anything imports.
        if name != "faceberry/startup.py":
            assert not re.search(r"""print\(f?["']error: """, text), f"{name} prints its own error line"
        assert not re.search(r"argv\[0\] ==", text), f"{name} dispatches on argv[0]"
    tree = (ROOT / "device" / "cli.py").read_text(encoding="utf-8")
    assert tree.count("basicConfig(") == 1 and len(re.findall(r'add_argument\(\s*"--log-level"', tree)) == 1


def test_the_tree_holds_every_documented_command() -> None:
    paths = {" ".join(path) for path in cli.TREE}
    for command in ("run", "check", "status", "eval", "enroll", "deploy", "rollback", "train", "train backbone",
                    "train cohort", "convert", "models fetch"):
        assert command in paths


def test_aliases_enter_the_same_tree() -> None:
    """`python -m train backbone` is `faceberry train backbone` under another name: the same options."""
    alias = subprocess.run([sys.executable, "-m", "train", "backbone", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    tree = device_cli("train", "backbone", "--help")
    assert alias.returncode == 0 and tree.returncode == 0, alias.stderr + tree.stderr

    def flags(text: str) -> list[str]:
        return sorted(set(re.findall(r"--[a-z][a-z0-9-]*", text)))

    assert alias.stdout.startswith("usage: python -m train backbone ")
    assert tree.stdout.startswith("usage: python -m device train backbone ")
    assert flags(alias.stdout) == flags(tree.stdout) and "--arch" in flags(alias.stdout)


@pytest.fixture()
def fake_command(tmp_path: Path, monkeypatch):
    """A command of the tree (`faceberry fake`) whose run() raises what FACEBERRY_FAKE_RAISES names."""
    (tmp_path / "fake_cmd.py").write_text(
        "import os\n"
        "from faceberry.errors import UnavailableError\n"
        "HELP = 'a command for the tests'\n"
        "def add_arguments(parser):\n"
        "    parser.add_argument('--what', required=True, help='what run() raises')\n"
        "def run(args):\n"
        "    if args.what == 'unavailable':\n"
        "        raise UnavailableError('the thing is not there;\\n  try later')\n"
        "    if args.what == 'permission':\n"
        "        raise PermissionError(13, 'Permission denied', os.path.join(os.getcwd(), 'nope'))\n"
        "    if args.what == 'interrupt':\n"
        "        raise KeyboardInterrupt\n"
        "    if args.what == 'module':\n"
        "        import faceberry_no_such_module  # noqa: F401\n"
        "    if args.what == 'bug':\n"
        "        return 1 // 0\n"
        "    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.TREE, ("fake",), cli.Command("fake_cmd", "a command for the tests"))
    monkeypatch.setitem(cli.TREE, ("gone",), cli.Command("faceberry_gone_cmd", "a command not installed"))


@pytest.mark.parametrize(("what", "code", "words"), [
    ("unavailable", 3, "error: the thing is not there; try later"),
    ("permission", 2, "permission denied"),
    ("interrupt", 130, None),
    ("module", 2, "needs the Python module 'faceberry_no_such_module'"),
    ("bug", 1, "ZeroDivisionError: integer division or modulo by zero (rerun with --log-level DEBUG"),
    ("fine", 0, None),
])
def test_one_error_handler_keyed_on_the_errors_exit_code(fake_command, capsys, what, code, words) -> None:
    assert cli.main(["fake", "--what", what]) == code
    err = capsys.readouterr().err
    if words is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_a_bugs_traceback_is_shown_at_debug(fake_command, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FACEBERRY_LOG_LEVEL", raising=False)
    assert cli.main(["fake", "--what", "bug", "--log-level", "DEBUG"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "fake_cmd.py" in err and err.splitlines()[-1].startswith("error: ZeroDivisionError")


def test_a_command_missing_from_the_installation_is_one_line(fake_command, capsys) -> None:
    assert cli.main(["gone"], prog="faceberry") == 2
    err = capsys.readouterr().err
    assert err == ("error: faceberry gone is not available in this installation (faceberry_gone_cmd is missing); "
                   "update faceberry\n")


def test_a_bad_log_level_in_the_environment_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "device", "status", "--state-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FACEBERRY_LOG_LEVEL": "loud"})
    assert proc.returncode == 2 and "FACEBERRY_LOG_LEVEL='loud' is not a log level" in one_error_line(proc)


def test_log_level_before_or_after_the_command_and_the_daemons_format(tmp_path: Path) -> None:
    for argv in (["--log-level", "DEBUG", "eval"], ["eval", "--log-level", "debug"]):
        proc = device_cli(*argv, "--bundle", str(tmp_path / "nope"), "--photos", str(tmp_path))
        assert proc.returncode == 2
        # DEBUG now reaches stderr, in the Pi's format (time, level, logger), before the one error line.
        assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ DEBUG faceberry.device.cli: python -m device eval: Namespace\(",
                         proc.stderr, re.M), proc.stderr[-2000:]
    journal = subprocess.run([sys.executable, "-m", "device", "--log-level", "DEBUG", "eval", "--bundle",
                              str(tmp_path / "nope"), "--photos", str(tmp_path)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "JOURNAL_STREAM": "8:1"})
    # Under systemd the journal stamps the time itself.
    assert re.search(r"^DEBUG faceberry.device.cli: ", journal.stderr, re.M), journal.stderr[-2000:]


def test_workstation_commands_on_a_pi_say_what_is_missing_in_one_line() -> None:
    """The Pi's environment (.venv-device: no TensorFlow) runs the Pi's commands and refuses train in one line."""
    python = ROOT / ".venv-device" / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-device is absent (./quickstart.sh setup creates it)")
    for argv in (["train", "--help"], ["train", "backbone", "--out", "x"], ["convert", "--help"]):
        proc = subprocess.run([str(python), "-m", "device", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("error: python -m device train needs the Python module 'tensorflow'" if
                                      argv[0] == "train" else "error: python -m device convert needs the Python "
                                      "module 'tensorflow'")
        assert "requirements-train.txt" in proc.stderr
    run = subprocess.run([str(python), "-m", "device", "run", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "--config" in run.stdout, run.stderr


# --- systemd ---------------------------------------------------------------------------------------------

def test_unit_and_installer_agree() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive
    unit.read(ROOT / "systemd" / "faceberry.service")
    service = unit["Service"]
    assert service["User"] == "faceberry" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["CapabilityBoundingSet"] == ""
    # The installed console script, from no particular directory.
    assert service["ExecStart"] == "/opt/faceberry/venv/bin/faceberry run --config /etc/faceberry/config.yaml"
    assert "WorkingDirectory" not in service
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # The outbox and the status file are written to the state directory: it must not be read-only.
    assert service["StateDirectory"] == "faceberry" and "/var/lib/faceberry" not in service.get("ReadOnlyPaths", "")
    assert service["LoadCredential"] == f"{CREDENTIAL_NAME}:/etc/faceberry/mqtt_password"
    assert unit["Unit"]["StartLimitIntervalSec"] == "0" and service["RestartPreventExitStatus"] == "2"
    installer = (ROOT / "systemd" / "install.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "systemd" / "install.sh")]).returncode == 0
    # The installer's dry run walks every step without touching the system.
    example = str(ROOT / "systemd" / "faceberry.example.yaml")
    proc = subprocess.run(["bash", str(ROOT / "systemd" / "install.sh"), "--dry-run", "--no-apt", "--systemd", "yes",
                           "--bundle", str(ROOT / "tests"), "--config", example],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "is not a bundle" in proc.stderr  # tests/ has no manifest.json
    proc = subprocess.run(["bash", str(ROOT / "systemd" / "install.sh"), "--dry-run", "--no-apt", "--systemd", "yes"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "venv --system-site-packages /opt/faceberry/venv" in out or "/opt/faceberry/venv/bin/python -m pip" in out
    assert "/etc/faceberry/mqtt_password" in out and "systemctl enable --quiet faceberry.service" in out
    assert "requirements-device.txt" in out and "faceberry.example.yaml /etc/faceberry/config.yaml" in out
    assert "mqtt_password" in installer


def test_installer_check_runs_in_the_units_sandbox(tmp_path: Path) -> None:
    """The check gets every [Service] property of the unit except how it starts, stops and restarts."""
    config = tmp_path / "config.yaml"
    config.write_text("bundle: /var/lib/faceberry/bundles/current\n")
    proc = subprocess.run(["bash", str(ROOT / "systemd" / "install.sh"), "--dry-run", "--no-apt", "--systemd", "yes",
                           "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    check = next(line for line in proc.stdout.splitlines() if line.startswith("+ systemd-run"))
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "systemd" / "faceberry.service")
    lifecycle = {"Type", "NotifyAccess", "WatchdogSec", "ExecStart", "ExecReload", "Restart", "RestartSec",
                 "RestartPreventExitStatus", "TimeoutStartSec", "TimeoutStopSec", "KillSignal"}
    for key in set(unit["Service"]) - lifecycle:
        assert f"-p {key}=" in check, f"the check's sandbox lacks the unit's {key}="
    for key in lifecycle:
        assert f"-p {key}=" not in check
    assert check.endswith("/opt/faceberry/venv/bin/faceberry check --config /etc/faceberry/config.yaml")
    # Stop before installing, start after the check.
    lines = proc.stdout.splitlines()
    assert lines.index(check) > lines.index("== 5. package into /opt/faceberry/venv")
    assert "+ systemctl start faceberry.service" in lines[lines.index(check):]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart's program to exist: the same unit, pointed at a stand-in executable.
    program = tmp_path / "faceberry"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    unit = tmp_path / "faceberry.service"
    text = (ROOT / "systemd" / "faceberry.service").read_text()
    unit.write_text(text.replace("/opt/faceberry/venv/bin/faceberry", str(program)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "faceberry.service" not in proc.stderr, proc.stderr
    # A broken unit is caught by the same call (the test can fail).
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "notifyy" in proc.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                              text=True, timeout=60)
    score = re.search(r"Overall exposure level for faceberry.service: ([\d.]+)", security.stdout)
    assert score and float(score.group(1)) <= 2.5, security.stdout[-500:]


def test_installer_refuses_a_non_bundle(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "systemd" / "install.sh"), "--dry-run", "--bundle", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "is not a bundle" in proc.stderr


# --- broker authentication and TLS, checked against a real mosquitto ------------------------------------

def test_check_broker_with_password_and_tls(tmp_path: Path, mosquitto_factory) -> None:
    tls = make_tls(tmp_path, "IP:127.0.0.1")
    passwords = password_file(tmp_path, "pi", "correct horse", name="mosquitto.passwd")
    broker = mosquitto_factory(anonymous=False, extra_config=f"password_file {passwords}\n{tls.listener_config()}")
    certs = {"ca.crt": tls.ca}

    def check(password: str, tls: dict) -> dict[str, str]:
        (tmp_path / "pw").write_text(password + "\n")
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({
            "bundle": str(tmp_path / "none"), "device_id": "tls",
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "username": "pi", "password_file": "pw", "tls": tls},
        }))
        proc = device_cli("check", "--config", str(config), "--skip", "bundle", "--skip", "camera", "--timeout", "3")
        return dict(line.split(None, 1) for line in proc.stdout.splitlines())

    good = check("correct horse", {"enabled": True, "ca": str(certs["ca.crt"])})
    assert good["broker"].startswith("OK"), good
    assert "with password" in good["config"] and "tls" in good["config"] and "correct horse" not in str(good)
    wrong = check("wrong", {"enabled": True, "ca": str(certs["ca.crt"])})
    assert wrong["broker"].startswith("FAIL") and "refused" in wrong["broker"]
    untrusted = check("correct horse", {"enabled": True})  # the system CAs do not know our test CA
    assert untrusted["broker"].startswith("FAIL") and "certificate verify failed" in untrusted["broker"].lower()
    insecure = check("correct horse", {"enabled": True, "insecure": True})
    assert insecure["broker"].startswith("OK"), insecure
    plain = check("correct horse", {"enabled": False})  # plain MQTT to a TLS port
    assert plain["broker"].startswith("FAIL")


def test_a_pi_config_checked_on_the_laptop(tmp_path: Path) -> None:
    """README §6: the Pi's config (the example: a store's bundle link, picamera2, a broker on the Pi's network),
    checked on the laptop before copying it, with what only the Pi has left out."""
    config = tmp_path / "my-config.yaml"
    shutil.copy(ROOT / "systemd" / "faceberry.example.yaml", config)
    proc = subprocess.run([sys.executable, "-m", "device", "check", "--config", str(config), "--skip", "bundle",
                           "--skip", "camera", "--skip", "broker"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line and not line[0].isspace()}
    assert lines == {"config": "OK", "bundle": "SKIP", "camera": "SKIP", "broker": "SKIP"}, proc.stdout
