# Only the standard library before the guard: without faceberry's venv this must still print one line.
import sys

from device.startup import guard, run_main

if not guard("python -m device", ("numpy", "cv2")):
    sys.exit(2)
sys.exit(run_main("python -m device", "device.cli"))
