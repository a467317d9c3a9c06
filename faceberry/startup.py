"""What every faceberry command does before it imports its dependencies.

Only the standard library is imported here, so this runs on any Python:
- a missing dependency (the venv not activated) becomes one line naming the module and the fix,
  not a ModuleNotFoundError traceback;
- TensorFlow's and LiteRT's start-up lines (absl, oneDNN, CPU instructions, XNNPACK, cuda) are kept
  out of the terminal unless the command runs at --log-level DEBUG. Most of them honour
  TF_CPP_MIN_LOG_LEVEL; the XNNPACK line and the absl pre-init banner do not, so they are filtered at
  the file-descriptor level by a small child process (which outlives a crash of the command, so a
  fatal message from C++ still reaches the terminal).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence

FIX = "activate faceberry's environment (`source .venv/bin/activate`) or create it (`./quickstart.sh setup`)"
# What the Pi's commands import before anything else, and what the workstation's add (faceberry.device.cli's tree).
DEVICE_NEEDS = ("numpy", "cv2")
WORKSTATION_NEEDS = (*DEVICE_NEEDS, "tensorflow")

# Lines third-party libraries write straight to stderr at start-up; none of them is actionable.
_NOISE = re.compile(
    r"All log messages before absl::InitializeLog"
    r"|oneDNN custom operations are on"
    r"|TF_ENABLE_ONEDNN_OPTS"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|Created TensorFlow Lite XNNPACK delegate"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|Could not find cuda drivers|cuda_(dnn|fft|blas|executor|driver)"
    r"|computation placer already registered"
    r"|failed call to cuInit"
    r"|^fully_quantize: \d"
    r"|^[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "  # absl C++ INFO/WARNING lines
)

_THIRD_PARTY_LOGGERS = ("absl", "tensorflow", "h5py", "matplotlib", "PIL")


def missing_module(modules: Sequence[str]) -> str | None:
    """The first of `modules` this Python cannot import (found without importing it), else None."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def missing_message(prog: str, module: str, workstation: bool = False) -> str:
    """One line (without its `error: `) naming the module `prog` lacks and the fix, for the Pi or the workstation."""
    if workstation:
        where = (" (training and conversion run on the workstation, from requirements-train.txt; a Pi only runs "
                 "the bundle they make)")
    else:
        where = " (on the Pi: pip install -r requirements-device.txt)"
    return f"{prog} needs the Python module {module!r}, which {sys.executable} does not have; {FIX}{where}"


def wants_debug(argv: Sequence[str]) -> bool:
    """--log-level DEBUG (or FACEBERRY_LOG_LEVEL=DEBUG) anywhere on the command line."""
    level = os.environ.get("FACEBERRY_LOG_LEVEL", "")
    for i, arg in enumerate(argv):
        if arg == "--log-level" and i + 1 < len(argv):
            level = argv[i + 1]
        elif arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
    return level.upper() == "DEBUG"


def quiet_third_party(debug: bool, filter_stderr: bool = True) -> None:
    """Silence TensorFlow/LiteRT start-up output unless `debug`. Call before they are imported."""
    if debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in _THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if filter_stderr:
        _filter_stderr()


def _filter_stderr() -> None:
    """Route fd 2 through a child process that drops _NOISE lines and passes everything else on."""
    if os.environ.get("FACEBERRY_STDERR_FILTER") == "0" or not hasattr(os, "fork"):
        return
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
    except OSError:
        return
    if pid == 0:  # the filter: reads until every writer (the command and its children) has closed fd 2
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command; drain what it says
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.close(write_fd)
            with os.fdopen(read_fd, "rb", buffering=0) as src:
                pending = b""
                while chunk := src.read(65536):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    out = b"".join(ln + b"\n" for ln in lines if not _NOISE.search(ln.decode("utf-8", "replace")))
                    if out:
                        os.write(2, out)
                if pending and not _NOISE.search(pending.decode("utf-8", "replace")):
                    os.write(2, pending)
        finally:
            os._exit(0)
    os.close(read_fd)
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # Python's stderr keeps writing through fd 2, now the pipe; line buffering keeps the order of
    # Python's lines and C++'s lines as the user would see it.
    sys.stderr.reconfigure(line_buffering=True)


def guard(prog: str, needs: Sequence[str], argv: Sequence[str] | None = None, workstation: bool = False) -> bool:
    """Check dependencies and quiet start-up for `prog`; False after printing the one-line error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    module = missing_module(needs)
    if module is not None:
        print(f"error: {missing_message(prog, module, workstation)}", file=sys.stderr)
        return False
    help_only = any(a in ("-h", "--help") for a in argv)
    # Under systemd the journal is the terminal; a filter process there would only be one more process.
    quiet_third_party(wants_debug(argv), filter_stderr=not help_only and not os.environ.get("JOURNAL_STREAM"))
    return True
