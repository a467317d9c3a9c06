#!/usr/bin/env bash
# Install or update faceberry as a hardened systemd service (Raspberry Pi OS Bookworm, or any systemd Linux).
# The whole guide: docs/PI.md. `--help` prints the options and the plan; `--dry-run` the exact commands.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PREFIX=/opt/faceberry
USER_NAME=faceberry
ROOT=/
BUNDLE=""
CONFIG=""
WHEELHOUSE=""
APT=1
START=1
DRY=0
SYSTEMD=auto
CHECK_SKIP=()
TMPFILES=()

usage() {
    cat <<'EOF'
usage: sudo systemd/install.sh [--bundle DIR] [--config FILE] [--root DIR] [--prefix DIR] [--wheelhouse DIR]
                               [--check-skip WHAT] [--systemd auto|yes|no] [--no-apt] [--no-start] [--dry-run]

  --bundle DIR       add this bundle (from `python -m convert`) as a version in /var/lib/faceberry/bundles
                     and point bundles/current at it (faceberry deploy --no-reload)
  --config FILE      install this config as /etc/faceberry/config.yaml (default: keep the existing one, or
                     install systemd/faceberry.example.yaml to edit, and do not start)
  --root DIR         install into the system rooted at DIR (an image, a chroot) instead of this one: no apt,
                     no service started; DIR must run this machine's python3 (same CPU architecture)
  --prefix DIR       where the venv goes (default /opt/faceberry: /opt/faceberry/venv)
  --wheelhouse DIR   install from the wheels in DIR only (pip --no-index --find-links DIR), e.g. an offline Pi
  --check-skip WHAT  leave bundle, camera or broker out of the check (repeatable; `faceberry check --skip`)
  --systemd MODE     auto (default): the service is managed when this root runs a booted systemd
                     (/run/systemd/system exists); yes/no force it (with --dry-run: show either plan)
  --no-apt           do not apt-get anything
  --no-start         install, check and enable, but do not start the service
  --dry-run          print the commands the plan would run, change nothing (no root needed)
  -h, --help         this text

The plan (each step is safe to repeat; a second run with the same input changes nothing):
  1. packages   apt-get update once, then python3-venv and python3-pip; python3-picamera2 when the archive
                has it (only Raspberry Pi's archive does: elsewhere a line says so and the camera source
                picamera2 is unavailable)
  2. user       system user faceberry (home /var/lib/faceberry, no login), in group video
  3. stop       the running service, remembering that it ran
  4. snapshot   the current venv (hard links: instant), config, unit and bundles/current, for step 9
  5. package    /opt/faceberry/venv (--system-site-packages: apt's picamera2 and libcamera stay visible);
                pip installs requirements-device.txt, then the faceberry package itself (this checkout, or
                the wheel in --wheelhouse); /usr/local/bin/faceberry links to it, so `faceberry` runs
                from any directory
  6. files      /etc/faceberry (root:faceberry 0750), config.yaml (root:faceberry 0640), mqtt_password
                (root:root 0600, empty = no password; the unit passes it with LoadCredential=),
                /var/lib/faceberry and bundles/ (faceberry:faceberry 0750), the bundle via faceberry deploy
  7. unit       /etc/systemd/system/faceberry.service, daemon-reload, enable (without a booted systemd:
                the multi-user.target.wants link)
  8. check      `faceberry check` in the unit's own sandbox: systemd-run with every [Service] property of
                the unit but its start/stop/restart ones; without a booted systemd, as the faceberry user;
                in another root (--root), the config only
  9. start      the service, if it ran before or the check passed. If the check FAILED: the snapshot of
                step 4 is put back, the old version restarted if it ran, and the script exits 1

Whatever fails after step 3 (pip, a refused bundle, the check) leaves the system as it was. On a FIRST
install that means nothing of faceberry's is left: no unit, nothing enabled that would start at boot, no
venv, config, state directory or command link (the user of step 2 and apt's packages stay).
EOF
}

die() { echo "error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE="${2:?--bundle needs a directory}"; shift 2 ;;
        --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a directory}"; shift 2 ;;
        --check-skip) CHECK_SKIP+=(--skip "${2:?--check-skip needs bundle, camera or broker}"); shift 2 ;;
        --systemd) SYSTEMD="${2:?--systemd needs auto, yes or no}"; shift 2 ;;
        --no-apt) APT=0; shift ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
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
step() { echo "== $*"; }

[ "$DRY" = 1 ] || [ "$(id -u)" = 0 ] || die "run as root: sudo $0 $*"
[ -f "$REPO/pyproject.toml" ] && [ -f "$REPO/device/service.py" ] || [ -n "$WHEELHOUSE" ] \
    || die "$REPO does not look like a faceberry checkout (no pyproject.toml); pass --wheelhouse DIR"
if [ -n "$BUNDLE" ]; then
    [ -f "$BUNDLE/manifest.json" ] || die "$BUNDLE is not a bundle (no manifest.json); build one with python -m convert"
    BUNDLE="$(cd "$BUNDLE" && pwd)"
fi
if [ -n "$CONFIG" ]; then
    [ -f "$CONFIG" ] || die "config file $CONFIG not found"
    CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
fi
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || die "wheelhouse $WHEELHOUSE not found"
    WHEELHOUSE="$(cd "$WHEELHOUSE" && pwd)"
fi
case "$SYSTEMD" in auto|yes|no) ;; *) die "--systemd takes auto, yes or no, not $SYSTEMD" ;; esac
[ -d "$ROOT" ] || die "--root $ROOT is not a directory"
ROOT="$(cd "$ROOT" && pwd)"
R="${ROOT%/}"  # prefix for paths: "" for this system
if [ "$SYSTEMD" = auto ]; then
    if [ -z "$R" ] && [ -d /run/systemd/system ]; then SYSTEMD=yes; else SYSTEMD=no; fi
fi
[ -z "$R" ] || [ "$SYSTEMD" = no ] || die "--root and a booted systemd exclude each other: another root's service cannot be started from here"

ETC=/etc/faceberry
STATE=/var/lib/faceberry
STORE=$STATE/bundles
UNIT=/etc/systemd/system/faceberry.service
VENV=$PREFIX/venv
# Hash-based .pyc files (PEP 552): the same sources give the same bytes, so a rerun changes nothing.
export SOURCE_DATE_EPOCH=315532800
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Users and groups are looked up in the target root's own files, not this machine's.
id_of() {  # id_of passwd|group NAME -> numeric id, empty if absent
    [ -f "$R/etc/$1" ] && awk -F: -v n="$2" '$1 == n { print $3; exit }' "$R/etc/$1" || true
}

# --- 1. packages ---------------------------------------------------------------------------------------
step "1. packages"
if [ "$APT" = 1 ] && [ -n "$R" ]; then
    echo "   --root: apt is not run into another root; install python3-venv (and python3-picamera2) there"
elif [ "$APT" = 1 ] && command -v apt-get >/dev/null; then
    run apt-get update -qq
    run apt-get install -y -qq --no-install-recommends python3-venv python3-pip
    if [ "$DRY" = 1 ] || apt-cache policy python3-picamera2 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        run apt-get install -y -qq --no-install-recommends python3-picamera2
    else
        echo "   python3-picamera2 is not in this system's apt archive: only Raspberry Pi's archive"
        echo "   (archive.raspberrypi.com, on Raspberry Pi OS) has it. camera.source picamera2 will not work;"
        echo "   use camera.source opencv (USB webcam, stream) or folder, or add that archive and rerun."
    fi
elif [ "$APT" = 1 ]; then
    echo "   no apt-get here: make sure python3 (3.10+) with venv is installed"
fi

# --- 2. user --------------------------------------------------------------------------------------------
step "2. user $USER_NAME"
PREFIX_OPT=()
[ -z "$R" ] || PREFIX_OPT=(--prefix "$R")
if [ -z "$(id_of passwd "$USER_NAME")" ]; then
    run useradd "${PREFIX_OPT[@]}" --system --user-group --home-dir "$STATE" --no-create-home \
        --shell /usr/sbin/nologin "$USER_NAME"
fi
if [ -n "$(id_of group video)" ]; then
    if ! awk -F: -v u="$USER_NAME" '$1 == "video" { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) f = 1 }
                                    END { exit !f }' "$R/etc/group"; then
        run usermod "${PREFIX_OPT[@]}" -a -G video "$USER_NAME"
    fi
else
    echo "   no group video in $ROOT: the camera may be out of reach of $USER_NAME"
fi
FB_UID=$(id_of passwd "$USER_NAME"); FB_GID=$(id_of group "$USER_NAME")
if [ "$DRY" = 1 ] && [ -z "$FB_UID" ]; then FB_UID=$USER_NAME; FB_GID=$USER_NAME; fi

# --- 3. stop --------------------------------------------------------------------------------------------
step "3. stop"
WAS_ACTIVE=0
if [ "$SYSTEMD" = yes ] && systemctl is-active --quiet faceberry.service 2>/dev/null; then
    WAS_ACTIVE=1
    # Stopped first: the check needs the camera the daemon holds, and pip must not swap files under it.
    run systemctl stop faceberry.service
else
    echo "   not running"
fi

# --- 4. snapshot ----------------------------------------------------------------------------------------
step "4. snapshot of what is installed now"
# Left over by an interrupted run: the live copy may be half-updated, and step 5 repairs it.
run rm -rf "$R$VENV.prev"
HAD_VENV=0; HAD_CONFIG=0; HAD_UNIT=0; OLD_CURRENT=""
WANTS=/etc/systemd/system/multi-user.target.wants/faceberry.service
HAD_WANTS=0; HAD_LINK=0; HAD_PASSWORD=0; HAD_DOC=0
[ -L "$R$WANTS" ] && HAD_WANTS=1
[ -L "$R/usr/local/bin/faceberry" ] || [ -e "$R/usr/local/bin/faceberry" ] && HAD_LINK=1
[ -f "$R$ETC/mqtt_password" ] && HAD_PASSWORD=1
if [ -f "$R$PREFIX/docs/PI.md" ]; then HAD_DOC=1; run cp -p "$R$PREFIX/docs/PI.md" "$R$PREFIX/docs/PI.md.prev"; fi
# Directories this run may create: on a failed first install they go again (only those it created).
NEW_DIRS=()
for d in "$(dirname "$PREFIX")" "$PREFIX" "$PREFIX/docs" "$ETC" /var /var/lib "$STATE" "$STORE" /usr /usr/local \
         /usr/local/bin /etc/systemd /etc/systemd/system /etc/systemd/system/multi-user.target.wants; do
    [ -e "$R$d" ] || NEW_DIRS+=("$d")
done
if [ -x "$R$VENV/bin/python" ]; then
    HAD_VENV=1
    # Hard links: pip replaces files (new inodes) rather than writing into them, so the old ones survive.
    run cp -al "$R$VENV" "$R$VENV.prev"
fi
if [ -f "$R$ETC/config.yaml" ]; then HAD_CONFIG=1; run cp -p "$R$ETC/config.yaml" "$R$ETC/config.yaml.prev"; fi
if [ -f "$R$UNIT" ]; then HAD_UNIT=1; run cp -p "$R$UNIT" "$R$UNIT.prev"; fi
OLD_PREVIOUS=""
if [ -L "$R$STORE/current" ]; then OLD_CURRENT=$(readlink "$R$STORE/current"); fi
if [ -L "$R$STORE/previous" ]; then OLD_PREVIOUS=$(readlink "$R$STORE/previous"); fi
OLD_VERSIONS=$(ls -1 "$R$STORE" 2>/dev/null | grep -Ev '^(current|previous)$' || true)

restore() {
    SNAPSHOT=0
    echo "   putting back what was installed before" >&2
    if [ "$HAD_UNIT" = 0 ] && [ -e "$R$UNIT" ] && [ "$SYSTEMD" = yes ]; then
        # Before the file goes: systemd forgets the enablement it made (the wants link and any alias).
        run systemctl disable --quiet faceberry.service || true
    fi
    if [ "$HAD_VENV" = 1 ]; then run rm -rf "$R$VENV"; run mv "$R$VENV.prev" "$R$VENV"; else run rm -rf "$R$VENV"; fi
    if [ "$HAD_CONFIG" = 1 ]; then run mv "$R$ETC/config.yaml.prev" "$R$ETC/config.yaml"; else run rm -f "$R$ETC/config.yaml"; fi
    if [ "$HAD_UNIT" = 1 ]; then run mv "$R$UNIT.prev" "$R$UNIT"; else run rm -f "$R$UNIT"; fi
    # A first install enabled nothing that would start at boot without a bundle or a checked config.
    [ "$HAD_WANTS" = 1 ] || run rm -f "$R$WANTS"
    [ "$HAD_LINK" = 1 ] || run rm -f "$R/usr/local/bin/faceberry"
    [ "$HAD_PASSWORD" = 1 ] || run rm -f "$R$ETC/mqtt_password"
    if [ "$HAD_DOC" = 1 ]; then run mv "$R$PREFIX/docs/PI.md.prev" "$R$PREFIX/docs/PI.md"; else run rm -f "$R$PREFIX/docs/PI.md"; fi
    # The store's links as they were (deploy moved current, and previous with it), then its new versions out.
    local link target v
    for link in current previous; do
        if [ "$link" = current ]; then target=$OLD_CURRENT; else target=$OLD_PREVIOUS; fi
        if [ -n "$target" ]; then
            run ln -sfn "$target" "$R$STORE/$link.tmp"
            run chown -h "$FB_UID:$FB_GID" "$R$STORE/$link.tmp"
            run mv -T "$R$STORE/$link.tmp" "$R$STORE/$link"
        elif [ -L "$R$STORE/$link" ]; then
            run rm -f "$R$STORE/$link"
        fi
    done
    for v in $(ls -1 "$R$STORE" 2>/dev/null | grep -Ev '^(current|previous)$' || true); do
        printf '%s\n' "$OLD_VERSIONS" | grep -qx "$v" || run rm -rf "$R$STORE/$v"
    done
    # The directories this run made, deepest first; anything left in one that it did not make stays.
    local i
    for ((i = ${#NEW_DIRS[@]} - 1; i >= 0; i--)); do
        case "${NEW_DIRS[$i]}" in
            "$PREFIX"|"$PREFIX/docs"|"$ETC"|"$STATE"|"$STORE") run rm -rf "$R${NEW_DIRS[$i]}" ;;
            *) [ ! -d "$R${NEW_DIRS[$i]}" ] || run rmdir --ignore-fail-on-non-empty "$R${NEW_DIRS[$i]}" ;;
        esac
    done
    if [ "$SYSTEMD" = yes ]; then
        run systemctl daemon-reload
        if [ "$WAS_ACTIVE" = 1 ]; then run systemctl start faceberry.service; echo "   restarted the previous version" >&2; fi
    fi
}
forget_snapshot() {
    SNAPSHOT=0
    run rm -rf "$R$VENV.prev" "$R$ETC/config.yaml.prev" "$R$UNIT.prev" "$R$PREFIX/docs/PI.md.prev"
}
# Whatever fails from here on (pip without network, a refused bundle, the check) puts the snapshot back.
SNAPSHOT=1
on_exit() {
    local rc=$?
    rm -f "${TMPFILES[@]}"
    if [ "$rc" != 0 ] && [ "$SNAPSHOT" = 1 ]; then
        restore
        echo "error: fix what is said above, then rerun this script" >&2
    fi
}
trap on_exit EXIT

# --- 5. package -----------------------------------------------------------------------------------------
step "5. package into $VENV"
run install -d -m 0755 "$R$PREFIX"
if [ ! -x "$R$VENV/bin/python" ] || ! grep -q '^include-system-site-packages = true' "$R$VENV/pyvenv.cfg" 2>/dev/null; then
    run python3 -m venv --system-site-packages "$R$VENV"
fi
PIP=("$R$VENV/bin/python" -m pip install --quiet)
if [ -n "$WHEELHOUSE" ]; then
    PIP+=(--no-index --find-links "$WHEELHOUSE")
    run "${PIP[@]}" faceberry
    run "${PIP[@]}" --force-reinstall --no-deps faceberry
else
    # The dependencies first (nothing to do when they are met), then the package itself, always: its
    # version number does not change with every commit. Built from the checkout by the venv's own
    # setuptools when it has one (offline), else in pip's isolated build environment.
    run "${PIP[@]}" -r "$REPO/requirements-device.txt"
    ISOLATION=()
    if [ -x "$R$VENV/bin/python" ] && "$R$VENV/bin/python" -c 'import setuptools, wheel' 2>/dev/null; then
        ISOLATION=(--no-build-isolation)
    fi
    run "${PIP[@]}" "${ISOLATION[@]}" --force-reinstall --no-deps "$REPO"
fi
# On everyone's PATH (sudo's too): `sudo faceberry status`, `sudo faceberry enroll …` from any directory.
run install -d -m 0755 "$R/usr/local/bin"
run ln -sfn "$VENV/bin/faceberry" "$R/usr/local/bin/faceberry"

# --- 6. files -------------------------------------------------------------------------------------------
step "6. config in $ETC, state in $STATE"
run install -d -m 0750 -o 0 -g "$FB_GID" "$R$ETC"
NO_CONFIG=0
if [ -n "$CONFIG" ]; then
    run install -m 0640 -o 0 -g "$FB_GID" "$CONFIG" "$R$ETC/config.yaml"
elif [ "$HAD_CONFIG" = 0 ]; then
    run install -m 0640 -o 0 -g "$FB_GID" "$HERE/faceberry.example.yaml" "$R$ETC/config.yaml"
    NO_CONFIG=1
fi
if [ ! -f "$R$ETC/mqtt_password" ]; then
    # Empty = no password. Put the broker password (one line) here; only root can read the file.
    run install -m 0600 -o 0 -g 0 /dev/null "$R$ETC/mqtt_password"
fi
# What the unit's StateDirectory= would make (faceberry, 0750), so that dashboard enrolment and
# `faceberry enroll` can add versions the daemon reads.
run install -d -m 0750 -o "$FB_UID" -g "$FB_GID" "$R$STATE" "$R$STORE"
if [ -n "$BUNDLE" ]; then
    # deploy verifies the bundle (checksums, models load) before it switches current to it.
    if ! run env PYTHONDONTWRITEBYTECODE=1 "$R$VENV/bin/faceberry" deploy --bundle "$BUNDLE" --store "$R$STORE" \
            --no-reload; then
        echo "error: the bundle was refused (see above)" >&2
        exit 1
    fi
    # Owned like the store (faceberry) whoever ran this, so the daemon can read it and enrolment add to it.
    run chown -R "$FB_UID:$FB_GID" "$R$STORE"
fi

# --- 7. unit --------------------------------------------------------------------------------------------
step "7. systemd unit"
run install -d -m 0755 "$R/etc/systemd/system"
UNIT_SRC=$(mktemp)
TMPFILES+=("$UNIT_SRC")
sed "s#/opt/faceberry#$PREFIX#g" "$HERE/faceberry.service" > "$UNIT_SRC"
# The unit's Documentation=file:$PREFIX/docs/PI.md: the guide of the version installed, readable offline.
if [ -f "$REPO/docs/PI.md" ]; then
    run install -d -m 0755 "$R$PREFIX/docs"
    run install -m 0644 "$REPO/docs/PI.md" "$R$PREFIX/docs/PI.md"
else
    echo "   no docs/PI.md beside this script: the unit's Documentation= ($PREFIX/docs/PI.md) is not installed"
fi
run install -m 0644 "$UNIT_SRC" "$R$UNIT"
if [ "$SYSTEMD" = yes ]; then
    run systemctl daemon-reload
    run systemctl enable --quiet faceberry.service
else
    # What `systemctl enable` does for WantedBy=multi-user.target, without a systemd to ask.
    run install -d -m 0755 "$R/etc/systemd/system/multi-user.target.wants"
    run ln -sfn "$UNIT" "$R/etc/systemd/system/multi-user.target.wants/faceberry.service"
fi

# --- 8. check -------------------------------------------------------------------------------------------
step "8. check"
CHECK=("$VENV/bin/faceberry" check --config "$ETC/config.yaml" "${CHECK_SKIP[@]}")
if [ "$NO_CONFIG" = 1 ]; then
    echo "   installed the example config: edit $ETC/config.yaml (device_id, camera, mqtt.host), then rerun"
    echo "   this script, or: sudo systemctl start faceberry"
    forget_snapshot
    echo "done (not started)"
    exit 0
fi
CHECK_OK=1
if [ "$SYSTEMD" = yes ]; then
    # The unit's own sandbox: every [Service] setting except how it starts, stops, restarts and notifies.
    PROPS=()
    while IFS= read -r line; do PROPS+=(-p "$line"); done < <(
        awk '/^\[/ { s = ($0 == "[Service]") } s && /^[A-Za-z]+=/' "$UNIT_SRC" |
        grep -Ev '^(Type|NotifyAccess|WatchdogSec|ExecStart|ExecReload|Restart|RestartSec|RestartPreventExitStatus|TimeoutStartSec|TimeoutStopSec|KillSignal)=')
    run systemd-run --quiet --pipe --wait --collect --unit=faceberry-check "${PROPS[@]}" "${CHECK[@]}" || CHECK_OK=0
elif [ -z "$R" ]; then
    run runuser -u "$USER_NAME" -- env PYTHONDONTWRITEBYTECODE=1 "${CHECK[@]}" || CHECK_OK=0
else
    # Another root's camera, broker and absolute bundle path are not this machine's: the config only
    # (faceberry deploy has verified the bundle).
    echo "   --root: checking the config only"
    run env PYTHONDONTWRITEBYTECODE=1 "$R$VENV/bin/faceberry" check --config "$R$ETC/config.yaml" \
        --skip bundle --skip camera --skip broker || CHECK_OK=0
fi
if [ "$CHECK_OK" = 0 ]; then
    echo "error: the check failed (see above)" >&2
    exit 1
fi
forget_snapshot

# --- 9. start -------------------------------------------------------------------------------------------
step "9. start"
if [ "$SYSTEMD" = no ]; then
    echo "   no booted systemd in $ROOT: the unit is enabled, NOT started; it starts at the next boot, or with"
    echo "   sudo systemctl start faceberry on the Pi"
elif [ "$START" = 1 ] || [ "$WAS_ACTIVE" = 1 ]; then
    run systemctl start faceberry.service
    echo "   started: journalctl -u faceberry -f; systemctl status faceberry"
else
    echo "   not started (--no-start): sudo systemctl start faceberry"
fi
echo "done"
