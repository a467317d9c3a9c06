"""faceberry: the core shared by train, convert and the device, and the namespace of the installed distribution.

The card's folders (device/, train/, convert/, models/) sit beside this package in a checkout and inside it in an
installed wheel (pyproject's package-dir), so every import says `faceberry.<folder>`: the distribution claims one
top-level name instead of `device`, `train`, `convert` and `models`, which any other project may also use.
Nothing here imports TensorFlow.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "device").is_dir() and (_checkout / "device" / "__init__.py").is_file():
    # A checkout (with or without `pip install -e .`): faceberry.device is ../device.
    __path__.append(str(_checkout))
