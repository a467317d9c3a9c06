"""One error base class and the exit codes of every faceberry command.

Every error faceberry raises on purpose derives from `FaceberryError`. Its message is one line that names
the problem and the fix ("<what went wrong>; <what to do>"), so a CLI can print `error: <message>` and
exit with the error's `exit_code`, never a traceback. Anything else reaching a CLI is a bug.

Exit codes (the same for `python -m device`, `python -m train`, `python -m convert`):

    0  EXIT_OK           done; for `device check`: every check passed.
    1  EXIT_FAILURE      it ran and failed: a runtime failure (camera lost for good, broker gave up,
                         training diverged), or `device check` found at least one problem.
    2  EXIT_USAGE        bad input, nothing was done: the command line, the config file, a bundle or a run
                         directory, photos. Retrying will not help; fix the input. (argparse uses 2 too.)
    3  EXIT_UNAVAILABLE  a dependency or service is unavailable: broker unreachable, no camera, a package
                         not installed. The input may be fine; retrying later may work.
  130  EXIT_INTERRUPTED  stopped by Ctrl-C (128 + SIGINT, as shells report it).

Why 2 and 3 are separate: systemd can keep restarting on 1 and 3 (a broker or camera that comes back)
while RestartPreventExitStatus=2 stops a restart loop on a config that can never work.
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
