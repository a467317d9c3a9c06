"""`python -m device <command>`: run, check, eval, enroll, deploy, rollback, status, sightings.

Each command lives in its own module exposing HELP, add_arguments(parser) and run(args) -> int; only the
chosen command's module is imported (so `device run` never loads what `device eval` needs).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

log = logging.getLogger("device")

COMMANDS = {
    "run": "device.service",
    "check": "device.check",
    "eval": "device.evaluate",
    "enroll": "device.enroll",
    "deploy": "device.deploy",
    "rollback": "device.rollback",
    "status": "device.status_cmd",
    "sightings": "device.sightings",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == COMMANDS[name]:  # the command is not part of this installation
            return None
        raise


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level", default=default, type=str.upper, choices=LOG_LEVELS,
        help="how much to log to stderr: DEBUG, INFO, WARNING or ERROR (default: $FACEBERRY_LOG_LEVEL or INFO)",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    # The installed command (pyproject's [project.scripts]) is named as the user typed it.
    prog = "faceberry" if os.path.basename(sys.argv[0]) == "faceberry" else "python -m device"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="faceberry on the device: recognise faces from a camera and publish them over MQTT.",
        epilog=f"Run `{prog} COMMAND --help` for a command's options.",
    )
    _add_log_level(parser, os.environ.get("FACEBERRY_LOG_LEVEL", "INFO").upper())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        module = _load(name)
        if module is None:
            sub.add_parser(name, help="(not available in this installation)")
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        # Accepted after the command too (`device run --log-level DEBUG`) without overriding the top level.
        _add_log_level(cmd, argparse.SUPPRESS)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps every line itself.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)


def _error(message: str, code: int = 1) -> int:
    first = " ".join(str(message).split())
    sys.stderr.write(f"error: {first}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module = getattr(args, "_module", None)
    if module is None:
        return _error(f"the {args.command!r} command is not available in this installation; update faceberry")
    setup_logging(args.log_level)

    from device.bundle import BundleError
    from device.camera import CameraError
    from device.config import ConfigError
    from device.errors import EXIT_USAGE, FaceberryError, exit_code_for, permission_message
    from device.mqtt import MqttError
    from device.preprocess import ImageError
    from device.runtime import ModelError

    try:
        return int(module.run(args) or 0)
    except (ConfigError, BundleError, ModelError, CameraError, MqttError, ImageError) as exc:
        return _error(str(exc), exit_code_for(exc))
    except KeyboardInterrupt:
        return 130
    except PermissionError as exc:
        # The installed files belong to root and the service user: the fix is the same for every command.
        return _error(permission_message(exc), EXIT_USAGE)
    except Exception as exc:
        top = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
        if top and top not in ("device", "models"):  # e.g. paho for `run` in an environment built for eval only
            from device.startup import missing_message

            sys.stderr.write(missing_message("python -m device", top) + "\n")
            return 2
        if isinstance(exc, FaceberryError) or type(exc).__module__.startswith("device."):
            return _error(str(exc), exit_code_for(exc))  # our own errors carry their fix and their exit code
        log.debug("unexpected failure", exc_info=True)
        return _error(f"{type(exc).__name__}: {exc} (rerun with --log-level DEBUG for the traceback)")
