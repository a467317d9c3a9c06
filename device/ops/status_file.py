"""The status file, `<state_dir>/status-<device_id>.json`: the daemon's on-disk account of itself.

The frame loop writes it (device/loop.py: at start, at the first frame, every few seconds, after a reload and at
the stop); `faceberry status` and `faceberry deploy`'s reload read it. One typed contract for both sides: the
writer builds a StatusFile, so a field it forgets or misspells fails at once, and a reader gets a file it can
trust or None, never half a dict. Sections whose contents belong to another module's stats (the MQTT
publisher's, the face and stranger memory's, the per-stage timings) are kept as they are, as JSON objects.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CameraState(_Strict):
    """A camera's supervision (or all cameras' together): `ok`, `out` while an outage lasts, `failed` for good."""

    state: str
    outages: int = Field(ge=0)
    outage_s: float = Field(ge=0)
    reason: str | None = None


class BundleCounts(_Strict):
    id: str | None
    reloads: int = Field(ge=0)
    refused: int = Field(ge=0)


class LastReload(_Strict):
    ok: bool
    bundle_id: str | None = None
    path: str | None = None
    error: str | None = None
    at: str


class StatusFile(_Strict):
    """What the running (or last) daemon wrote about itself."""

    device_id: str
    pid: int
    running: bool
    status: str = Field(description="the one-line summary the stats log line ends with")
    updated_at: str = Field(description="UTC, ISO 8601 with milliseconds")
    bundle_id: str | None
    bundle_path: str | None
    mqtt_state: str
    fps: float = Field(ge=0)
    frames: int = Field(ge=0)
    captured: int = Field(ge=0)
    dropped: int = Field(ge=0)
    skipped_images: int = Field(ge=0)
    faces: int = Field(ge=0)
    events: int = Field(ge=0)
    suppressed: int = Field(ge=0, description="events held back by the cooldown")
    tracks: int = Field(ge=0)
    camera: CameraState
    cameras: dict[str, dict[str, Any]] = Field(description="per camera: state, fps, frames, captured, dropped, "
                                                           "outages (device/capture/cameras.py)")
    bundle: BundleCounts
    ms_per_frame: dict[str, float]
    ms_per_face: dict[str, float]
    mqtt: dict[str, Any] = Field(description="the MQTT publisher's stats (device/messaging/mqtt.py)")
    memory: dict[str, Any] | None = Field(None, description="face and stranger memory, when something is kept")
    last_reload: LastReload | None = None

    def dump(self) -> str:
        # Nulls are written (a reader tells "no error" from a file cut short), as the daemon always did.
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True) + "\n"


def read_status(path: Path) -> StatusFile | None:
    """The status file at `path`, checked; None when it is missing, unreadable or not a faceberry status file
    (one debug line says which: a reader goes on to the next file)."""
    status, problem = check_status(path)
    if problem is not None:
        log.debug("status file %s: %s", path, problem)
    return status


def check_status(path: Path) -> tuple[StatusFile | None, str | None]:
    """(the status file, None), or (None, what is wrong with it, in words a user can act on)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, "not text: damaged; the daemon writes it again within seconds of its next start"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc}); run it with sudo if the file is the service user's"
    try:
        return StatusFile.model_validate_json(raw), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(the file)"
        return None, (f"not one this faceberry writes ({where}: {first['msg']}): damaged, or written by another "
                      "faceberry version; the daemon writes it again within seconds of its next start")
