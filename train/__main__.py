# Only the standard library before the guard: without faceberry's venv this must still print one line.
import sys

from device.startup import guard, run_main

if not guard("python -m train", ("numpy", "cv2", "tensorflow")):
    sys.exit(2)
sys.exit(run_main("python -m train", "train.cli"))
