"""Start-up of every CLI (issue 13): a missing dependency is one line with the fix, and third-party
start-up noise stays out of the terminal unless --log-level DEBUG asks for it."""

from __future__ import annotations

import os
import subprocess

import pytest

from faceberry.startup import missing_module, wants_debug
from tests.conftest import ROOT
from tests.plugins.processes import python


def _py(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return python(*args, timeout=120, env=env)


@pytest.mark.parametrize("package", ["train", "convert", "device"])
def test_outside_the_venv_each_cli_prints_one_line_naming_the_module_and_the_fix(package):
    # -S: no site-packages, as with a system Python that has never seen requirements-*.txt.
    proc = _py(["-S", "-m", package, "--help"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: python -m {package} needs the Python module 'numpy'")
    assert "source .venv/bin/activate" in lines[0] and "./quickstart.sh setup" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_module_missing_later_is_also_one_line(tmp_path):
    # A fake package shadowing a real dependency: present for the up-front check, broken on import.
    fake = tmp_path / "cv2"
    fake.mkdir()
    (fake / "__init__.py").write_text("import faceberry_no_such_module\n")
    # eval's help loads eval's module, which imports OpenCV (the tree's own help imports no command).
    proc = _py(["-m", "device", "eval", "--help"], PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the Python module 'faceberry_no_such_module'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


NOISY = (
    "import os, sys\n"
    "from faceberry.startup import quiet_third_party\n"
    "quiet_third_party(sys.argv[1] == 'debug')\n"
    "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
    "os.write(2, b'I0000 00:00:1733233455.123456   12345 cpu_feature_guard.cc:210] This TF binary\\n')\n"
    "os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
    "print('a real warning', file=sys.stderr)\n"
    "os.write(2, b'E0000 00:00:1733233455.123456   12345 some.cc:1] a real C++ error\\n')\n"
    "os.write(2, b'last words without a newline')\n"
)


def test_start_up_noise_is_dropped_and_everything_else_kept_in_order():
    proc = _py(["-c", NOISY, "quiet"])
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [
        "a real warning", "E0000 00:00:1733233455.123456   12345 some.cc:1] a real C++ error",
        "last words without a newline",
    ]


def test_debug_keeps_the_noise():
    proc = _py(["-c", NOISY, "debug"])
    assert "Created TensorFlow Lite XNNPACK delegate" in proc.stderr
    assert "absl::InitializeLog" in proc.stderr


def test_a_crash_after_the_filter_still_reaches_the_terminal():
    code = ("import os\nfrom faceberry.startup import quiet_third_party\nquiet_third_party(False)\n"
            "os.write(2, b'fatal: the reason\\n')\nos.abort()\n")
    proc = _py(["-c", code])
    assert proc.returncode != 0
    assert "fatal: the reason" in proc.stderr


def test_the_litert_interpreter_line_is_gone_from_device_commands(detector_path):
    code = ("import sys\nfrom faceberry.startup import guard\nassert guard('t', ('numpy',), sys.argv[1:])\n"
            "from faceberry.runtime import TFLiteModel\n"
            f"TFLiteModel({str(detector_path)!r})\nprint('loaded', file=sys.stderr)\n")
    quiet = _py(["-c", code])
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip() == "loaded"
    loud = _py(["-c", code, "--log-level", "DEBUG"])
    assert "XNNPACK" in loud.stderr


def test_wants_debug_reads_the_flag_and_the_environment(monkeypatch):
    monkeypatch.delenv("FACEBERRY_LOG_LEVEL", raising=False)
    assert wants_debug(["eval", "--log-level", "debug"])
    assert wants_debug(["--log-level=DEBUG"])
    assert not wants_debug(["--log-level", "INFO"])
    assert not wants_debug(["--log-level"])
    monkeypatch.setenv("FACEBERRY_LOG_LEVEL", "DEBUG")
    assert wants_debug([])
    assert not wants_debug(["--log-level", "WARNING"])


def test_missing_module_finds_without_importing():
    assert missing_module(["os", "faceberry_no_such_module", "json"]) == "faceberry_no_such_module"
    assert missing_module(["os", "json"]) is None
