# `python -m convert …` is `faceberry convert …` (device.cli). Only the standard library is imported before the
# guard, so without faceberry's venv this still prints one line.
import sys

from device.cli import entry
from device.startup import WORKSTATION_NEEDS

sys.exit(entry("python -m convert", ("convert",), WORKSTATION_NEEDS))
