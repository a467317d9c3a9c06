"""The daemon's configuration: one YAML or TOML file → typed pydantic models, validated at start.

Unknown keys are refused with their full path (a typo must not silently fall back to a default).
Every field is documented by its `description` below and in the commented example,
systemd/faceberry.example.yaml (a test holds the two in step). Relative paths are taken relative to
the config file. Every problem becomes one line "<file>: <key path>: <what is wrong>, got <value>
(<what the key is>)"; `ConfigError.problems` lists them, and no pydantic traceback or URL is shown.

The broker password never comes from the config file: it is read from `mqtt.password_file`, or from
$CREDENTIALS_DIRECTORY/mqtt_password (systemd LoadCredential=). Broker settings can be overridden by
environment variables (FACEBERRY_MQTT_HOST, _PORT, _USERNAME, _PASSWORD_FILE, _CLIENT_ID, _TLS, _TLS_CA,
_TLS_CERT, _TLS_KEY, _TLS_INSECURE) and the device id by FACEBERRY_DEVICE_ID.

Values are checked strictly (strings are not turned into numbers, nor numbers into booleans; an integer
is accepted where a number is expected) because a YAML typo such as `port: '1883'` or `snapshots: 'no'`
would otherwise be guessed at.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import reprlib
import socket
import stat
import types
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from faceberry.device.messaging.topics import valid_device_id
from faceberry.errors import UsageError

log = logging.getLogger(__name__)

CREDENTIAL_NAME = "mqtt_password"
ENV_PREFIX = "FACEBERRY_"
CAMERA_CREDENTIAL_NAME = "camera_password"
CameraSource = Literal["picamera2", "rtsp", "opencv", "folder"]
DEFAULT_CONFIG = "/etc/faceberry/config.yaml"
# The systemd unit's StateDirectory=faceberry: the outbox, status file and bundle versions live there.
DEFAULT_STATE_DIR = Path("/var/lib/faceberry")
EXAMPLE_DEVICE_ID = "front-door"
# Hostnames images ship with: a device_id taken from (or set to) one of these is likely shared by other Pis.
STOCK_HOSTNAMES = frozenset({"raspberrypi", "raspberry", "pi", "localhost", "ubuntu", "debian", "dietpi"})
# MQTT encodes strings with a 16-bit length.
_MQTT_MAX_BYTES = 65535
# /dev/video0 … /dev/video255: the most V4L2 numbers.
CAMERA_INDEX_MAX = 255
# A password file holds one line; anything bigger is the wrong file (or /dev/zero, which never ends).
SECRET_MAX_BYTES = 4096
# The example config is about 10 KiB; a file 100 times that is not a config.
CONFIG_MAX_BYTES = 1 << 20
# Kernel file systems: a path there is never storage (a state_dir of /dev/null or /proc/x passed `check`
# and then stopped `run`).
_SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


class ConfigError(UsageError, ValueError):
    """A config that cannot be used; each line names the file, the key and the fix.

    Also a ValueError because it was one before the common base class existed, and callers catch that.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


# --- field checks shared by several sections ---------------------------------------------------------------

def _topic_prefix(value: str) -> str:
    """Refuse what makes paho raise in its network thread or lands events on another topic."""
    if not value.strip("/"):
        raise ValueError("must not be empty")
    if "#" in value or "+" in value:
        raise ValueError("must not contain the MQTT wildcards + or # (subscribers' filters would break)")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    if "" in value.split("/"):
        raise ValueError("must not have an empty level (no leading, trailing or double '/')")
    if len(value.encode("utf-8")) > 1024:
        raise ValueError("must be at most 1024 bytes")
    return value


def _resolve(value: str | None, info: ValidationInfo) -> str | None:
    """A relative path is relative to the config file (the base_dir in the validation context)."""
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    base = (info.context or {}).get("base_dir")
    if path.is_absolute() or base is None:
        return str(path)
    return str(Path(base) / path)


def _optional_file(value: str | None, info: ValidationInfo) -> str | None:
    """An optional file setting: null, or a non-blank name resolved like every path (`_resolve`)."""
    if value is not None and not value.strip():
        raise ValueError("must be a file name, or null")
    return _resolve(value, info)


TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- the sections ------------------------------------------------------------------------------------------

class CameraConfig(_Section):
    """Where frames come from."""

    source: CameraSource = Field(
        "opencv", description="picamera2: the Pi camera (libcamera); rtsp: an IP camera or doorbell's RTSP "
        "stream; opencv: a /dev/videoN camera, an HTTP/MJPEG URL or a video file; folder: a directory of images "
        "(searched recursively, sorted), for testing")
    device: int | str = Field(
        0, description="rtsp: the stream URL with the user but no password (rtsp://USER@HOST:554/PATH; pick the "
        "camera's substream); opencv: a device index (0 = /dev/video0), a /dev/videoN path, a URL or a video "
        "file; folder: the directory; picamera2: the camera number (0)")
    password_file: str | None = Field(
        None, description="rtsp: file holding the camera's password (first line), readable only by the service "
        "(chmod 600); null = $CREDENTIALS_DIRECTORY/camera_password if present. Never put it in the URL")
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="rtsp: how the video travels; tcp survives Wi-Fi loss without smeared frames, udp has "
        "a little less delay on a clean wired network")
    rtsp_max_lag_s: float = Field(
        3.0, ge=0, le=3600, description="rtsp: seconds decoding may fall behind the camera's clock (a stream too "
        "big for this device) before the stream is reopened to drop the backlog; 0 = never (for a camera whose "
        "timestamps run slow)")
    width: int = Field(640, ge=16, le=8192, description="capture width of live cameras in pixels (files keep theirs)")
    height: int = Field(480, ge=16, le=8192, description="capture height of live cameras in pixels")
    fps: float = Field(
        0.0, ge=0, le=240, description="live cameras: requested frame rate (0 = the camera's default); files and "
        "folders: 0 = as fast as frames are processed, none dropped; > 0 = played at that rate, dropping "
        "the oldest frames when processing lags")
    loop: bool = Field(False, description="files and folders: start again at the end instead of ending the run")
    queue_size: int = Field(
        2, ge=1, le=100, description="frames buffered between capture and recognition; when full the oldest is "
        "dropped (and counted)")
    name: str = Field("camera", min_length=1, description="this camera's name in events")
    reopen_max_s: float = Field(
        30.0, gt=0, le=3600, description="live cameras: the longest wait in seconds between two attempts to reopen "
        "a camera that failed (the wait grows up to this)")
    max_outage_s: float = Field(
        900.0, ge=0, le=604800, description="live cameras: seconds a camera may stay out (failing, or absent since the "
        "start) before `run` exits with code 3 so systemd starts it afresh (which waits for the camera "
        "again); 0 = wait forever. Files and folders that are missing fail at once")

    @field_validator("device", mode="before")
    @classmethod
    def _device_type(cls, value: Any) -> Any:
        # Checked before the int|str union so a wrong type is one problem, not one per union member.
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be a device number or a path/URL string")
        if isinstance(value, int) and not 0 <= value <= CAMERA_INDEX_MAX:
            # V4L2 numbers its nodes /dev/video0-255; OpenCV's "-1 = any camera" picks one at random.
            raise ValueError(f"must be a device number 0-{CAMERA_INDEX_MAX} or a path/URL string")
        return value

    # The camera's password, read from password_file or the systemd credential; not a key of the file.
    _password: str | None = PrivateAttr(None)

    @property
    def password(self) -> str | None:
        return self._password

    @password.setter
    def password(self, value: str | None) -> None:
        self._password = value

    @field_validator("password_file")
    @classmethod
    def _resolve_password_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _optional_file(value, info)

    @model_validator(mode="after")
    def _rtsp_url(self) -> CameraConfig:
        if self.source != "rtsp":
            return self
        url = self.device
        scheme = url.split("://", 1)[0].lower() if isinstance(url, str) and "://" in url else ""
        if scheme not in ("rtsp", "rtsps"):
            raise ValueError(f"camera.device: source rtsp needs an rtsp:// or rtsps:// URL such as "
                             f"rtsp://admin@192.168.1.20:554/stream2, got {_short(_redacted(url))}")
        if _url_password(url) is not None:
            # Not echoed: the value is the secret.
            raise ValueError("camera.device: the URL holds a password; remove it from the URL (keep the user: "
                             "rtsp://USER@HOST/...) and put the password in a file named by camera.password_file "
                             "(or use systemd LoadCredential=camera_password:FILE)")
        return self

    @model_validator(mode="after")
    def _resolve_device(self, info: ValidationInfo) -> CameraConfig:
        device = self.device
        if self.source == "folder" or (
            isinstance(device, str) and "://" not in device and not device.startswith("/dev/")
            and not device.isdigit()
        ):
            self.device = _resolve(str(device), info) or device
        return self


class DetectionConfig(_Section):
    """Face detection (BlazeFace)."""

    min_face_size: int = Field(
        40, ge=0, le=2048,
        description="faces narrower than this many pixels are ignored: too small to recognise reliably")
    score_threshold: float = Field(
        0.5, gt=0, lt=1, description="BlazeFace confidence needed to count as a face (between 0 and 1)")


class RecognitionConfig(_Section):
    """Who a face is."""

    threshold: float | None = Field(
        None, ge=0, le=1, description="override of the bundle's calibrated accept threshold (0-1; null = the "
        "bundle's); higher = fewer strangers taken for someone known, more 'unknown'")
    num_threads: int = Field(2, ge=1, le=64, description="interpreter threads for the detector and the classifier "
                                                  "(a Pi 4/5 has 4 cores)")
    reverify_every: int = Field(
        5, ge=1, le=100, description="a face whose track is decided and settled is embedded again only every N frames "
        "it is seen (at once when its box jumps, it looks different or its detection score drifts); the frames "
        "between reuse its last recognition without voting. 1 = every frame. Default: "
        "faceberry.device.recognition.tracker.REVERIFY_EVERY")


class TrackingConfig(_Section):
    """Following a face across frames, so one visit is one event."""

    iou: float = Field(0.3, gt=0, le=1, description="minimum box overlap (IoU, in (0, 1]) for a face to "
                                                     "continue a track of the previous frame")
    votes_needed: int = Field(
        5, ge=1, le=100, description="a track's identity is decided over its first N frames (a person needs 4 of 5 of "
        "them, faceberry.contract.VISIT_AGREEMENT); it changes only when another label wins that agreement (unknown: "
        "a majority) of the last N frames")
    max_age: int = Field(10, ge=0, le=1000, description="a track unseen for more than this many frames ends")


class EventsConfig(_Section):
    """What is published, and on which topics."""

    cooldown: float = Field(60.0, ge=0, le=86400, description="seconds before the same label (a person or 'unknown') "
                                                     "may produce another event")
    snapshots: bool = Field(False, description="publish the face crop as JPEG on "
                                               "<topic_prefix>/<device_id>/snapshot/<label>; off by default: privacy")
    unknown: bool = Field(True, description="publish events for faces nobody is recognised as (label 'unknown')")
    topic_prefix: TopicPrefix = Field(
        "faceberry", description="first level(s) of every topic, without + # or empty levels: "
        "<topic_prefix>/<device_id>/{status,events,person/<label>,snapshot/<label>}")
    homeassistant: bool = Field(False, description="publish Home Assistant MQTT discovery configs, retained (a "
                                                   "Face event, per person presence and last seen, diagnostics; "
                                                   "see the homeassistant section), and the presence topics")
    homeassistant_prefix: TopicPrefix = Field(
        "homeassistant", description="Home Assistant's discovery prefix, without + # or empty levels")


class HomeAssistantConfig(_Section):
    """Home Assistant's entities beyond discovery itself: presence, face images, commands (docs/MQTT.md)."""

    presence_timeout: float = Field(
        300.0, gt=0, le=86400,
        description="seconds a person may go unseen before their presence binary_sensor turns off")
    images: bool = Field(False, description="publish the last face crop and the last unknown face crop (JPEG, "
                                            "retained) for Home Assistant's image entities; off by default: privacy")
    commands: bool = Field(False, description="accept commands (name the last unknown face, 'wrong', undo, forget) "
                                              "on <topic_prefix>/<device_id>/command; keeps recent faces in state_dir")
    command_max_bytes: int = Field(4096, ge=64, le=65536,
                                   description="longest command message accepted, in bytes; longer ones are refused")


class LibraryConfig(_Section):
    """One face library for every device (docs/MQTT.md, "The library"): people named on one device are named on all."""

    share: bool = Field(False, description="publish what this device's commands change in the library (people "
                                           "enrolled, with their face embeddings; people forgotten; corrections and "
                                           "their undo), retained on <topic_prefix>/library/<entry>, and apply what "
                                           "other devices publish; off by default: privacy (embeddings on the "
                                           "broker)")
    strangers: bool = Field(False, description="share stranger identities with the other devices, so a stranger "
                                               "keeps one stranger_id on every device: each stranger's centroid "
                                               "embedding, retained on <topic_prefix>/strangers/<stranger_id>; needs "
                                               "memory.strangers; off by default: privacy (embeddings of people who "
                                               "never agreed, on the broker)")


class MemoryConfig(_Section):
    """What the daemon remembers of the faces it saw, in state_dir (only when commands or strangers are on)."""

    max_faces: int = Field(50, ge=1, le=1000, description="recent decided faces kept (crops and embeddings) for naming "
                                                 "and corrections; the oldest go first")
    max_age: float = Field(86400.0, gt=0, le=31_536_000,
        description="seconds a recent face's crops and embeddings are kept")
    crops_per_face: int = Field(3, ge=1, le=20, description="frames (JPEG crops with margin) kept per face")
    strangers: bool = Field(False, description="cluster unknown faces so events carry a stable stranger_id, "
                                               "count and first_seen (embeddings only, kept in state_dir)")
    max_strangers: int = Field(200, ge=1, le=10_000,
        description="stranger clusters kept; the least recently seen go first")
    stranger_retention: float = Field(
        30 * 86400.0, gt=0, le=31_536_000,
        description="seconds a stranger cluster unseen is kept before it is forgotten")
    negative_margin: float = Field(
        0.004, ge=0, le=1, description="after 'wrong, not X': X is accepted only when its score beats the nearest "
        "stored negative's similarity to the face by this much (0.004: the largest that lost no family photo in "
        "bench.calibration's lookalike study, docs/BENCHMARKS.md; higher stops a lookalike more, at the cost of "
        "X's own faces that resemble them)")


class TlsConfig(_Section):
    """TLS to the broker."""

    enabled: bool = Field(False, description="connect with TLS (usually port 8883)")
    ca: str | None = Field(None, description="CA certificate file for the broker's certificate (null = the "
                                             "system's CAs)")
    cert: str | None = Field(None, description="client certificate file, for brokers that authenticate "
                                               "clients by certificate (goes with key)")
    key: str | None = Field(None, description="client private key file (goes with cert)")
    insecure: bool = Field(False, description="accept any server certificate: for testing only, it defeats "
                                              "the purpose of TLS")

    @field_validator("ca", "cert", "key")
    @classmethod
    def _resolve_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _optional_file(value, info)

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        if bool(self.cert) != bool(self.key):
            raise ValueError("mqtt.tls.cert and mqtt.tls.key go together: set both or neither")
        if self.enabled:
            for name in ("ca", "cert", "key"):
                value = getattr(self, name)
                if value and not Path(value).is_file():
                    raise ValueError(f"mqtt.tls.{name}: {value} does not exist; fix the path or set it to null")
        return self


class OutboxConfig(_Section):
    """The on-disk queue (in state_dir) every event and state goes through before the broker has it."""

    max_messages: int = Field(
        10000, ge=1, le=10_000_000,
        description="messages kept on disk while the broker is unreachable; beyond this the "
        "oldest are dropped (counted, one summary log line per stats interval)")
    max_bytes: int = Field(50_000_000, ge=1000, le=10_000_000_000,
        description="bytes of messages kept on disk (snapshots count "
                                                            "too); beyond this the oldest are dropped")
    sync: Literal["normal", "full"] = Field(
        "normal", description="normal: survives a crash or SIGKILL of the daemon, a power cut may lose the "
        "last second of messages; full: survives a power cut too, at the cost of a flash write (fsync) per "
        "message, slower and harder on SD cards")


class MqttConfig(_Section):
    """The broker."""

    host: str = Field("localhost", description="broker host name or IP address")
    port: int = Field(1883, ge=1, le=65535, description="broker TCP port, 1-65535 (1883 plain, 8883 TLS)")
    keepalive: int = Field(60, ge=1, le=65535, description="seconds between keep-alive pings, 1-65535 (MQTT's "
                                                           "limit); the broker drops us after 1.5× this silent")
    client_id: str | None = Field(None, description="MQTT client id; null = faceberry-<device_id>-<8 hex from "
                                                    "/etc/machine-id>, unique per install. Two clients with the same "
                                                    "id knock each other off the broker")
    username: str | None = Field(None, description="broker user name (null = anonymous)")
    password_file: str | None = Field(
        None, description="file holding the password (first line), readable only by the service (chmod 600); "
        "null = $CREDENTIALS_DIRECTORY/mqtt_password if present. The password is never written in this file")
    qos: int = Field(1, ge=0, le=2, description="MQTT QoS of events: 0, 1 or 2 (1 = at least once, recommended)")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings")
    queue_size: int = Field(
        1000, ge=1, le=100_000,
        description="messages handed to the MQTT client and not yet acknowledged; the rest wait "
        "in the durable outbox (mqtt.outbox), nothing is dropped at this limit")
    reconnect_min_delay: int = Field(1, ge=1, le=3600, description="reconnect backoff: first wait in seconds (doubles "
                                                          "up to reconnect_max_delay)")
    reconnect_max_delay: int = Field(60, ge=1, le=3600, description="reconnect backoff: longest wait in seconds")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="the durable on-disk queue")
    fatal_after_s: float = Field(
        300.0, ge=0, le=604800, description="seconds the broker may keep refusing our credentials or certificates (a "
        "setting to fix, not an outage) before `run` exits with code 2, so systemd shows the unit failed; "
        "0 = never. A broker that is merely unreachable never ends the daemon")

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            # Raised before field validation so the value is never echoed back in any message.
            raise ValueError(
                "mqtt.password: the broker password is never read from the config file; put it in a file "
                "readable only by the service and set mqtt.password_file (or use systemd "
                "LoadCredential=mqtt_password:FILE)")
        return data

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # An empty host makes paho abort the whole process (SIGABRT) now and then.
        if not value.strip() or any(c.isspace() for c in value) or "\x00" in value:
            raise ValueError("must be a host name or IP address, without spaces")
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value or "\x00" in value or len(value.encode("utf-8")) > _MQTT_MAX_BYTES:
            raise ValueError("must be 1-65535 bytes without NUL, or null for faceberry-<device_id>-<install id>")
        return value

    @field_validator("password_file")
    @classmethod
    def _resolve_password_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _optional_file(value, info)

    @model_validator(mode="after")
    def _backoff(self) -> MqttConfig:
        if self.reconnect_min_delay > self.reconnect_max_delay:
            raise ValueError("mqtt.reconnect_min_delay must be <= mqtt.reconnect_max_delay")
        return self


class Config(_Section):
    """The whole file."""

    bundle: str = Field(min_length=1, description="the bundle directory written by `python -m convert` "
                                                  "(manifest.json, *.tflite, labels.txt)")
    device_id: str = Field("", description="this device's name in topics and events: 1-64 of A-Z a-z 0-9 _ . - "
                                           "(default: the hostname); unique per Pi")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="where frames come from")
    cameras: list[CameraConfig] | None = Field(
        None, description="several cameras in one daemon, instead of camera: a list of camera sections, each with "
        "a unique name (the `camera` of its events); one recognizer serves them in turn")
    detection: DetectionConfig = Field(default_factory=DetectionConfig, description="face detection")
    recognition: RecognitionConfig = Field(default_factory=RecognitionConfig, description="who a face is")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="faces across frames")
    events: EventsConfig = Field(default_factory=EventsConfig, description="what is published where")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="the broker")
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig,
                                               description="Home Assistant presence, images and commands")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="recent faces and strangers remembered")
    library: LibraryConfig = Field(default_factory=LibraryConfig,
                                   description="the face library shared with the other devices")
    stats_interval: float = Field(60.0, gt=0, le=86400, description="seconds between statistics lines in the log "
                                                          "(frames, dropped, faces, events, stage timings)")
    state_dir: Annotated[Path, Field(strict=False)] = Field(
        DEFAULT_STATE_DIR, description="directory the daemon keeps its state in (the durable MQTT "
        "outbox); the systemd unit's StateDirectory=")

    # Not keys of the file: where it was read from, the resolved password, what deserves a warning.
    _source: str = PrivateAttr("")
    _mqtt_password: str | None = PrivateAttr(None)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @field_validator("bundle")
    @classmethod
    def _resolve_bundle(cls, value: str, info: ValidationInfo) -> str:
        return _resolve(value, info) or value

    @field_validator("state_dir")
    @classmethod
    def _resolve_state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        path = Path(_resolve(str(value), info) or value)
        problem = special_state_dir(path)
        if problem:
            raise ValueError(problem)
        return path

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        # Empty = the hostname, filled in after validation.
        if value and not valid_device_id(value):
            raise ValueError("use 1-64 characters of A-Z a-z 0-9 _ . -")
        return value

    @model_validator(mode="after")
    def _default_device_id(self) -> Config:
        if not self.device_id:
            host = socket.gethostname().split(".")[0]
            if not valid_device_id(host):
                raise ValueError(f"device_id: the hostname {host!r} is not a valid device_id; set device_id "
                                 "(1-64 characters of A-Z a-z 0-9 _ . -)")
            self.device_id = host
        return self

    @model_validator(mode="after")
    def _shared_strangers(self) -> Config:
        if self.library.strangers and not self.memory.strangers:
            raise ValueError("library.strangers: true needs memory.strangers: true (the stranger memory it shares); "
                             "set both, or library.strangers: false")
        return self

    @model_validator(mode="after")
    def _camera_list(self) -> Config:
        if self.cameras is None:
            return self
        if "camera" in self.model_fields_set:
            raise ValueError("camera and cameras are both set: keep camera: for one camera, or list every camera "
                             "under cameras: (each with a unique name), not both")
        if not self.cameras:
            raise ValueError("cameras: the list is empty; list at least one camera (source, device, name) or use "
                             "camera: for one")
        seen: set[str] = set()
        for i, camera in enumerate(self.cameras):
            if "name" not in camera.model_fields_set:
                raise ValueError(f"cameras[{i}]: missing name; every camera in cameras needs a unique name (its "
                                 "events carry it), e.g. name: front_door")
            if camera.name in seen:
                raise ValueError(f"cameras[{i}]: the name {_short(camera.name)} is used twice; give each camera "
                                 "its own name (its events carry it)")
            seen.add(camera.name)
        # The first camera stands for all where one is asked for (`check`, older callers); not a set key.
        self.__dict__["camera"] = self.cameras[0]
        return self

    @property
    def all_cameras(self) -> list[CameraConfig]:
        """Every camera this daemon reads: the cameras list, or the one camera section."""
        return list(self.cameras) if self.cameras else [self.camera]

    @property
    def source(self) -> str:
        """The file this config was read from ('' when built in code)."""
        return self._source

    @source.setter
    def source(self, value: str) -> None:
        self._source = value

    @property
    def mqtt_password(self) -> str | None:
        """The broker password from mqtt.password_file or systemd credentials (never repr'd)."""
        return self._mqtt_password

    @mqtt_password.setter
    def mqtt_password(self, value: str | None) -> None:
        self._mqtt_password = value

    @property
    def warnings(self) -> list[str]:
        """Problems that do not stop the daemon but deserve a fix (one line each, with the fix)."""
        return self._warnings


# --- turning pydantic's errors into lines a user can act on ------------------------------------------------

def _unwrap(annotation: Any) -> Any:
    """The model class inside `Model`, `Model | None` or `Annotated[Model, ...]`, else the annotation."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _unwrap(options[0])
    return annotation


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel], FieldInfo | None]:
    """The part of `loc` that names keys, the section holding the last of them, and its field."""
    path: list[str] = []
    holder: type[BaseModel] = Config
    current: type[BaseModel] | None = Config
    info: FieldInfo | None = None
    item: type[BaseModel] | None = None  # the section type of a list of sections (cameras)
    for part in loc:
        if isinstance(part, int) and item is not None and path:
            path[-1] += f"[{part}]"
            current, item = item, None
            continue
        # What follows a leaf field names a union member or a list index, not a key.
        if current is None or not (isinstance(part, str) and part in current.model_fields):
            break
        path.append(part)
        holder = current
        info = current.model_fields[part]
        inner = _unwrap(info.annotation)
        args = typing.get_args(inner) if typing.get_origin(inner) is list else ()
        item = args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else None
        current = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return path, (current or holder), info


def _is_section(info: FieldInfo | None) -> bool:
    inner = _unwrap(info.annotation) if info else Config
    return isinstance(inner, type) and issubclass(inner, BaseModel)


_PLAIN = {
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a text string (quote it)",
    "model_type": "must be a section (a mapping of keys)",
    "dict_type": "must be a section (a mapping of keys)",
    "path_type": "must be a path",
    "string_too_short": "must not be empty",
}


_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


# YAML aliases can make a few hundred bytes into a list of 9**9 items (shared, so parsing is cheap): a
# plain repr of it in an error message would take minutes and gigabytes.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring = _REPR.maxother = 200


def _short(value: Any) -> str:
    text = _REPR.repr(value) if isinstance(value, (list, dict, tuple, set, frozenset)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problems(exc: ValidationError, source: str) -> list[str]:
    """One line per problem: the file, the key path, what is wrong, the value, what the key is."""
    # Each entry is a finished line, or (for a key's own problems) the key path, finished at the end so a
    # union's failures merge into one line while the order of problems is kept.
    entries: list[str | tuple[str]] = []
    messages: dict[str, list[str]] = {}
    tails: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        error_type = err["type"]
        if error_type == "extra_forbidden":
            path, holder, _ = _walk(loc[:-1])
            where = ".".join([*path, str(loc[-1])])
            entries.append(f"{source}: unknown key {where!r}; known keys here: {', '.join(holder.model_fields)}")
            continue
        path, _, info = _walk(loc)
        where = ".".join(path)
        about = f" ({info.description})" if info and info.description else ""
        if error_type == "missing":
            entries.append(f"{source}: missing required key {where!r}{about}")
            continue
        if error_type == "value_error":
            message = str(err.get("ctx", {}).get("error", err["msg"]))
            if _is_section(info):
                # A section's own check: its message names its keys and the fix (and must not echo the
                # section's values, which may hold a password).
                entries.append(f"{source}: {message}")
                continue
        elif error_type in _BOUNDS and err.get("ctx"):
            word, key = _BOUNDS[error_type]
            bound = err["ctx"][key]
            message = f"must be {word} {bound:g}" if isinstance(bound, float) else f"must be {word} {bound}"
        else:
            message = _PLAIN.get(error_type) or err["msg"].replace("Input should be", "must be")
        if where not in messages:
            messages[where] = []
            tails[where] = (f", got {_short(err['input'])}" if "input" in err else "") + about
            entries.append((where,))
        if message not in messages[where]:
            messages[where].append(message)
    return [entry if isinstance(entry, str) else
            f"{source}: {entry[0] or '(top level)'}: {' or '.join(messages[entry[0]])}{tails[entry[0]]}"
            for entry in entries]


# --- reading the file --------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    """The config file's text; ConfigError with the fix for a missing, special, huge or unreadable file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; copy systemd/faceberry.example.yaml and edit it") from None
    except NotADirectoryError:
        raise ConfigError(f"config file not found: {path} (a part of the path is a file); fix the path") from None
    # A PermissionError goes on as it is: every command turns it into "permission denied …: run it with sudo".
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file (a directory, device or FIFO); name the config file itself")
    if st.st_size > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path} is {st.st_size} bytes, more than a config holds ({CONFIG_MAX_BYTES}); name the "
                          "config file itself")
    try:
        return path.read_text(encoding="utf-8")
    except PermissionError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); fix its permissions or save it as UTF-8") from None


def _parse_toml(path: Path, text: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10, which a workstation may still run
        raise ConfigError(f"{path}: TOML needs Python 3.11+; use YAML instead") from None

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax there") from None
    except RecursionError:  # brackets nested thousands deep: no config looks like that
        raise ConfigError(f"{path}: not valid TOML (nested too deeply); fix the syntax there") from None
    except ValueError as exc:  # an integer of thousands of digits (Python's int_max_str_digits)
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the value there") from None


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML ({first}); fix the syntax there") from None
    except RecursionError:  # brackets nested thousands deep: no config looks like that
        raise ConfigError(f"{path}: not valid YAML (nested too deeply); fix the syntax there") from None
    except ValueError as exc:  # an integer of thousands of digits (Python's int_max_str_digits)
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the value there") from None


def _read_file(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    data = _parse_toml(path, text) if path.suffix.lower() == ".toml" else _parse_yaml(path, text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _env_bool(value: Any) -> Any:
    # systemd Environment= lines are often written `FACEBERRY_MQTT_TLS=` to switch a thing off.
    return value.strip() or False if isinstance(value, str) else value


_EnvBool = Annotated[bool | None, BeforeValidator(_env_bool)]


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source reading a given mapping (config_from_dict's `env`), so a test
    or `check` can pass the environment it means instead of the process's."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key: value for key, value in self._environ.items() if key.startswith(ENV_PREFIX)}


class EnvOverrides(BaseSettings):
    """The FACEBERRY_* environment variables that override the config file, typed by pydantic-settings.

    Each field is (section path, key) in the config; an unset variable leaves the file's value alone.
    Names are exact (case-sensitive), as in a systemd unit's Environment= lines."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", env_ignore_empty=False)

    mqtt_host: str | None = Field(None, validation_alias="FACEBERRY_MQTT_HOST")
    mqtt_port: int | None = Field(None, validation_alias="FACEBERRY_MQTT_PORT")
    mqtt_username: str | None = Field(None, validation_alias="FACEBERRY_MQTT_USERNAME")
    mqtt_password_file: str | None = Field(None, validation_alias="FACEBERRY_MQTT_PASSWORD_FILE")
    mqtt_client_id: str | None = Field(None, validation_alias="FACEBERRY_MQTT_CLIENT_ID")
    mqtt_tls_enabled: _EnvBool = Field(None, validation_alias="FACEBERRY_MQTT_TLS")
    mqtt_tls_ca: str | None = Field(None, validation_alias="FACEBERRY_MQTT_TLS_CA")
    mqtt_tls_cert: str | None = Field(None, validation_alias="FACEBERRY_MQTT_TLS_CERT")
    mqtt_tls_key: str | None = Field(None, validation_alias="FACEBERRY_MQTT_TLS_KEY")
    mqtt_tls_insecure: _EnvBool = Field(None, validation_alias="FACEBERRY_MQTT_TLS_INSECURE")
    device_id: str | None = Field(None, validation_alias="FACEBERRY_DEVICE_ID")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, **_: Any) -> tuple:
        # Only what from_environ hands over: never the process's own environment behind the caller's back,
        # nor a .env file or a secrets folder.
        return (init_settings,)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> EnvOverrides:
        """The overrides set in `environ`; ConfigError naming the variable and what it must be."""
        try:
            return cls(**_EnvironSource(cls, environ)())
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0])
            what = "must be an integer" if error["type"].startswith("int") else "must be true or false"
            raise ConfigError(f"environment variable {name}={environ.get(name)!r} {what}") from None

    def apply(self, data: dict[str, Any]) -> None:
        """Write the variables that are set into the config file's parsed `data` (before validation)."""
        mqtt = data.setdefault("mqtt", {})
        if not isinstance(mqtt, dict):
            return  # validation names the broken mqtt section; nothing to override in it
        tls = mqtt.setdefault("tls", {}) if isinstance(mqtt.get("tls", {}), dict) else {}
        sections = {"mqtt_tls_": tls, "mqtt_": mqtt, "": data}
        for field, value in self.model_dump(exclude_unset=True).items():
            # The field name is the key's path: mqtt_tls_ca → mqtt.tls.ca (the longest section prefix wins).
            prefix = next(p for p in sections if field.startswith(p))
            sections[prefix][field[len(prefix):]] = value


def read_secret(path: Path, what: str) -> tuple[str, int]:
    """The text of a small regular file holding a secret, and its mode; ConfigError naming `what` if not.

    Bounded: a device (/dev/zero, /dev/stdin), a FIFO or a directory is refused before it is opened, and at
    most SECRET_MAX_BYTES are read, so a wrong path can never hang `check` or `run`.
    """
    fix = "create it (mode 0600) or fix the path"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or exc}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file (a device, FIFO or directory); put the password "
                          "on the first line of a plain file (mode 0600) and name that file") from None
    if st.st_size > SECRET_MAX_BYTES:
        raise ConfigError(f"{what} {path} is {st.st_size} bytes, more than a password file holds "
                          f"({SECRET_MAX_BYTES}); name the file holding only the password") from None
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the stat, open() still returns.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(SECRET_MAX_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{what} {path} cannot be read ({reason}); {fix}") from None
    if len(data) > SECRET_MAX_BYTES:
        raise ConfigError(f"{what} {path} holds more than {SECRET_MAX_BYTES} bytes; name the file holding only "
                          "the password") from None
    return text, st.st_mode


def _url_password(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).password
    except ValueError:
        return None


def _read_camera_password(cfg: Config, camera: CameraConfig, env: dict[str, str]) -> str | None:
    """camera.password_file, or $CREDENTIALS_DIRECTORY/camera_password, for an RTSP camera."""
    if camera.source != "rtsp":
        return None
    directory = env.get("CREDENTIALS_DIRECTORY")
    if camera.password_file:
        path = Path(camera.password_file)
        text, mode = read_secret(path, "camera.password_file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            cfg.warnings.append(f"camera.password_file {path} is readable by other users (mode "
                                f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    elif directory and os.path.lexists(Path(directory) / CAMERA_CREDENTIAL_NAME):
        text, _ = read_secret(Path(directory) / CAMERA_CREDENTIAL_NAME, "systemd credential")
    else:
        return None
    lines = text.splitlines()
    return lines[0] if lines and lines[0] else None


def _read_password(cfg: Config, env: dict[str, str]) -> str | None:
    if cfg.mqtt.password_file:
        path = Path(cfg.mqtt.password_file)
        text, mode = read_secret(path, "mqtt.password_file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # A warning, not a refusal: the password still works, and an upgrade must not stop a running
            # install over it; the fix is one command.
            cfg.warnings.append(
                f"mqtt.password_file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {path}")
    elif env.get("CREDENTIALS_DIRECTORY") and os.path.lexists(Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME):
        text, _ = read_secret(Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME, "systemd credential")
    else:
        return None
    lines = text.splitlines()
    # An empty credential file means "no password": the installer creates one so the unit starts.
    return lines[0] if lines and lines[0] else None


def _identity_warnings(cfg: Config) -> list[str]:
    device_id = cfg.device_id
    if device_id == EXAMPLE_DEVICE_ID:
        why = "is the example's"
    elif device_id.lower() in STOCK_HOSTNAMES:
        why = "is a stock hostname"
    else:
        return []
    return [f"device_id {device_id!r} {why}: two Pis with the same device_id knock each other off the broker "
            "and share topics; set device_id (or FACEBERRY_DEVICE_ID) to a name unique to this Pi"]


def _size_warnings(cfg: Config) -> list[str]:
    """A min_face_size no face in a live camera's frames can reach: every frame would come out empty."""
    warnings = []
    for camera in cfg.all_cameras:
        device = camera.device
        live = camera.source == "picamera2" or (
            camera.source == "opencv" and (isinstance(device, int) or str(device).startswith("/dev/")))
        smallest = min(camera.width, camera.height)
        if not live or cfg.detection.min_face_size < smallest:
            continue
        which = f"camera {camera.name}'s" if cfg.cameras else "camera's"
        warnings.append(f"detection.min_face_size {cfg.detection.min_face_size} is not below the {which} "
                        f"{camera.width}×{camera.height} frames: no face can ever be found; set it below {smallest} "
                        "(40 suits a door camera)")
    return warnings


def config_from_dict(
    data: dict[str, Any], base_dir: str | Path = ".", env: dict[str, str] | None = None, source: str = "<dict>"
) -> Config:
    """Build and validate a Config from parsed data (what load_config does after reading the file)."""
    env = dict(os.environ) if env is None else env
    data = copy.deepcopy(data)
    try:
        EnvOverrides.from_environ(env).apply(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        cfg = Config.model_validate(data, context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        problems = _problems(exc, source)
        raise ConfigError("\n".join(problems), problems) from None
    cfg.source = source
    try:
        cfg.mqtt_password = _read_password(cfg, env)
        for camera in cfg.all_cameras:
            camera.password = _read_camera_password(cfg, camera, env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    cfg.warnings.extend(_identity_warnings(cfg))
    cfg.warnings.extend(_size_warnings(cfg))
    for camera in cfg.all_cameras:
        if camera.source == "opencv" and isinstance(camera.device, str) and _url_password(camera.device):
            cfg.warnings.append("camera.device holds a password in its URL (anyone who reads the config sees it); "
                                "for an RTSP camera use camera.source: rtsp with the password in "
                                "camera.password_file")
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None, log_warnings: bool = True) -> Config:
    """Read, type-check and validate a YAML (.yaml/.yml) or TOML (.toml) config; raises ConfigError.

    Warnings (cfg.warnings) are logged unless `log_warnings` is false (`check` prints them itself).
    """
    path = Path(path)
    cfg = config_from_dict(_read_file(path), base_dir=path.resolve().parent, env=env, source=str(path))
    if log_warnings:
        for warning in cfg.warnings:
            log.warning("%s: %s", path, warning)
    return cfg


def special_state_dir(path: Path) -> str | None:
    """Why `path` can never be a state_dir (a kernel file system, or an existing non-directory), else None.

    Only what is true for every user; whether this user can create files there is `check`'s question.
    """
    real = Path(os.path.realpath(path))
    for root in _SPECIAL_ROOTS:
        if real == root or root in real.parents:
            return (f"{path} is on the kernel's {root} file system, not storage; use a directory on disk such as "
                    f"{DEFAULT_STATE_DIR}")
    if os.path.lexists(real) and not os.path.isdir(real):
        return f"{path} exists and is not a directory; use a directory such as {DEFAULT_STATE_DIR}"
    return None


def numeric_bounds(info: FieldInfo) -> tuple[tuple[float, bool] | None, tuple[float, bool] | None]:
    """A numeric field's (low, closed) and (high, closed) bounds from its pydantic constraints (None: unbounded)."""
    low = high = None
    for item in info.metadata:
        for attr, closed in (("ge", True), ("gt", False)):
            if getattr(item, attr, None) is not None:
                low = (getattr(item, attr), closed)
        for attr, closed in (("le", True), ("lt", False)):
            if getattr(item, attr, None) is not None:
                high = (getattr(item, attr), closed)
    return low, high


def numeric_range(info: FieldInfo) -> str | None:
    """A numeric field's accepted range in interval notation ("[1, 100]", "(0, 3600]"), else None."""
    low, high = numeric_bounds(info)
    if low is None or high is None:
        return None

    def num(value: float) -> str:
        return f"{value:g}" if isinstance(value, float) and not value.is_integer() else str(int(value))

    return f"{'[' if low[1] else '('}{num(low[0])}, {num(high[0])}{']' if high[1] else ')'}"


def numeric_fields(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, FieldInfo]:
    """Every int or float field of the config, by its dotted key ("tracking.votes_needed")."""
    out: dict[str, FieldInfo] = {}
    for name, info in (model or Config).model_fields.items():
        inner = _unwrap(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out.update(numeric_fields(inner, f"{prefix}{name}."))
        elif inner in (int, float) and inner is not bool:
            out[f"{prefix}{name}"] = info
    return out


def describe(cfg: Config) -> str:
    """One line for logs and `check`: what this config will do (no secrets)."""
    auth = f"user {cfg.mqtt.username}" if cfg.mqtt.username else "anonymous"
    if cfg.mqtt_password:
        auth += " with password"
    tls = " tls" if cfg.mqtt.tls.enabled else ""
    if cfg.cameras:
        cameras = "cameras " + ", ".join(f"{c.name}={c.source}:{_redacted(c.device)}" for c in cfg.cameras)
    else:
        cameras = f"camera {cfg.camera.source}:{_redacted(cfg.camera.device)}"
    return (
        f"device {cfg.device_id}, {cameras}, bundle {cfg.bundle}, "
        f"broker {cfg.mqtt.host}:{cfg.mqtt.port}{tls} ({auth}), state {cfg.state_dir}"
    )


def _redacted(device: int | str) -> int | str:
    """A camera URL without its password, for logs."""
    if isinstance(device, str) and _url_password(device) is not None:
        parts = urllib.parse.urlsplit(device)
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return device


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The --config flag shared by `run` and `check`, so both read the same file by default."""
    parser.add_argument(
        "--config", default=os.environ.get("FACEBERRY_CONFIG", DEFAULT_CONFIG),
        help=f"YAML or TOML config file (default: $FACEBERRY_CONFIG or {DEFAULT_CONFIG})",
    )
