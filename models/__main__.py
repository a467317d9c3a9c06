# `python -m models fetch` is `faceberry models fetch` (device.cli).
import sys

from device.cli import entry

sys.exit(entry("python -m models", ("models",)))
