"""The one `faceberry` command line: every command in one tree, one error handler, logging set up once.

    faceberry [--log-level L] run|check|status|eval|enroll|deploy|rollback …   the Pi's commands
    faceberry fleet status …                                                  every device on a broker
    faceberry train [backbone|cohort] …                                       the workstation's (TensorFlow)
    faceberry convert …
    faceberry models fetch

`python -m device|train|convert|models` and `faceberry-train|faceberry-convert` are the same tree entered at
another node (`python -m train backbone` is `faceberry train backbone`). Each command is a module exposing
add_arguments(parser) and run(args) -> int, and optionally validate(parser, args) for checks that end in the
parser's usage error. Only the modules on the chosen command's path are imported, so `faceberry run` on a Pi
never imports what `faceberry train` needs; a workstation command whose dependencies are missing says so in
one line before anything is imported.

Errors: anything derived from faceberry.errors.FaceberryError is printed here, once, as `error: <message>` on
stderr, and the process exits with the error's exit_code (faceberry/errors.py lists them); a PermissionError
says to use sudo; a third-party module missing names the module and the fix; anything else is one line and
exit 1, with the traceback at --log-level DEBUG.

Only the standard library and faceberry's stdlib-only modules are imported here: `python -m device` must
still print its one-line error where numpy or OpenCV are missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

from faceberry.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    FaceberryError,
    UsageError,
    exit_code_for,
    permission_message,
)
from faceberry.startup import (
    DEVICE_NEEDS,
    WORKSTATION_NEEDS,
    guard,
    missing_message,
    missing_module,
    quiet_third_party,
    wants_debug,
)

log = logging.getLogger(__name__)

CommandPath = tuple[str, ...]


@dataclass(frozen=True)
class Command:
    """One node of the tree: the module that implements it (None: a group of subcommands) and its help line."""

    module: str | None
    help: str
    # A workstation command needs TensorFlow, logs bare messages (a progress report, not a daemon's log) and,
    # where its dependencies are missing, says it runs on the workstation rather than how to fix a Pi.
    workstation: bool = False


ROOT: CommandPath = ()
# The whole command line, in the order `--help` lists it. A node's children are the paths one longer.
TREE: dict[CommandPath, Command] = {
    ROOT: Command(None, "faceberry: recognise faces from a camera and publish them over MQTT (on the Pi); train "
                  "and convert the models that do it (on the workstation)."),
    ("run",): Command("faceberry.device.service", "run the daemon: watch the camera and publish who it sees over MQTT"),
    ("check",): Command("faceberry.device.ops.check",
                        "check the config, the bundle, every camera and the broker, each OK or a "
                        "clear reason"),
    ("status",): Command("faceberry.device.ops.status_cmd",
                         "show the running daemon (bundle, fps, MQTT, reloads) and the bundle "
                         "versions in the store"),
    ("eval",): Command("faceberry.device.recognition.evaluate",
                       "measure a bundle's accuracy and per-stage speed on a labelled folder of "
                       "photos"),
    ("enroll",): Command("faceberry.device.recognition.enroll",
                         "add a person to an embedding bundle's gallery from a folder of their "
                         "photos (no retraining)"),
    ("deploy",): Command("faceberry.device.ops.deploy",
                         "install a bundle as a new version of the Pi's store, switch to it and "
                         "reload the daemon (or --host)"),
    ("rollback",): Command("faceberry.device.ops.rollback",
                           "switch the Pi's bundle back to the version that was current before, "
                           "and reload the daemon"),
    ("fleet",): Command(None, "every device at once: `fleet status` (deploy and rollback take several --host)"),
    ("fleet", "status"): Command("faceberry.device.ops.fleet",
                                 "every device on a broker: online, bundle, library, cameras and last "
                                 "event, from their retained topics"),
    ("sightings",): Command("faceberry.device.ops.sightings",
                            "log every event from MQTT into SQLite or PostgreSQL; daily summary "
                            "per person; CSV export"),
    ("train",): Command("faceberry.train.cli", "workstation: train a face classifier from photos/<person>/ folders "
                        "(a gallery on a backbone, or a fine-tuned MobileNetV2)", workstation=True),
    ("train", "backbone"): Command("faceberry.train.backbone", "build a face-aware backbone for `train --backbone`",
                                   workstation=True),
    ("train", "cohort"): Command("faceberry.train.cohort",
                                 "embed a stranger cohort beside a backbone (calibrates `unknown`)",
                                 workstation=True),
    ("convert",): Command("faceberry.convert.cli",
                          "workstation: quantise a training run to TFLite, check it against the "
                          "float model and write a bundle", workstation=True),
    ("models",): Command(None, "obtain the models faceberry does not build itself"),
    ("models", "fetch"): Command("faceberry.models.fetch", "download the BlazeFace face detector (from the mediapipe "
                                 "0.10.21 wheel)"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The namespace key the tree keeps the chosen command's path under (taken out before run() sees args).
_PATH = "_faceberry_path"
_OURS = ("device", "train", "convert", "models", "bench")


def _children(path: CommandPath) -> list[CommandPath]:
    return [p for p in TREE if len(p) == len(path) + 1 and p[: len(path)] == path]


def _add_log_level(parser: argparse.ArgumentParser, default: str | None) -> None:
    # One option, on every node of the path: `faceberry --log-level DEBUG run` and `faceberry run --log-level
    # DEBUG` alike; below the entry node its default is SUPPRESS so it does not undo the one given above.
    parser.add_argument(
        "--log-level", default=default, type=str.upper, choices=LOG_LEVELS,
        help="how much to log to stderr: DEBUG, INFO, WARNING or ERROR (default: $FACEBERRY_LOG_LEVEL, else INFO; "
        "WARNING with -q where a command has it); DEBUG also shows TensorFlow's and LiteRT's start-up lines",
    )


def _load(path: CommandPath, prog: str) -> ModuleType:
    """The module of `path`, imported only after checking that it and what it needs are installed."""
    command = TREE[path]
    assert command.module is not None
    if command.workstation:
        missing = missing_module(WORKSTATION_NEEDS)
        if missing:
            raise UsageError(missing_message(prog, missing, workstation=True))
    try:
        found = importlib.util.find_spec(command.module)
    except ModuleNotFoundError:  # its package is not there at all
        found = None
    if found is None:
        raise UsageError(f"{prog} is not available in this installation ({command.module} is missing); "
                         "update faceberry")
    return importlib.import_module(command.module)


@dataclass
class _Built:
    """What one build made in full: each node's parser and, for a command (not a group), its module."""

    parsers: dict[CommandPath, argparse.ArgumentParser] = field(default_factory=dict)
    modules: dict[CommandPath, ModuleType] = field(default_factory=dict)


def _build(chosen: CommandPath, at: CommandPath, prog: str) -> tuple[argparse.ArgumentParser, _Built]:
    """The parser entered at node `at`; the nodes on `chosen` are built in full, the others are placeholders
    (their name and help line, no import), so only the chosen command's modules are loaded."""
    built = _Built()
    top = argparse.ArgumentParser(prog=prog, description=TREE[at].help)

    def fill(parser: argparse.ArgumentParser, path: CommandPath) -> None:
        parser.set_defaults(**{_PATH: path})
        _add_log_level(parser, None if path == at else argparse.SUPPRESS)
        command = TREE[path]
        if command.module is not None:
            module = _load(path, parser.prog)
            module.add_arguments(parser)
            # A command with actions of its own (`sightings run|summary|export`) takes --log-level after them too.
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for own in dict.fromkeys(action.choices.values()):
                        _add_log_level(own, argparse.SUPPRESS)
            built.modules[path] = module
        built.parsers[path] = parser
        children = _children(path)
        if not children:
            return
        if command.module is None:
            parser.epilog = parser.epilog or f"Run `{parser.prog} COMMAND --help` for a command's options."
        sub = parser.add_subparsers(title="commands", metavar="COMMAND")
        for child in children:
            if chosen[: len(child)] == child:
                fill(sub.add_parser(child[-1], help=TREE[child].help, description=TREE[child].help), child)
            else:
                # A placeholder: it takes whatever follows, so that main() can tell which command was meant
                # and build that one in full.
                stub = sub.add_parser(child[-1], help=TREE[child].help, add_help=False)
                stub.set_defaults(**{_PATH: child})

    fill(top, at)
    return top, built


def _guess(argv: Sequence[str], at: CommandPath) -> CommandPath:
    """The command path argv names, read the way users write it (`train backbone --out X`); a guess that is
    wrong only costs main() a second parse."""
    path, words = at, list(argv)
    while words:
        word = words.pop(0)
        if word == "--log-level":
            words = words[1:]
            continue
        if word.startswith("-"):
            if path != at:
                break  # the command's own options: its subcommand, if any, came first
            continue
        if (*path, word) not in TREE:
            break
        path = (*path, word)
    return path


def build_parser(path: CommandPath = ROOT, *, at: CommandPath = ROOT,
                 prog: str = "faceberry") -> argparse.ArgumentParser:
    """The parser of node `path` as the tree builds it, entered at `at` under the name `prog`."""
    _, built = _build(path, at, prog)
    return built.parsers[path]


def _parse(argv: list[str], at: CommandPath, prog: str) -> tuple[argparse.Namespace, CommandPath, _Built]:
    chosen = _guess(argv, at)
    top, built = _build(chosen, at, prog)
    ns, extras = top.parse_known_args(argv)
    path = getattr(ns, _PATH)
    if path not in built.parsers:  # a command the guess missed: build it in full and parse again
        top, built = _build(path, at, prog)
        ns, extras = top.parse_known_args(argv)
        path = getattr(ns, _PATH)
    if extras:
        top.error(f"unrecognized arguments: {' '.join(extras)}")
    return ns, path, built


def _own_args(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Only the chosen command's options (and --log-level): a subcommand does not see its parent's defaults
    (`train backbone` writes its arguments into the backbone's config.json)."""
    def owned(p: argparse.ArgumentParser) -> set[str]:
        found = {a.dest for a in p._actions if a.dest != argparse.SUPPRESS} | set(p._defaults)
        for action in p._actions:  # a command's own actions (`sightings run`): their options are the command's
            if isinstance(action, argparse._SubParsersAction):
                for own in action.choices.values():
                    found |= owned(own)
        return found

    dests = owned(parser)
    dests.add("log_level")
    dests.discard(_PATH)
    return argparse.Namespace(**{k: v for k, v in vars(ns).items() if k in dests})


def log_level(args: argparse.Namespace, workstation: bool) -> str:
    """--log-level, else -q's WARNING (a workstation command's quiet is its logs'), else $FACEBERRY_LOG_LEVEL,
    else INFO."""
    if getattr(args, "log_level", None):
        return args.log_level
    if workstation and getattr(args, "quiet", False):
        return "WARNING"
    env = os.environ.get("FACEBERRY_LOG_LEVEL", "").strip()
    if not env:
        return "INFO"
    if env.upper() not in LOG_LEVELS:
        raise UsageError(f"FACEBERRY_LOG_LEVEL={env!r} is not a log level; set it to one of {', '.join(LOG_LEVELS)} "
                         "or unset it")
    return env.upper()


def setup_logging(level: str, plain: bool = False, force: bool = True) -> None:
    """The one logging set-up of every command: stderr, at `level`.

    The Pi's commands stamp each line with the time, level and logger, except under systemd, whose journal
    stamps every line itself; a workstation command prints bare messages (its progress report). With
    force=False (faceberry called from Python: a test, a script) a logging set-up already there is kept.
    """
    if plain:
        fmt = "%(message)s"
    elif os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=force)
    if force:  # third-party loggers too are the caller's business when faceberry is called from Python
        quiet_third_party(level == "DEBUG", filter_stderr=False)


def _error(message: str, code: int) -> int:
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    return code


def main(argv: Sequence[str] | None = None, *, prog: str = "faceberry", at: CommandPath = ROOT) -> int:
    """Parse argv at node `at` of the tree, run the command, and turn what it raises into one line and an
    exit code. argv None: this is the process's command line, whose logging is ours to set up; argv given
    (a test, a script), a logging set-up the caller made is kept."""
    embedded = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _guess(argv, at)  # until parsed: for the messages of a failure while the parser is built
    try:
        ns, path, built = _parse(argv, at, prog)
        parser = built.parsers[path]
        module = built.modules.get(path)
        if module is None:  # a group (`faceberry`, `faceberry models`) without its command
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        command = TREE[path]
        args = _own_args(ns, parser)
        setup_logging(log_level(args, command.workstation), plain=command.workstation, force=not embedded)
        # A database or camera URL may carry a password: never into the log.
        shown = re.sub(r"(://[^:/@\s']+:)[^@\s']+@", r"\1***@", str(args))
        log.debug("%s: %s", " ".join((prog, *path[len(at):])), shown)
        validate = getattr(module, "validate", None)
        if validate is not None:
            validate(parser, args)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except PermissionError as exc:
        # The installed files belong to root and the service user: the fix is the same for every command.
        return _error(permission_message(exc), EXIT_USAGE)
    except FaceberryError as exc:  # ours: the message names the problem and the fix, the class the exit code
        return _error(str(exc), exit_code_for(exc))
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top and top not in _OURS:  # e.g. paho for `run` in an environment built for eval only
            where = " ".join((prog, *path[len(at):]))
            return _error(missing_message(where, top, workstation=TREE[path].workstation), EXIT_USAGE)
        return _unexpected(exc, argv)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in _OURS:  # our own, not (yet) a FaceberryError: its message
            return _error(str(exc), exit_code_for(exc))
        return _unexpected(exc, argv)


def _unexpected(exc: Exception, argv: Sequence[str]) -> int:
    """A bug: one line, and at DEBUG its traceback (read from argv: it may have come before logging was set up)."""
    if wants_debug(argv):
        traceback.print_exception(exc)
    return _error(f"{type(exc).__name__}: {exc} (rerun with --log-level DEBUG for the traceback)", EXIT_FAILURE)


def entry(prog: str, at: CommandPath = ROOT, needs: Sequence[str] = DEVICE_NEEDS) -> int:
    """A process's start (`python -m …`, the console scripts): the dependency check and the start-up noise
    filter (faceberry.startup.guard), then main() on sys.argv."""
    if not guard(prog, needs, workstation=needs == WORKSTATION_NEEDS):
        return EXIT_USAGE
    return main(prog=prog, at=at)
