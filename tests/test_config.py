"""Config: YAML/TOML → typed dataclasses; unknown keys, wrong types and in-file passwords are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from device.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "systemd" / "faceberry.example.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_example_loads_and_matches_the_defaults() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert isinstance(cfg, Config)
    assert cfg.device_id == "front-door"
    assert cfg.camera.source == "picamera2"
    assert cfg.mqtt.qos == 1 and cfg.events.snapshots is False and cfg.events.topic_prefix == "faceberry"
    assert cfg.mqtt_password is None
    # The example documents every field: each key of every section appears in it.
    text = EXAMPLE.read_text()
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        assert f"{section.name}:" in text, section.name
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                assert f"  {sub.name}:" in text, f"{section.name}.{sub.name}"


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
        ("bundle: /b\ncamera:\n  fsp: 10\n", r"unknown key 'camera\.fsp'"),
        ("bundle: /b\nmqtt:\n  tls:\n    verify: true\n", r"unknown key 'mqtt\.tls\.verify'"),
        ("bundle: /b\nbogus: 1\n", r"unknown key 'bogus'"),
        ("device_id: x\n", r"missing required key 'bundle'"),
        ("bundle: /b\nmqtt: {port: '1883'}\n", r"mqtt\.port: expected int"),
        ("bundle: /b\nevents: {snapshots: 'yes'}\n", r"events\.snapshots: expected bool"),
        ("bundle: /b\ntracking: {votes_needed: 2.5}\n", r"tracking\.votes_needed: expected int"),
        ("bundle: /b\ncamera: 3\n", r"camera: expected a section"),
        ("bundle: /b\ncamera: {source: kinect}\n", r"camera\.source 'kinect'"),
        ("bundle: /b\ndevice_id: 'a/b'\n", r"device_id 'a/b'"),
        ("bundle: /b\nmqtt: {qos: 3}\n", r"mqtt\.qos"),
        ("bundle: /b\ndetection: {score_threshold: 1.5}\n", r"detection\.score_threshold"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("bundle: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


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


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found.*example"):
        load_config(tmp_path / "nope.yaml", env={})


def test_tls_files_must_exist_when_enabled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca: .*ca\.pem does not exist"):
        load_config(write(tmp_path, "bundle: /b\nmqtt: {tls: {enabled: true, ca: ca.pem}}\n"), env={})
