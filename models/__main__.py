# `python -m models fetch` is `faceberry models fetch` (faceberry.device.cli).
import sys

from faceberry.device.cli import entry

sys.exit(entry("python -m models", ("models",)))
