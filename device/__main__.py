# `python -m device` is `faceberry`: the whole tree (faceberry.device.cli). Only the standard library is imported before
# the guard, so without faceberry's venv this still prints one line.
import sys

from faceberry.device.cli import entry

sys.exit(entry("python -m device"))
