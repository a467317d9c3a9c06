#!/usr/bin/env bash
# faceberry quickstart: the two commands the README promises.
#
#   ./quickstart.sh demo [demo.py flags]   set up everything, train on sample faces, convert, run the
#                                          device daemon over held-out photos, print the MQTT events
#   ./quickstart.sh test [pytest args]     set up the test environment, run ruff and the whole test suite
#   ./quickstart.sh setup                  only create/update the environments and fetch the detector
#
# Environments (created next to this script, reused on later runs):
#   .venv         workstation: requirements-train.txt (+ requirements-dev.txt for `test`); Python >= 3.10;
#                 about 2.2 GB on disk, TensorFlow alone is a 274 MB download
#   .venv-device  the Pi's environment, requirements-device.txt only (no TensorFlow, about 350 MB): the
#                 demo's daemon runs here, and `test` installs into a temporary Pi root from it
#   .venv-tflite  tflite-runtime 2.14 (`test` only): proves bundles still load in the old runtime
#
# The first run downloads about 600 MB and needs about 3 GB of free disk; it takes 5-15 minutes on a
# laptop, most of it pip (its progress bars are shown). Later runs reuse the environments: seconds.
#
# Environment variables:
#   PYTHON                    interpreter to build the venvs with (default: python3.11, else python3)
#   FACEBERRY_SAMPLE_PHOTOS   a local folder of <person>/*.jpg for the demo instead of downloading LFW
#                             (without it the demo checks that LFW can be downloaded before any setup)
#   FACEBERRY_WEIGHTS         MobileNetV2 weights file for `demo --backbone none` (the fine-tune) only
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
DEVICE_VENV="$ROOT/.venv-device"
TFLITE_VENV="$ROOT/.venv-tflite"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    elif command -v python3 >/dev/null 2>&1; then
        echo python3
    else
        die "no python3 found; install Python 3.10-3.13 (e.g. sudo apt install python3 python3-venv)"
    fi
}

make_venv() {  # make_venv DIR: create DIR with the chosen Python unless it already works
    local dir=$1 py
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import sys' 2>/dev/null; then
        return 0
    fi
    py=$(pick_python)
    "$py" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' \
        || die "$py is Python $("$py" -c 'import platform; print(platform.python_version())'), faceberry needs 3.10-3.13; set PYTHON=/path/to/python3.11"
    "$py" -m venv "$dir" \
        || die "could not create $dir; install the venv module (e.g. sudo apt install python3-venv)"
}

pip_install() {  # pip_install VENV ARGS...: pip's own progress (each package, its size, a bar on a terminal)
    local dir=$1 start rc; shift
    start=$(date +%s)
    set +e
    if [ -t 1 ]; then
        "$dir/bin/python" -m pip install --disable-pip-version-check "$@"
        rc=$?
    else
        # A log file or CI: bars would be one line per redraw, and a rerun lists every package it already has.
        "$dir/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" \
            | grep --line-buffered -v '^Requirement already satisfied'
        rc=${PIPESTATUS[0]}
    fi
    set -e
    [ "$rc" -eq 0 ] || die "pip install into $dir failed (exit $rc, see above); check the network and the free disk"
    printf '    done in %s s; %s now holds %s\n' "$(( $(date +%s) - start ))" "$dir" \
        "$(du -sh "$dir" 2>/dev/null | cut -f1)"
}

check_disk() {  # check_disk MB: warn when the disk under this folder has less free space
    local free_mb
    free_mb=$(df -Pm . 2>/dev/null | awk 'NR==2 {print $4}')
    if [ -n "$free_mb" ] && [ "$free_mb" -lt "$1" ]; then
        echo "warning: only ${free_mb} MB free here; the environments need about ${1} MB" >&2
    fi
}

setup_workstation() {  # setup_workstation REQUIREMENTS_FILE
    if [ ! -x "$VENV/bin/python" ]; then
        say "workstation environment $VENV from $1: first time, about 2.2 GB (TensorFlow is a 274 MB download), 5-15 min"
        check_disk 3000
    else
        say "workstation environment $VENV from $1 (already there: only what changed is installed)"
    fi
    make_venv "$VENV"
    pip_install "$VENV" -r "$1"
    say "faceberry itself into $VENV (pip install -e .: the faceberry, faceberry-train, faceberry-convert commands)"
    pip_install "$VENV" --no-deps -e .
    say "face detector (python -m models fetch)"
    "$VENV/bin/python" -m models fetch
}

setup_device() {
    say "device environment $DEVICE_VENV from requirements-device.txt (what the Pi installs; no TensorFlow, ~350 MB)"
    make_venv "$DEVICE_VENV"
    pip_install "$DEVICE_VENV" -r requirements-device.txt
    pip_install "$DEVICE_VENV" --no-deps -e .
}

setup_tflite() {
    say "tflite-runtime 2.14 environment $TFLITE_VENV (bundles must load in the old runtime too)"
    if [ -x "$TFLITE_VENV/bin/python" ] && "$TFLITE_VENV/bin/python" -c 'import tflite_runtime.interpreter' 2>/dev/null; then
        return 0
    fi
    # tflite-runtime 2.14 has wheels for CPython 3.9-3.11 only.
    local py="" candidate
    for candidate in "${PYTHON:-}" python3.11 python3.10 python3.9 python3; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 11) else 1)' 2>/dev/null; then
            py=$candidate
            break
        fi
    done
    if [ -z "$py" ]; then
        echo "warning: no Python 3.9-3.11 for tflite-runtime 2.14: the tests that need $TFLITE_VENV will skip" >&2
        return 0
    fi
    rm -rf "$TFLITE_VENV"
    "$py" -m venv "$TFLITE_VENV"
    pip_install "$TFLITE_VENV" tflite-runtime==2.14.0 "numpy<2"
}

run_tests() {
    local start rc ruff_rc
    start=$(date +%s)
    setup_workstation requirements-dev.txt
    # The Pi's environment too: tests/test_install.py installs into a temporary root from it.
    setup_device
    setup_tflite
    # ruff and pytest both run, so one report shows every problem; either failing fails the command.
    say "ruff check ."
    set +e
    "$VENV/bin/python" -m ruff check .
    ruff_rc=$?
    say "pytest $*"
    # One worker per core (pytest-xdist), tests handed out as workers free up; `-n 0` runs in one process.
    "$VENV/bin/python" -m pytest -n auto --dist worksteal --durations=15 "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        die "pytest collected no tests (exit 5); that is a failure, not a pass"
    elif [ "$rc" -ne 0 ]; then
        die "pytest failed (exit $rc)"
    elif [ "$ruff_rc" -ne 0 ]; then
        die "ruff found problems (exit $ruff_rc); fix them or run: .venv/bin/ruff check --fix ."
    fi
    say "all tests passed in $(( $(date +%s) - start )) s"
}

check_demo_photos() {  # check_demo_photos DEMO_ARGS...: the sample photos are at hand before minutes of setup
    local arg py lfw_home
    for arg in "$@"; do
        case "$arg" in --photos|--photos=*) return 0 ;; esac
    done
    if [ -n "${FACEBERRY_SAMPLE_PHOTOS:-}" ]; then
        [ -d "$FACEBERRY_SAMPLE_PHOTOS" ] \
            || die "FACEBERRY_SAMPLE_PHOTOS=$FACEBERRY_SAMPLE_PHOTOS is not a folder; point it at a folder of <person>/*.jpg"
        return 0
    fi
    lfw_home="${SCIKIT_LEARN_DATA:-$HOME/scikit_learn_data}/lfw_home/lfw_funneled"
    [ -d "$lfw_home" ] && return 0  # downloaded by an earlier run
    py=$(pick_python)
    # The host scikit-learn downloads LFW from; any HTTP answer will do, and a proxy in the environment is used.
    "$py" - <<'PY' || die "the demo's sample photos (LFW) cannot be downloaded: no network? Set FACEBERRY_SAMPLE_PHOTOS to a local folder of <person>/*.jpg (5 or more people with 16+ photos and a few dozen others), or run again online"
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen("https://ndownloader.figshare.com/", timeout=10).close()
except urllib.error.HTTPError:
    pass  # the host answered
except (urllib.error.URLError, OSError) as exc:
    print(f"cannot reach ndownloader.figshare.com: {getattr(exc, 'reason', exc)}", file=sys.stderr)
    sys.exit(1)
PY
}

run_demo() {
    check_demo_photos "$@"
    setup_workstation requirements-train.txt
    setup_device
    say "demo (python demo.py${*:+ $*})"
    "$VENV/bin/python" demo.py --device-python "$DEVICE_VENV/bin/python" "$@"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    demo) run_demo "$@" ;;
    test) run_tests "$@" ;;
    setup) setup_workstation requirements-dev.txt; setup_device ;;
    -h|--help|help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        ;;
    *)
        echo "usage: ./quickstart.sh demo|test|setup [args]   (./quickstart.sh --help for more)" >&2
        exit 2
        ;;
esac
