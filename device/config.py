"""The daemon's configuration: one YAML or TOML file → typed dataclasses, validated at start.

Unknown keys are refused with their full path (a typo must not silently fall back to a default).
Every field is documented in the dataclasses below and in the commented example,
systemd/faceberry.example.yaml. Relative paths are taken relative to the config file.

The broker password never comes from the config file: it is read from `mqtt.password_file`, or from
$CREDENTIALS_DIRECTORY/mqtt_password (systemd LoadCredential=). Broker settings can be overridden by
environment variables (FACEBERRY_MQTT_HOST, _PORT, _USERNAME, _PASSWORD_FILE, _CLIENT_ID, _TLS_CA,
_TLS_CERT, _TLS_KEY, _TLS_INSECURE) and the device id by FACEBERRY_DEVICE_ID.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.events import valid_device_id

CREDENTIAL_NAME = "mqtt_password"
CAMERA_SOURCES = ("picamera2", "opencv", "folder")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and the fix."""


@dataclass
class CameraConfig:
    # picamera2: the Pi camera (libcamera); opencv: /dev/videoN index, RTSP/HTTP URL or video file;
    # folder: a directory of images (searched recursively, sorted), e.g. for testing.
    source: str = "opencv"
    # opencv: device index (0 = /dev/video0), a /dev/videoN path, a URL or a video file.
    # folder: the directory. picamera2: ignored (camera index 0 unless given as an int).
    device: int | str = 0
    # Requested capture size for live cameras (ignored for files and folders).
    width: int = 640
    height: int = 480
    # Live cameras: requested frame rate (0 = the camera's default). Files and folders: 0 reads
    # them as fast as frames are processed (none dropped); > 0 plays them at that rate like a
    # live camera, dropping the oldest frames when processing falls behind.
    fps: float = 0.0
    # Files and folders: start again at the end instead of ending the run.
    loop: bool = False
    # Frames buffered between capture and processing; when full the oldest is dropped (and counted).
    queue_size: int = 2
    # Name of this camera in events.
    name: str = "camera"


@dataclass
class DetectionConfig:
    # Faces narrower than this many pixels are ignored: too small to recognise reliably.
    min_face_size: int = 40
    # BlazeFace score needed to count as a face (0–1).
    score_threshold: float = 0.5


@dataclass
class RecognitionConfig:
    # Override the bundle's calibrated accept threshold (null = use the bundle's). Raising it makes
    # strangers less likely to be taken for someone known, at the cost of more "unknown".
    threshold: float | None = None
    # Interpreter threads for the detector and the classifier (a Pi 4/5 has 4 cores).
    num_threads: int = 2


@dataclass
class TrackingConfig:
    # Minimum box overlap (IoU) for a face to continue a track from the previous frame.
    iou: float = 0.3
    # A track's identity is the majority vote over its first N frames (and it changes only when a
    # different label wins a majority of the last N frames).
    votes_needed: int = 5
    # A track unseen for more than this many frames ends.
    max_age: int = 10


@dataclass
class EventsConfig:
    # Seconds before the same label (person or "unknown") may produce another event.
    cooldown: float = 60.0
    # Publish the face crop as JPEG on <prefix>/<device_id>/snapshot/<label>. Off by default: privacy.
    snapshots: bool = False
    # Publish events for faces nobody is recognised as (label "unknown").
    unknown: bool = True
    # First topic level.
    topic_prefix: str = "faceberry"
    # Publish Home Assistant MQTT discovery configs (one "last seen" sensor per person).
    homeassistant: bool = False
    homeassistant_prefix: str = "homeassistant"


@dataclass
class TlsConfig:
    enabled: bool = False
    # CA certificate file (null = the system's CAs).
    ca: str | None = None
    # Client certificate and key, for brokers that authenticate clients by certificate.
    cert: str | None = None
    key: str | None = None
    # Accept any server certificate: for testing only, it defeats the purpose of TLS.
    insecure: bool = False


@dataclass
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    keepalive: int = 60
    # null = "faceberry-<device_id>"
    client_id: str | None = None
    username: str | None = None
    # File holding the password (first line). null = $CREDENTIALS_DIRECTORY/mqtt_password if present.
    password_file: str | None = None
    qos: int = 1
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Messages kept while the broker is unreachable; beyond this the newest are dropped (and counted).
    queue_size: int = 1000
    # Reconnect backoff, seconds: starts at min, doubles up to max.
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 60


@dataclass
class Config:
    # The bundle directory written by `python -m convert`.
    bundle: str
    # This device's name in topics and events (A-Z a-z 0-9 _ . -). Default: the hostname.
    device_id: str = ""
    camera: CameraConfig = field(default_factory=CameraConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    # Seconds between statistics lines in the log (frames, dropped, faces, events, stage timings).
    stats_interval: float = 60.0
    # Where the config was read from (not a key in the file).
    source: str = field(default="", metadata={"internal": True})
    # The broker password resolved from password_file or systemd credentials (not a key in the file).
    mqtt_password: str | None = field(default=None, repr=False, metadata={"internal": True})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used
        raise ConfigError(f"{where}: unsupported type {tp}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if where == "mqtt.password":
            raise ConfigError(
                "mqtt.password: the broker password is never read from the config file; put it in a file "
                "readable only by the service and set mqtt.password_file (or use systemd "
                "LoadCredential=mqtt_password:FILE)"
            )
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {where!r}; known keys here: {known}")
        kwargs[key] = _coerce(value, hints[key], where)
    missing = [n for n, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise ConfigError(f"missing required key {(prefix + '.' if prefix else '') + missing[0]!r}")
    return cls(**kwargs)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; copy systemd/faceberry.example.yaml and edit it")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError as exc:  # Python 3.10
            raise ConfigError(f"{path}: TOML needs Python 3.11+; use YAML instead") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())
            raise ConfigError(f"{path} is not valid YAML: {first}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _env_overrides(data: dict[str, Any], env: dict[str, str]) -> None:
    """Apply FACEBERRY_* environment variables (strings from the environment, typed here)."""
    mqtt = data.setdefault("mqtt", {})
    if not isinstance(mqtt, dict):
        return
    tls = mqtt.setdefault("tls", {}) if isinstance(mqtt.get("tls", {}), dict) else {}

    def as_int(name: str, text: str) -> int:
        try:
            return int(text)
        except ValueError as exc:
            raise ConfigError(f"environment variable {name}={text!r} must be an integer") from exc

    def as_bool(name: str, text: str) -> bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"environment variable {name}={text!r} must be true or false")

    table: list[tuple[str, dict[str, Any], str, Any]] = [
        ("FACEBERRY_MQTT_HOST", mqtt, "host", str),
        ("FACEBERRY_MQTT_PORT", mqtt, "port", as_int),
        ("FACEBERRY_MQTT_USERNAME", mqtt, "username", str),
        ("FACEBERRY_MQTT_PASSWORD_FILE", mqtt, "password_file", str),
        ("FACEBERRY_MQTT_CLIENT_ID", mqtt, "client_id", str),
        ("FACEBERRY_MQTT_TLS", tls, "enabled", as_bool),
        ("FACEBERRY_MQTT_TLS_CA", tls, "ca", str),
        ("FACEBERRY_MQTT_TLS_CERT", tls, "cert", str),
        ("FACEBERRY_MQTT_TLS_KEY", tls, "key", str),
        ("FACEBERRY_MQTT_TLS_INSECURE", tls, "insecure", as_bool),
        ("FACEBERRY_DEVICE_ID", data, "device_id", str),
    ]
    for name, section, key, conv in table:
        if name in env:
            text = env[name]
            section[key] = conv(text) if conv is str else conv(name, text)


def _resolve_path(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path))


def _read_password(cfg: Config, env: dict[str, str]) -> str | None:
    if cfg.mqtt.password_file:
        path = Path(cfg.mqtt.password_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"mqtt.password_file {path} cannot be read ({exc.strerror}); create it (mode 0600) or fix the path"
            ) from exc
    elif env.get("CREDENTIALS_DIRECTORY") and (Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME).is_file():
        text = (Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME).read_text(encoding="utf-8")
    else:
        return None
    lines = text.splitlines()
    # An empty credential file means "no password": the installer creates one so the unit starts.
    return lines[0] if lines and lines[0] else None


def validate(cfg: Config) -> None:
    checks: list[tuple[bool, str]] = [
        (valid_device_id(cfg.device_id), f"device_id {cfg.device_id!r}: use 1-64 characters of A-Z a-z 0-9 _ . -"),
        (cfg.camera.source in CAMERA_SOURCES,
         f"camera.source {cfg.camera.source!r}: use one of {', '.join(CAMERA_SOURCES)}"),
        (cfg.camera.width > 0 and cfg.camera.height > 0, "camera.width and camera.height must be > 0"),
        (cfg.camera.fps >= 0, "camera.fps must be >= 0 (0 = default / as fast as processed)"),
        (cfg.camera.queue_size >= 1, "camera.queue_size must be >= 1"),
        (cfg.detection.min_face_size >= 0, "detection.min_face_size must be >= 0 pixels"),
        (0 < cfg.detection.score_threshold < 1, "detection.score_threshold must be between 0 and 1"),
        (cfg.recognition.threshold is None or 0 <= cfg.recognition.threshold <= 1,
         "recognition.threshold must be between 0 and 1, or null for the bundle's"),
        (cfg.recognition.num_threads >= 1, "recognition.num_threads must be >= 1"),
        (0 < cfg.tracking.iou <= 1, "tracking.iou must be in (0, 1]"),
        (cfg.tracking.votes_needed >= 1, "tracking.votes_needed must be >= 1"),
        (cfg.tracking.max_age >= 0, "tracking.max_age must be >= 0 frames"),
        (cfg.events.cooldown >= 0, "events.cooldown must be >= 0 seconds"),
        (bool(cfg.events.topic_prefix.strip("/")) and not any(c in cfg.events.topic_prefix for c in "+#"),
         "events.topic_prefix must be non-empty without + or #"),
        (1 <= cfg.mqtt.port <= 65535, f"mqtt.port {cfg.mqtt.port} must be 1-65535"),
        (cfg.mqtt.keepalive >= 5, "mqtt.keepalive must be >= 5 seconds"),
        (cfg.mqtt.qos in (0, 1, 2), "mqtt.qos must be 0, 1 or 2 (1 recommended)"),
        (cfg.mqtt.queue_size >= 1, "mqtt.queue_size must be >= 1"),
        (1 <= cfg.mqtt.reconnect_min_delay <= cfg.mqtt.reconnect_max_delay,
         "mqtt.reconnect_min_delay must be >= 1 and <= mqtt.reconnect_max_delay"),
        (cfg.stats_interval > 0, "stats_interval must be > 0 seconds"),
        (bool(cfg.mqtt.tls.cert) == bool(cfg.mqtt.tls.key), "mqtt.tls.cert and mqtt.tls.key go together"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name in ("ca", "cert", "key"):
        value = getattr(cfg.mqtt.tls, name)
        if cfg.mqtt.tls.enabled and value and not Path(value).is_file():
            raise ConfigError(f"mqtt.tls.{name}: {value} does not exist")


def config_from_dict(
    data: dict[str, Any], base_dir: str | Path = ".", env: dict[str, str] | None = None, source: str = "<dict>"
) -> Config:
    """Build and validate a Config from parsed data (what load_config does after reading the file)."""
    env = dict(os.environ) if env is None else env
    data = copy.deepcopy(data)
    _env_overrides(data, env)
    try:
        cfg: Config = _build(Config, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    base = Path(base_dir)
    cfg.source = source
    cfg.device_id = cfg.device_id or socket.gethostname().split(".")[0]
    cfg.bundle = _resolve_path(base, cfg.bundle) or cfg.bundle
    if cfg.camera.source == "folder" or (
        isinstance(cfg.camera.device, str) and "://" not in cfg.camera.device
        and not cfg.camera.device.startswith("/dev/") and not cfg.camera.device.isdigit()
    ):
        cfg.camera.device = _resolve_path(base, str(cfg.camera.device)) or cfg.camera.device
    cfg.mqtt.password_file = _resolve_path(base, cfg.mqtt.password_file)
    for name in ("ca", "cert", "key"):
        setattr(cfg.mqtt.tls, name, _resolve_path(base, getattr(cfg.mqtt.tls, name)))
    try:
        validate(cfg)
        cfg.mqtt_password = _read_password(cfg, env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read, type-check and validate a YAML (.yaml/.yml) or TOML (.toml) config; raises ConfigError."""
    path = Path(path)
    return config_from_dict(_read_file(path), base_dir=path.resolve().parent, env=env, source=str(path))


def describe(cfg: Config) -> str:
    """One line for logs and `check`: what this config will do (no secrets)."""
    auth = f"user {cfg.mqtt.username}" if cfg.mqtt.username else "anonymous"
    if cfg.mqtt_password:
        auth += " with password"
    tls = " tls" if cfg.mqtt.tls.enabled else ""
    return (
        f"device {cfg.device_id}, camera {cfg.camera.source}:{cfg.camera.device}, bundle {cfg.bundle}, "
        f"broker {cfg.mqtt.host}:{cfg.mqtt.port}{tls} ({auth})"
    )


DEFAULT_CONFIG = "/etc/faceberry/config.yaml"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The --config flag shared by `run` and `check`, so both read the same file by default."""
    parser.add_argument(
        "--config", default=os.environ.get("FACEBERRY_CONFIG", DEFAULT_CONFIG),
        help=f"YAML or TOML config file (default: $FACEBERRY_CONFIG or {DEFAULT_CONFIG})",
    )
