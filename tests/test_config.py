"""Config: YAML/TOML → typed pydantic models; unknown keys, wrong types, values paho would reject and
in-file passwords are refused, each problem on one line naming the file, the key and the fix."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from faceberry.device.config import Config, ConfigError, OutboxConfig, config_from_dict, load_config
from faceberry.errors import EXIT_USAGE, FaceberryError, exit_code_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "systemd" / "faceberry.example.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def model_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, type[BaseModel] | None]]:
    """Every field of `model` as (dotted path, FieldInfo, its section model or None), sections included."""
    for name, info in model.model_fields.items():
        inner = info.annotation
        nested = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
        yield prefix + name, info, nested
        if nested is not None:
            yield from model_fields(nested, prefix + name + ".")


def test_the_documented_example_loads_and_matches_the_defaults() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert isinstance(cfg, Config)
    assert cfg.device_id == "front-door"
    assert cfg.camera.source == "picamera2"
    assert cfg.mqtt.qos == 1 and cfg.events.snapshots is False and cfg.events.topic_prefix == "faceberry"
    assert cfg.mqtt_password is None
    assert cfg.state_dir == Path("/var/lib/faceberry") and cfg.mqtt.outbox == OutboxConfig()
    assert cfg.camera.reopen_max_s == 30.0


def test_every_field_is_documented_and_set_in_the_example() -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    paths = list(model_fields(Config))
    assert {"state_dir", "camera.reopen_max_s", "mqtt.outbox.max_messages", "mqtt.outbox.max_bytes",
            "mqtt.outbox.sync"} <= {p for p, _, _ in paths}
    # Where the example shows a Pi's typical choice rather than the default.
    chosen = {"bundle", "device_id", "camera.source", "camera.name"}
    for path, info, nested in paths:
        assert info.description and len(info.description) >= 8, f"{path} has no description"
        node: Any = example
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{path} is missing from {EXAMPLE.name}"
            node = node[part]
        if nested is None and path not in chosen:
            assert node == info.get_default() or Path(str(node)) == info.get_default(), (
                f"{EXAMPLE.name} shows {path}: {node!r}, the default is {info.get_default()!r}")


def test_minimal_yaml_gets_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "bundle: models/b\ndevice_id: d1\ncamera: {source: folder, device: pics}\n"),
                      env={})
    assert cfg.bundle == str(tmp_path / "models" / "b")
    assert cfg.camera.device == str(tmp_path / "pics")
    assert (cfg.tracking.votes_needed, cfg.mqtt.port, cfg.mqtt.host) == (5, 1883, "localhost")


def test_toml_works_too(tmp_path: Path) -> None:
    path = write(tmp_path, 'bundle = "/b"\ndevice_id = "t"\n[mqtt]\nport = 8883\n[mqtt.tls]\nenabled = true\n'
                 'insecure = true\n[tracking]\nvotes_needed = 3\n', "c.toml")
    cfg = load_config(path, env={})
    assert (cfg.mqtt.port, cfg.mqtt.tls.enabled, cfg.mqtt.tls.insecure, cfg.tracking.votes_needed) == (
        8883, True, True, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bundle: /b\ncamera:\n  fsp: 10\n", r"unknown key 'camera\.fsp'; known keys here: source, device"),
        ("bundle: /b\nmqtt:\n  tls:\n    verify: true\n", r"unknown key 'mqtt\.tls\.verify'"),
        ("bundle: /b\nmqtt:\n  outbox: {size: 3}\n", r"unknown key 'mqtt\.outbox\.size'.*max_messages"),
        ("bundle: /b\nbogus: 1\n", r"unknown key 'bogus'"),
        ("device_id: x\n", r"missing required key 'bundle'"),
        ("bundle: ''\n", r"bundle: must not be empty"),
        ("bundle: /b\nmqtt: {port: '1883'}\n", r"mqtt\.port: must be a whole number, got '1883'"),
        ("bundle: /b\nevents: {snapshots: 'yes'}\n", r"events\.snapshots: must be true or false, got 'yes'"),
        ("bundle: /b\ntracking: {votes_needed: 2.5}\n", r"tracking\.votes_needed: must be a whole number, got 2\.5"),
        ("bundle: /b\ncamera: 3\n", r"camera: must be a section"),
        ("bundle: /b\ncamera: {source: kinect}\n", r"camera\.source: must be 'picamera2', 'rtsp', 'opencv' or "
                                                    r"'folder', got 'kinect'"),
        ("bundle: /b\ncamera: {device: 1.5}\n", r"camera\.device: must be a device number or a path/URL string"),
        ("bundle: /b\ncamera: {reopen_max_s: 0}\n", r"camera\.reopen_max_s: must be more than 0, got 0"),
        ("bundle: /b\ndevice_id: 'a/b'\n", r"device_id: use 1-64 characters .*got 'a/b'"),
        ("bundle: /b\ndevice_id: 7\n", r"device_id: must be a text string \(quote it\), got 7"),
        ("bundle: /b\nmqtt: {qos: 3}\n", r"mqtt\.qos: must be at most 2, got 3"),
        ("bundle: /b\nmqtt: {qos: true}\n", r"mqtt\.qos: must be a whole number, got True"),
        ("bundle: /b\ndetection: {score_threshold: 1.5}\n", r"detection\.score_threshold: must be less than 1"),
        ("bundle: /b\nrecognition: {threshold: .nan}\n", r"recognition\.threshold: must be a finite number"),
        ("bundle: /b\nmqtt: {reconnect_min_delay: 9, reconnect_max_delay: 3}\n",
         r"mqtt\.reconnect_min_delay must be <= mqtt\.reconnect_max_delay"),
        ("bundle: /b\nmqtt: {outbox: {max_messages: 0}}\n", r"mqtt\.outbox\.max_messages: must be at least 1"),
        ("bundle: /b\nmqtt: {outbox: {max_bytes: 999}}\n", r"mqtt\.outbox\.max_bytes: must be at least 1000"),
        ("bundle: /b\nmqtt: {outbox: {sync: always}}\n", r"mqtt\.outbox\.sync: must be 'normal' or 'full'"),
        ("bundle: /b\nstate_dir: 5\n", r"state_dir: must be a path, got 5"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("bundle: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value) and info.value.problems == [str(info.value)]


# Values that passed `check` and then killed paho's network thread or the process (issue 11).
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mqtt: {keepalive: 70000}", r"mqtt\.keepalive: must be at most 65535, got 70000"),
        ("mqtt: {keepalive: 0}", r"mqtt\.keepalive: must be at least 1, got 0"),
        ("mqtt: {port: 0}", r"mqtt\.port: must be at least 1, got 0"),
        ("mqtt: {port: 65536}", r"mqtt\.port: must be at most 65535, got 65536"),
        ("mqtt: {host: ''}", r"mqtt\.host: must be a host name or IP address"),
        ("mqtt: {host: '  '}", r"mqtt\.host: must be a host name or IP address"),
        ("mqtt: {client_id: ''}", r"mqtt\.client_id: must be 1-65535 bytes"),
        ("events: {homeassistant_prefix: 'homeassistant/#'}", r"events\.homeassistant_prefix: .*wildcards \+ or #"),
        ("events: {homeassistant_prefix: 'home+assistant'}", r"events\.homeassistant_prefix: .*wildcards"),
        ("events: {homeassistant_prefix: ''}", r"events\.homeassistant_prefix: must not be empty"),
        ("events: {homeassistant_prefix: 'ha/'}", r"events\.homeassistant_prefix: must not have an empty level"),
        ("events: {topic_prefix: '#'}", r"events\.topic_prefix: .*wildcards"),
        ("events: {topic_prefix: '/'}", r"events\.topic_prefix: must not be empty"),
        ("events: {topic_prefix: 'a//b'}", r"events\.topic_prefix: must not have an empty level"),
        ('events: {topic_prefix: "a\\0b"}', r"events\.topic_prefix: must not contain a NUL"),
        ("device_id: 'door#1'", r"device_id: use 1-64 characters"),
        ("device_id: 'door+1'", r"device_id: use 1-64 characters"),
    ],
)
def test_values_paho_would_reject_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, f"bundle: /b\n{text}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_the_limits_themselves_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "bundle: /b\nmqtt: {keepalive: 65535, port: 65535}\n"
                                      "events: {topic_prefix: home/faces, homeassistant_prefix: ha}\n"), env={})
    assert (cfg.mqtt.keepalive, cfg.mqtt.port, cfg.events.topic_prefix) == (65535, 65535, "home/faces")
    cfg = load_config(write(tmp_path, "bundle: /b\nmqtt: {keepalive: 1, port: 1}\n"), env={})
    assert (cfg.mqtt.keepalive, cfg.mqtt.port) == (1, 1)


def test_every_problem_is_one_line_naming_the_file_without_pydantic_noise(tmp_path: Path) -> None:
    path = write(tmp_path, "bundle: /b\nmqtt: {port: 0, keepalive: 70000, host: ''}\ncamera: {fsp: 1}\n"
                           "events: {homeassistant_prefix: 'x/#'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert str(info.value).splitlines() == problems
    keys = ["mqtt.port", "mqtt.keepalive", "mqtt.host", "'camera.fsp'", "events.homeassistant_prefix"]
    for key in keys:
        assert sum(key in line for line in problems) == 1, (key, problems)
    for line in problems:
        assert line.startswith(f"{path}: ")
        for noise in ("pydantic", "http", "validation error", "Input should", "type=", "[", "Traceback"):
            assert noise not in line, line
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_config_errors_are_faceberry_errors_with_the_usage_exit_code(tmp_path: Path) -> None:
    with pytest.raises(FaceberryError) as info:
        load_config(write(tmp_path, "bundle: /b\nbogus: 1\n"), env={})
    assert isinstance(info.value, ConfigError) and isinstance(info.value, RuntimeError)
    assert exit_code_for(info.value) == EXIT_USAGE == 2


def test_password_in_the_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.password: .*never read from the config file.*password_file"):
        load_config(write(tmp_path, "bundle: /b\nmqtt: {username: u, password: hunter2}\n"), env={})


def test_password_from_file_and_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = load_config(write(tmp_path, "bundle: /b\nmqtt: {username: u, password_file: pw}\n"), env={})
    assert cfg.mqtt_password == "s3cret"
    assert "s3cret" not in repr(cfg)

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-systemd")
    cfg = load_config(write(tmp_path, "bundle: /b\nmqtt: {username: u}\n"), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.mqtt_password == "from-systemd"

    (creds / "mqtt_password").write_text("")  # the installer's placeholder: no password
    assert load_config(tmp_path / "config.yaml", env={"CREDENTIALS_DIRECTORY": str(creds)}).mqtt_password is None


def test_missing_password_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.password_file .*nope.* cannot be read"):
        load_config(write(tmp_path, "bundle: /b\nmqtt: {password_file: nope}\n"), env={})


def test_environment_overrides_the_broker(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("envpw")
    env = {"FACEBERRY_MQTT_HOST": "broker.lan", "FACEBERRY_MQTT_PORT": "8883", "FACEBERRY_MQTT_USERNAME": "pi",
           "FACEBERRY_MQTT_PASSWORD_FILE": str(tmp_path / "pw"), "FACEBERRY_MQTT_TLS": "true",
           "FACEBERRY_DEVICE_ID": "garage"}
    cfg = load_config(write(tmp_path, "bundle: /b\nmqtt: {host: localhost, port: 1883}\n"), env=env)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username, cfg.mqtt_password, cfg.mqtt.tls.enabled,
            cfg.device_id) == ("broker.lan", 8883, "pi", "envpw", True, "garage")
    with pytest.raises(ConfigError, match="FACEBERRY_MQTT_PORT='x' must be an integer"):
        load_config(tmp_path / "config.yaml", env={"FACEBERRY_MQTT_PORT": "x"})


def test_every_environment_override_lands_on_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each FACEBERRY_* name a systemd unit may set, the key it overrides, and how its text is read.
    env = {"FACEBERRY_MQTT_HOST": "broker.lan", "FACEBERRY_MQTT_PORT": " 8883 ", "FACEBERRY_MQTT_USERNAME": "pi",
           "FACEBERRY_MQTT_CLIENT_ID": "faceberry-garage", "FACEBERRY_MQTT_TLS": "on",
           "FACEBERRY_MQTT_TLS_CA": "ca.pem", "FACEBERRY_MQTT_TLS_CERT": "c.pem", "FACEBERRY_MQTT_TLS_KEY": "k.pem",
           "FACEBERRY_MQTT_TLS_INSECURE": "", "FACEBERRY_DEVICE_ID": "garage"}
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    # The process's own environment is not read behind the caller's back, and names are exact.
    monkeypatch.setenv("FACEBERRY_MQTT_HOST", "from-the-process")
    cfg = load_config(write(tmp_path, "bundle: /b\nmqtt: {host: localhost}\n"),
                      env={**env, "faceberry_mqtt_username": "lower-case"})
    tls = cfg.mqtt.tls
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username, cfg.mqtt.client_id, cfg.device_id) == (
        "broker.lan", 8883, "pi", "faceberry-garage", "garage")
    assert (tls.enabled, tls.insecure) == (True, False)
    assert [Path(p).name for p in (tls.ca, tls.cert, tls.key)] == ["ca.pem", "c.pem", "k.pem"]
    assert load_config(tmp_path / "config.yaml", env={}).mqtt.host == "localhost"
    with pytest.raises(ConfigError, match=r"FACEBERRY_MQTT_TLS_INSECURE='maybe' must be true or false$"):
        load_config(tmp_path / "config.yaml", env={"FACEBERRY_MQTT_TLS_INSECURE": "maybe"})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found.*example"):
        load_config(tmp_path / "nope.yaml", env={})


def test_tls_files_must_exist_when_enabled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca: .*ca\.pem does not exist"):
        load_config(write(tmp_path, "bundle: /b\nmqtt: {tls: {enabled: true, ca: ca.pem}}\n"), env={})


def test_password_value_is_never_echoed_even_beside_other_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.password: ") as info:
        load_config(write(tmp_path, "bundle: /b\nmqtt: {password: hunter2, port: 0}\n"), env={})
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value)


def test_new_settings_toml_and_relative_state_dir(tmp_path: Path) -> None:
    path = write(tmp_path, 'bundle = "/b"\nstate_dir = "state"\n[camera]\nreopen_max_s = 5\n'
                 '[mqtt.outbox]\nmax_messages = 7\nmax_bytes = 2000\nsync = "full"\n', "c.toml")
    cfg = load_config(path, env={})
    assert cfg.state_dir == tmp_path / "state" and isinstance(cfg.state_dir, Path)
    assert cfg.camera.reopen_max_s == 5.0 and isinstance(cfg.camera.reopen_max_s, float)
    assert (cfg.mqtt.outbox.max_messages, cfg.mqtt.outbox.max_bytes, cfg.mqtt.outbox.sync) == (7, 2000, "full")


def test_a_password_file_others_can_read_gets_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    config = write(tmp_path, "bundle: /b\ndevice_id: hall-7\nmqtt: {username: u, password_file: pw}\n")
    os.chmod(pw, 0o644)
    with caplog.at_level(logging.WARNING, logger="faceberry.device.config"):
        cfg = load_config(config, env={})
    assert cfg.mqtt_password == "s3cret"
    assert len(cfg.warnings) == 1 and "chmod 600" in cfg.warnings[0] and str(pw) in cfg.warnings[0]
    assert "0644" in cfg.warnings[0] and "s3cret" not in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "chmod 600" in caplog.text

    os.chmod(pw, 0o600)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="faceberry.device.config"):
        assert load_config(config, env={}).warnings == []
    assert caplog.records == []


def test_shared_looking_device_ids_get_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, "bundle: /b\n")
    warned = load_config(config, env={"FACEBERRY_DEVICE_ID": "front-door"}).warnings
    assert len(warned) == 1 and "'front-door' is the example's" in warned[0] and "knock each other off" in warned[0]

    monkeypatch.setattr("faceberry.device.config.socket.gethostname", lambda: "raspberrypi.local")
    cfg = load_config(config, env={})
    assert cfg.device_id == "raspberrypi"
    assert len(cfg.warnings) == 1 and "stock hostname" in cfg.warnings[0]

    monkeypatch.setattr("faceberry.device.config.socket.gethostname", lambda: "kitchen-pi")
    cfg = load_config(config, env={})
    assert cfg.device_id == "kitchen-pi" and cfg.warnings == []


def test_check_can_take_the_warnings_without_them_being_logged(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="faceberry.device.config"):
        cfg = load_config(write(tmp_path, "bundle: /b\ndevice_id: front-door\n"), env={}, log_warnings=False)
    assert len(cfg.warnings) == 1 and caplog.records == []


def test_an_unusable_hostname_needs_a_device_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("faceberry.device.config.socket.gethostname", lambda: "my host")
    with pytest.raises(ConfigError, match=r"device_id: the hostname 'my host' is not a valid device_id; set"):
        load_config(write(tmp_path, "bundle: /b\n"), env={})
    assert load_config(tmp_path / "config.yaml", env={"FACEBERRY_DEVICE_ID": "ok"}).device_id == "ok"


def test_sections_can_still_be_built_in_code() -> None:
    # bench/ and the MQTT tests build an MqttConfig directly, without a file.
    from faceberry.device.config import MqttConfig

    cfg = MqttConfig(host="127.0.0.1", port=1884, keepalive=5, queue_size=3)
    assert (cfg.host, cfg.port, cfg.qos, cfg.tls.enabled, cfg.outbox.max_messages) == ("127.0.0.1", 1884, 1, False,
                                                                                         10000)


def example_comments() -> dict[str, list[str]]:
    """The comment lines right above each key of the example, by dotted key path."""
    import re

    out: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []
    comments: list[str] = []
    for line in EXAMPLE.read_text().splitlines():
        if line.strip().startswith("#"):
            comments.append(line.strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z_]+):(.*)$", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            out[".".join([k for _, k in stack] + [match.group(2)])] = comments
            if not match.group(3).strip():
                stack.append((indent, match.group(2)))
        comments = []
    return out


def test_every_number_has_a_range_stated_in_the_example_and_enforced() -> None:
    """Issue 21: a votes_needed or min_face_size of 1e9 was accepted, and no event could ever come out."""
    from faceberry.device.config import numeric_fields, numeric_range

    comments = example_comments()
    fields = numeric_fields()
    assert len(fields) >= 30
    for key, info in fields.items():
        stated = numeric_range(info)
        assert stated, f"{key} has no upper or lower bound"
        assert f"# Range {stated}." in comments.get(key, []), f"{key}: the example does not state {stated}"
    for key in ("tracking.votes_needed", "detection.min_face_size"):
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=rf"{section}\.{name}: must be at most \d+, got 1000000000"):
            config_from_dict({"bundle": "/b", section: {name: 1_000_000_000}}, env={})


def test_state_dirs_and_password_files_that_can_never_work_are_refused(tmp_path: Path) -> None:
    for state_dir in ("/dev/null", "/proc/x", "/sys/x"):
        with pytest.raises(ConfigError, match=r"state_dir: .* kernel's /(dev|proc|sys) file system, not storage"):
            config_from_dict({"bundle": "/b", "state_dir": state_dir}, env={})
    for password_file in ("/dev/zero", str(tmp_path)):
        with pytest.raises(ConfigError, match=r"mqtt\.password_file .* is not a regular file"):
            config_from_dict({"bundle": "/b", "mqtt": {"password_file": password_file}}, env={})
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_bytes(b"x" * 5000)
    with pytest.raises(ConfigError, match=r"systemd credential .* is 5000 bytes"):
        config_from_dict({"bundle": "/b"}, env={"CREDENTIALS_DIRECTORY": str(creds)})


def test_a_min_face_size_no_camera_frame_can_hold_gets_a_warning() -> None:
    cfg = config_from_dict({"bundle": "/b", "device_id": "hall-3", "detection": {"min_face_size": 2000},
                            "camera": {"source": "picamera2", "width": 640, "height": 480}}, env={})
    assert any("min_face_size 2000 is not below the camera's 640×480" in w for w in cfg.warnings), cfg.warnings
    # A folder keeps its images' own sizes: nothing to compare with.
    cfg = config_from_dict({"bundle": "/b", "device_id": "hall-3", "detection": {"min_face_size": 2000},
                            "camera": {"source": "folder", "device": "/tmp"}}, env={})
    assert not cfg.warnings


def test_a_state_dir_that_cannot_be_made_is_a_permanent_error_for_run(tmp_path: Path) -> None:
    """run must not be restarted every few seconds for it: exit 2, which the unit does not restart."""
    from faceberry.device.service import state_dir

    cfg = load_config(write(tmp_path, f"bundle: /b\nstate_dir: {tmp_path / 'later' / 'state'}\n"))
    (tmp_path / "later").write_text("a file where the directory should be\n")
    with pytest.raises(FaceberryError) as err:
        state_dir(cfg)
    assert exit_code_for(err.value) == EXIT_USAGE and "state_dir" in str(err.value)
