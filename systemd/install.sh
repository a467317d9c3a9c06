#!/usr/bin/env bash
# Install faceberry as a hardened systemd service (Raspberry Pi OS Bookworm, or any systemd Linux).
#
#   sudo systemd/install.sh [--bundle DIR] [--config FILE] [--prefix DIR] [--no-apt] [--no-start] [--dry-run]
#
#   --bundle DIR   copy this model bundle (from `python -m convert`) to /var/lib/faceberry/bundle
#   --config FILE  install this config as /etc/faceberry/config.yaml (default: keep the existing one,
#                  or install systemd/faceberry.example.yaml to edit)
#   --prefix DIR   where the code and its venv go (default /opt/faceberry)
#   --no-apt       do not apt-get install python3-venv and python3-picamera2
#   --no-start     install and enable, but do not (re)start the service
#   --dry-run      print what would be done, change nothing (no root needed)
#
# What it does: creates the system user `faceberry` (in group video), copies device/ and models/ to
# PREFIX/app, creates PREFIX/venv with --system-site-packages (picamera2 comes from apt) and installs
# requirements-device.txt into it, puts the config in /etc/faceberry (root:faceberry, 0640), creates
# /etc/faceberry/mqtt_password (root-only 0600; the unit hands it to the daemon with LoadCredential),
# installs and enables faceberry.service, runs `device check` in the service's own sandbox, then starts it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PREFIX=/opt/faceberry
ETC=/etc/faceberry
STATE=/var/lib/faceberry
USER_NAME=faceberry
BUNDLE=""
CONFIG=""
APT=1
START=1
DRY=0

die() { echo "error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE="${2:?--bundle needs a directory}"; shift 2 ;;
        --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --no-apt) APT=0; shift ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

run() {
    if [ "$DRY" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

[ "$DRY" = 1 ] || [ "$(id -u)" = 0 ] || die "run as root: sudo $0 $*"
[ -f "$REPO/device/service.py" ] || die "$REPO does not look like a faceberry checkout (no device/service.py)"
if [ -n "$BUNDLE" ]; then
    [ -f "$BUNDLE/manifest.json" ] || die "$BUNDLE is not a bundle (no manifest.json); build one with python -m convert"
fi
if [ -n "$CONFIG" ]; then
    [ -f "$CONFIG" ] || die "config file $CONFIG not found"
fi

echo "== packages"
if [ "$APT" = 1 ] && command -v apt-get >/dev/null; then
    run apt-get install -y --no-install-recommends python3-venv python3-pip
    # The Pi camera's Python binding only exists as a Debian package; absent elsewhere, which is fine.
    if apt-cache show python3-picamera2 >/dev/null 2>&1; then
        run apt-get install -y --no-install-recommends python3-picamera2
    fi
fi

echo "== user $USER_NAME"
if ! id "$USER_NAME" >/dev/null 2>&1; then
    run useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
if getent group video >/dev/null; then
    run usermod -a -G video "$USER_NAME"
fi

echo "== code in $PREFIX/app"
run install -d -m 0755 "$PREFIX" "$PREFIX/app"
run rm -rf "$PREFIX/app/device" "$PREFIX/app/models"
run cp -r "$REPO/device" "$REPO/models" "$PREFIX/app/"
run find "$PREFIX/app" -name __pycache__ -prune -exec rm -rf {} +
run find "$PREFIX/app" -name "*.tflite" -delete  # the bundle carries its own detector
run install -m 0644 "$REPO/requirements-device.txt" "$PREFIX/app/requirements-device.txt"

echo "== venv in $PREFIX/venv (--system-site-packages: picamera2 and libcamera come from apt)"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    run python3 -m venv --system-site-packages "$PREFIX/venv"
fi
run "$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check -r "$PREFIX/app/requirements-device.txt"

echo "== config in $ETC"
run install -d -m 0750 -o root -g "$USER_NAME" "$ETC"
if [ -n "$CONFIG" ]; then
    run install -m 0640 -o root -g "$USER_NAME" "$CONFIG" "$ETC/config.yaml"
elif [ ! -f "$ETC/config.yaml" ]; then
    run install -m 0640 -o root -g "$USER_NAME" "$HERE/faceberry.example.yaml" "$ETC/config.yaml"
    START=0
    echo "   installed the example config: edit $ETC/config.yaml, then: sudo systemctl start faceberry"
fi
if [ ! -f "$ETC/mqtt_password" ]; then
    # Empty = no password. Put the broker password (one line) here; only root can read the file.
    run install -m 0600 -o root -g root /dev/null "$ETC/mqtt_password"
fi

echo "== bundle in $STATE/bundle"
run install -d -m 0750 -o root -g "$USER_NAME" "$STATE"
if [ -n "$BUNDLE" ]; then
    # Copy next to the old bundle, then swap: the running daemon never sees half a bundle.
    run rm -rf "$STATE/bundle.new"
    run cp -r "$BUNDLE" "$STATE/bundle.new"
    run chown -R root:"$USER_NAME" "$STATE/bundle.new"
    run chmod -R u=rwX,g=rX,o= "$STATE/bundle.new"
    run rm -rf "$STATE/bundle.old"
    if [ -d "$STATE/bundle" ]; then run mv "$STATE/bundle" "$STATE/bundle.old"; fi
    run mv "$STATE/bundle.new" "$STATE/bundle"
fi

echo "== systemd unit"
run install -m 0644 "$HERE/faceberry.service" /etc/systemd/system/faceberry.service
if [ "$PREFIX" != /opt/faceberry ]; then
    run sed -i "s#/opt/faceberry#$PREFIX#g" /etc/systemd/system/faceberry.service
fi
run systemctl daemon-reload
run systemctl enable faceberry.service

if [ "$START" = 1 ]; then
    echo "== check (in the service's sandbox, with its user and credentials)"
    if ! run systemd-run --quiet --pipe --wait --collect --unit=faceberry-check \
        --property=User="$USER_NAME" --property=SupplementaryGroups=video \
        --property=LoadCredential=mqtt_password:"$ETC/mqtt_password" \
        --working-directory="$PREFIX/app" \
        "$PREFIX/venv/bin/python" -m device check --config "$ETC/config.yaml"; then
        die "the check failed (see above); fix it, then: sudo systemctl start faceberry"
    fi
    run systemctl restart faceberry.service
    echo "started: journalctl -u faceberry -f"
fi
echo "done"
