"""The face photos and weights a clone of your own tests with, where the project's `../shared` is absent.

Most tests need real faces of several people: the project's own CI reads them from `../shared/data`,
which a user's clone does not have. The same two things are public, and faceberry already downloads them
for the demo:

- `faces/lfw-dev/<Person>/*.jpg`: Labeled Faces in the Wild (funneled) through scikit-learn's fetcher,
  about 200 MB the first time, cached in ~/scikit_learn_data (demo.lfw_photos, the demo's own download),
  people with at least MIN_PHOTOS photos;
- `weights/mobilenet_v2_1.0_224_no_top.weights.h5`: Keras' ImageNet MobileNetV2 (`weights="imagenet"`, cached in
  ~/.keras), saved in the Keras 3 weights format the suite passes to `--weights`.

They are assembled once into DATA_HOME (outside the checkout; nothing is copied into the repository) and the
suite uses that folder as its shared data. FACEBERRY_OFFLINE=1 skips the download (the tests that need it
then skip, each saying so). What stays unavailable: `photos/` and `video/` (face_recognition's example
files) and `faces/five-celebrities`, which only ../shared has.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

DATA_HOME = Path(os.environ.get("FACEBERRY_TEST_DATA",
                                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "faceberry"
                                / "test-data")).resolve()
MIN_PHOTOS = 10  # like lfw-dev's people: 10 photos or more each
WEIGHTS_NAME = "mobilenet_v2_1.0_224_no_top.weights.h5"
WHAT_TO_DO = ("run the tests once online (they download LFW, ~200 MB, and Keras' MobileNetV2 weights into "
              f"{DATA_HOME}), or set FACEBERRY_SHARED to a folder laid out like ../shared")
_SAVE_WEIGHTS = """
import sys, keras
model = keras.applications.MobileNetV2(include_top=False, weights="imagenet", input_shape=(224, 224, 3))
model.save_weights(sys.argv[1])
"""


def _say(text: str) -> None:
    # Collection-time output: pytest shows stderr of conftest imports, and the download takes minutes.
    print(f"faceberry tests: {text}", file=sys.stderr, flush=True)


def _faces(dest: Path) -> bool:
    if dest.is_dir() and any(dest.iterdir()):
        return True
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    try:
        import demo
    finally:
        sys.path.remove(str(root))
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        demo.lfw_photos(dest, min_faces=MIN_PHOTOS)
    except Exception as exc:  # offline, scikit-learn missing, a partial archive: the tests skip, saying why
        _say(f"no LFW photos ({str(exc).splitlines()[0][:200]})")
        return False
    return dest.is_dir()


def _weights(dest: Path) -> bool:
    if dest.is_file():
        return True
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name("partial-" + dest.name)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([sys.executable, "-c", _SAVE_WEIGHTS, str(partial)], env=env, capture_output=True,
                              text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _say(f"no MobileNetV2 weights ({exc})")
        return False
    if proc.returncode != 0 or not partial.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        _say(f"no MobileNetV2 weights (Keras' imagenet download failed: {last[0][:200]})")
        partial.unlink(missing_ok=True)
        return False
    partial.rename(dest)
    return True


def prepare() -> Path | None:
    """DATA_HOME with faces/lfw-dev and weights/, fetched now if missing; None where they cannot be had."""
    if os.environ.get("FACEBERRY_OFFLINE"):
        return None
    faces, weights = DATA_HOME / "faces" / "lfw-dev", DATA_HOME / "weights" / WEIGHTS_NAME
    DATA_HOME.mkdir(parents=True, exist_ok=True)
    with open(DATA_HOME / ".lock", "w") as lock:
        # pytest-xdist's controller and every worker import the conftest at once: one downloads, the others wait.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (faces.is_dir() and weights.is_file()):
            _say(f"../shared is absent: getting public faces and weights into {DATA_HOME} (once; "
                 "FACEBERRY_OFFLINE=1 skips the tests that need them)")
        if not (_faces(faces) and _weights(weights)):
            return None
    return DATA_HOME

