"""`python -m device check`: is this Pi ready to run? Config, bundle, each camera and broker, each OK or why."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from typing import TextIO

from faceberry.device.config import (
    DEFAULT_STATE_DIR,
    CameraConfig,
    Config,
    ConfigError,
    add_config_argument,
    describe,
    load_config,
)
from faceberry.errors import EXIT_FAILURE, EXIT_OK, permission_message

HELP = "check the config, the bundle, every camera and the broker, each OK or a clear reason"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for the first camera frame and for the broker (default 5)")
    parser.add_argument("--skip", action="append", default=[], choices=("bundle", "camera", "broker"),
                        help="skip one check (repeatable), e.g. --skip camera on a workstation")


def _can_create_files_in(path: str) -> str | None:
    """Why this user cannot create a file in the existing directory `path`, else None (tried, not guessed)."""
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".faceberry-check-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def state_dir_problem(cfg: Config) -> tuple[str | None, str | None]:
    """(a problem `run` would stop on, a warning) for cfg.state_dir, as this user, creating nothing there.

    `run` creates the directory (with its parents) and keeps its outbox and status file in it; the
    default /var/lib/faceberry, when this user cannot write it (a shell, not the unit), is swapped for
    ~/.local/state/faceberry with a warning, as device/service.py does.
    """
    configured = str(cfg.state_dir)
    fix = ("create it for the service user (the systemd unit's StateDirectory= does) or set state_dir to a "
           "directory it can write")
    if os.path.isdir(configured):
        reason = _can_create_files_in(configured)
    else:
        # The nearest existing ancestor must let us make the rest.
        parent = os.path.dirname(os.path.abspath(configured))
        while parent != os.path.dirname(parent) and not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            reason = f"{parent} is not a directory"
        else:
            reason = None if os.access(parent, os.W_OK | os.X_OK) else f"cannot create directories in {parent}"
    if reason is None:
        return None, None
    if cfg.state_dir == DEFAULT_STATE_DIR:
        from faceberry.device.messaging.outbox import default_state_dir

        fallback = default_state_dir()
        return None, (f"state_dir {configured} is not writable by this user ({reason}): `run` as this user keeps "
                      f"its outbox in {fallback} instead; run it as the service user (or set state_dir)")
    return f"state_dir {configured}: this user cannot create files there ({reason}); {fix}", None


def check_bundle(cfg: Config) -> str:
    from faceberry.bundle import load_bundle, people_of
    from faceberry.device.recognition.pipeline import FacePipeline

    bundle = load_bundle(cfg.bundle)  # verifies every checksum
    # The models load and fit, and someone is enrolled (FacePipeline refuses what `run` would never use).
    FacePipeline(bundle, num_threads=1, min_face_size=cfg.detection.min_face_size)
    people = people_of(bundle)
    return (f"{bundle.bundle_id}: {bundle.kind} {bundle.manifest['classifier'].get('quantization', '?')}, "
            f"{len(people)} people, threshold {cfg.recognition.threshold or bundle.accept_threshold:.3f}")


def check_camera(camera: CameraConfig | Config, timeout: float) -> str:
    """One camera: a frame within `timeout`, or why not. Given a whole Config, its (first) camera."""
    from faceberry.device.capture.camera import CameraError, CameraSetupError, Capture, open_source

    if isinstance(camera, Config):
        camera = camera.camera

    # One attempt, unsupervised: a check says why the camera cannot be opened now instead of waiting for it.
    capture = Capture(open_source(camera), queue_size=1, drop_oldest=True, supervise=False)
    try:
        capture.start()
    except CameraSetupError:
        raise  # the library is missing: nothing to do with who holds the camera
    except CameraError as exc:
        if camera.source in ("folder", "rtsp"):  # an RTSP camera serves several clients at once
            raise
        # A camera has one user: the running service holds it, so a check beside it cannot open it.
        raise CameraError(f"{exc} (if faceberry.service is running it holds the camera: stop it first)") from exc
    try:
        frame = capture.get(timeout=timeout)
    except TimeoutError:
        return f"FAIL:no frame from {capture.source.name} within {timeout:g}s"
    finally:
        capture.stop()
    if frame is None:
        return f"FAIL:{capture.source.name} delivered no readable frame"
    h, w = frame.image.shape[:2]
    return f"{capture.source.name}: got a {w}×{h} frame"


def check_broker(cfg: Config, timeout: float) -> str:
    from faceberry.device.messaging.mqtt import probe

    reason = probe(cfg.mqtt, f"faceberry-{cfg.device_id}-check", cfg.mqtt_password, timeout=timeout)
    if reason:
        return "FAIL:" + reason
    return f"connected to {cfg.mqtt.host}:{cfg.mqtt.port}"


def _steps(cfg: Config, timeout: float) -> list[tuple[str, Callable[[], str], str]]:
    """(check, what it runs, the prefix of its line) in the order they are reported."""
    steps: list[tuple[str, Callable[[], str], str]] = [("bundle", lambda: check_bundle(cfg), "")]
    # Every camera `run` would read, each on its own line: in `run` a camera that fails stops only
    # itself, so a check that looked at the first alone would hide the state of the others.
    for camera in cfg.all_cameras:
        steps.append(("camera", lambda camera=camera: check_camera(camera, timeout),
                      f"{camera.name}: " if cfg.cameras else ""))
    steps.append(("broker", lambda: check_broker(cfg, timeout), ""))
    return steps


def _outcome(fn: Callable[[], str], prefix: str) -> str:
    """What one check says ("FAIL:<reason>" when it failed), its line's prefix put before the text."""
    try:
        detail = fn()
    except PermissionError as exc:
        detail = "FAIL:" + permission_message(exc)
    except Exception as exc:  # every failure is reported, then the next check runs
        detail = "FAIL:" + (" ".join(str(exc).split()) or type(exc).__name__)
    if detail.startswith("FAIL:"):
        return f"FAIL:{prefix}{detail[5:]}"
    return prefix + detail


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    failures = 0

    def report(name: str, fn: Callable[[], str], prefix: str = "") -> None:
        nonlocal failures
        detail = _outcome(fn, prefix)
        if detail.startswith("FAIL:"):
            failures += 1
            out.write(f"{name:<7} FAIL  {detail[5:]}\n")
        else:
            out.write(f"{name:<7} OK    {detail}\n")
        out.flush()

    try:
        # Warnings are printed below with the report rather than logged, so they are read in context.
        cfg = load_config(args.config, log_warnings=False)
    except ConfigError as exc:
        # Every problem of the file at once, one per line, so one edit can fix them all.
        first, *rest = exc.problems
        out.write(f"{'config':<7} FAIL  {first}\n")
        for line in rest:
            out.write(f"{'':<7} FAIL  {line}\n")
        out.write("bundle, camera and broker not checked: fix the config first\n")
        return EXIT_FAILURE
    except PermissionError as exc:
        out.write(f"{'config':<7} FAIL  {permission_message(exc)}\n")
        out.write("bundle, camera and broker not checked: fix the config first\n")
        return EXIT_FAILURE
    except Exception as exc:  # not expected, but check must still say what it could not do
        out.write(f"{'config':<7} FAIL  {type(exc).__name__}: {exc}\n")
        out.write("bundle, camera and broker not checked: fix the config first\n")
        return EXIT_FAILURE
    try:
        problem, warning = state_dir_problem(cfg)
    except OSError as exc:  # not expected: the probe itself failed
        problem, warning = f"state_dir {cfg.state_dir} cannot be checked ({exc})", None
    if problem:
        # `run` stops on it, but the bundle, camera and broker can still be checked meanwhile.
        failures += 1
        out.write(f"{'config':<7} FAIL  {cfg.source}: {problem}\n")
    else:
        out.write(f"{'config':<7} OK    {describe(cfg)}\n")
    if warning:
        cfg.warnings.append(warning)
    for warning in cfg.warnings:
        out.write(f"{'':<7} WARN  {warning}\n")
    out.flush()
    skipped: set[str] = set()
    for name, fn, prefix in _steps(cfg, args.timeout):
        if name in args.skip:
            if name not in skipped:
                out.write(f"{name:<7} SKIP\n")
            skipped.add(name)
        else:
            report(name, fn, prefix)
    return EXIT_FAILURE if failures else EXIT_OK
