"""The Pi has no TensorFlow: importing every module of `device` must not pull it (or Keras) in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import importlib, json, pkgutil, sys
import faceberry, faceberry.device as device
# The daemon's packages and the core they import (not train/ or convert/, which are the workstation's).
names = sorted(m.name for m in pkgutil.walk_packages(device.__path__, "faceberry.device.")
               if not m.name.endswith("__main__"))
names += sorted("faceberry." + m.name for m in pkgutil.iter_modules(faceberry.__path__[:1]) if not m.ispkg)
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "jax", "torch"))
print(json.dumps({"imported": names, "heavy": heavy}))
"""


def test_importing_every_device_module_does_not_import_tensorflow() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The walk really covered the daemon (a broken walk would pass vacuously).
    assert {"faceberry.device.service", "faceberry.device.capture.camera", "faceberry.device.messaging.mqtt",
            "faceberry.device.cli", "faceberry.device.recognition.pipeline", "faceberry.runtime",
            "faceberry.bundle"} <= set(result["imported"])
    assert result["heavy"] == [], f"device imports {result['heavy'][:5]}: the Pi has no TensorFlow"


def test_the_cli_help_does_not_import_tensorflow() -> None:
    script = ("import sys, runpy\nsys.argv = ['device', '--help']\n"
              "try:\n    runpy.run_module('device', run_name='__main__')\nexcept SystemExit:\n    pass\n"
              "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-1000:] + out.stderr[-1000:]
