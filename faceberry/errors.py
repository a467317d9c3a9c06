"""One error base class and the exit codes of every faceberry command.

Every error faceberry raises on purpose derives from `FaceberryError`. Its message is one line that names
the problem and the fix ("<what went wrong>; <what to do>"). A command raises it and never prints it: the
one handler at the top of the command tree (faceberry.device.cli.main) prints `error: <message>` and exits with the
error's `exit_code`, never a traceback. Anything else reaching it is a bug, except a `PermissionError`,
which every command reports as one line saying to run it with sudo (`permission_message`).

Exit codes (the same for every command: `faceberry …`, `python -m device|train|convert|models …`):

    0  EXIT_OK           done; for `device check`: every check passed.
    1  EXIT_FAILURE      it ran and failed: a runtime failure (the MQTT client died, training diverged), or
                         `device check` found at least one problem.
    2  EXIT_USAGE        bad input or setup, permanent: the command line, the config file, a bundle that is
                         absent (no version deployed), damaged or has nobody enrolled, a run directory,
                         photos, a Python module or camera library the config needs that is not installed
                         (`source: picamera2` without picamera2), credentials the broker keeps refusing.
                         Retrying will not help; fix the input. (argparse uses 2 too.)
    3  EXIT_UNAVAILABLE  a service or device is unavailable right now: no camera, a camera out longer than
                         camera.max_outage_s, an unreachable broker. The input may be fine; retrying later
                         may work.
  130  EXIT_INTERRUPTED  stopped by Ctrl-C (128 + SIGINT, as shells report it).

Why 2 and 3 are separate: systemd keeps restarting on 1 and 3 (a broker or camera that comes back), while
the unit's RestartPreventExitStatus=2 stops a restart loop (reloading the models every 10 s) on a setup
that can never work: the unit shows "failed" with the one `error:` line in the journal.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class FaceberryError(RuntimeError):
    """An expected failure with a one-line message naming the problem and the fix.

    Subclasses set `exit_code` to say which kind of failure they are (see the module docstring).
    """

    exit_code: int = EXIT_FAILURE


class UsageError(FaceberryError):
    """Bad input (arguments, files, data): fix it and rerun."""

    exit_code = EXIT_USAGE


class UnavailableError(FaceberryError):
    """A dependency or service is not there right now: install it, start it, or retry later."""

    exit_code = EXIT_UNAVAILABLE


def exit_code_for(exc: BaseException) -> int:
    """The exit code a CLI should return for `exc` (EXIT_FAILURE for anything not ours)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return int(getattr(exc, "exit_code", EXIT_FAILURE)) if isinstance(exc, FaceberryError) else EXIT_FAILURE


def permission_message(exc: PermissionError) -> str:
    """One line for a file this user may not use: which file, what was tried, and the fix (sudo).

    The files of an installed faceberry belong to root and the service user (/etc/faceberry is 0750,
    /var/lib/faceberry 0750), so a command run as someone else meets this first.
    """
    import os

    name = exc.filename
    if name is None:
        return f"permission denied ({exc.strerror or exc}): run it with sudo"
    path = os.fsdecode(name)
    try:
        os.lstat(path)
    except PermissionError:  # a directory above it is closed to this user: it was being read
        doing = "reading"
    except OSError:
        doing = "creating"
    else:
        doing = "writing" if os.access(path, os.R_OK) else "reading"
    return f"permission denied {doing} {path}: run it with sudo (or as the faceberry user)"
