#!/usr/bin/env bash
# The Raspberry Pi path, emulated: a Debian Bookworm arm64 root (what Raspberry Pi OS Bookworm is built on)
# run under qemu-user, systemd/install.sh into it, then `faceberry check` and `faceberry eval` there, and
# every decision and score compared with the same eval on this x86 machine.
#
#   sudo bench/pi_emulation.sh [--work DIR] [--photos N] [--stage rootfs|bundle|install|eval|all]
#
#   --work DIR   where the arm64 root, the bundle and the logs go (default /var/tmp/faceberry-pi-emu;
#                about 800 MB). Each stage reuses what an earlier run left there.
#   --photos N   stranger photos of ../shared/data/faces/lfw-dev in the eval, besides the 25 validation
#                photos of five-celebrities (default 200)
#   --stage S    run the stages up to S (default all)
#
# Needs root (debootstrap, chroot, mounts) and the Debian packages debootstrap, qemu-user-static and
# binfmt-support. Results: a table on stdout and bench/results/pi_emulation.json.
#
# Why a fake /proc/cpuinfo: LiteRT 2.3 (its cpuinfo library) reads /proc/cpuinfo to pick its ARM kernels;
# under qemu-user it sees the HOST's x86 cpuinfo, finds no ARM core it knows, and segfaults in
# allocate_tensors. A Raspberry Pi 4's cpuinfo (4 × Cortex-A72) bind-mounted over /proc/cpuinfo in the
# root fixes that; on a real Pi nothing of the sort is needed. The CPU list in /sys and qemu's CPU model are
# a Pi 4's too (see ROOT_ENV): a mixture gave wrong embeddings.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
SHARED="${FACEBERRY_SHARED:-$REPO/../shared}"
WORK=/var/tmp/faceberry-pi-emu
PHOTOS=200
STAGE=all
MIRROR=http://deb.debian.org/debian

while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK="${2:?--work needs a directory}"; shift 2 ;;
        --photos) PHOTOS="${2:?--photos needs a number}"; shift 2 ;;
        --stage) STAGE="${2:?--stage needs a name}"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "error: $*" >&2; exit 1; }
say() { echo "== $(date -u +%H:%M:%S) $*"; }
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mounts need it): sudo $0"
[ -d "$SHARED/data/faces" ] || die "$SHARED/data/faces is absent; set FACEBERRY_SHARED to the shared folder"
for tool in debootstrap qemu-aarch64-static update-binfmts; do
    command -v "$tool" >/dev/null || die "$tool is missing: sudo apt-get install debootstrap qemu-user-static binfmt-support"
done
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || die "$PY is missing: ./quickstart.sh setup first (the x86 side trains and converts the bundle)"

ROOT="$WORK/root"
mkdir -p "$WORK" "$REPO/bench/results"
TIMES="$WORK/times.env"
touch "$TIMES"
stage_wanted() {  # stages run in order; --stage S stops after S
    local order="rootfs bundle install eval all"
    [ "$STAGE" = all ] && return 0
    local s
    for s in $order; do
        [ "$s" = "$1" ] && return 0
        [ "$s" = "$STAGE" ] && return 1
    done
    return 1
}

# --- qemu-user: aarch64 binaries run through binfmt_misc ---------------------------------------------
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "qemu-aarch64 is not registered with binfmt_misc"

MOUNTED=()
cleanup() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTED[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_root() {
    [ ${#MOUNTED[@]} -eq 0 ] || return 0
    mount -t proc proc "$ROOT/proc"; MOUNTED+=("$ROOT/proc")
    mount --bind "$WORK/cpuinfo" "$ROOT/proc/cpuinfo"; MOUNTED+=("$ROOT/proc/cpuinfo")
    # A Pi's CPU list instead of the host's /sys (nothing here needs the rest of /sys); see QEMU_CPU below.
    mount --bind "$WORK/sys" "$ROOT/sys"; MOUNTED+=("$ROOT/sys")
    mount --rbind /dev "$ROOT/dev"; MOUNTED+=("$ROOT/dev")
    mkdir -p "$ROOT/shared"
    mount --bind -o ro "$SHARED" "$ROOT/shared"; MOUNTED+=("$ROOT/shared")
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # Behind a TLS-inspecting proxy (its CA added to this machine's /usr/local/share/ca-certificates),
    # the root must trust that CA too, or pip cannot reach PyPI; elsewhere this does nothing.
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        mkdir -p "$ROOT/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
        in_root update-ca-certificates > /dev/null 2>&1
        ROOT_ENV+=(PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
    fi
}
# The emulated CPU is a Pi 4's everywhere LiteRT looks: /proc/cpuinfo and /sys/devices/system/cpu say
# 4 × Cortex-A72, and QEMU_CPU makes qemu emulate that core (its hwcaps: no dotprod, i8mm or SVE). With
# qemu's default "max" CPU under an A72 cpuinfo and CPU list, LiteRT's int8 embedder returned the same
# embedding for every face (measured: every probe scored 0.906928); with the host's x86 /sys it did too.
ROOT_ENV=(PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU=cortex-a72)
in_root() { chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" "$@"; }

# A Raspberry Pi 4 Model B (BCM2711, 4 × Cortex-A72), as its kernel prints it: one block per core.
{
    for i in 0 1 2 3; do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n'
        printf 'CPU revision\t: 3\n\n'
    done
    printf 'Hardware\t: BCM2835\nRevision\t: c03115\nSerial\t\t: 10000000emulated\n'
    printf 'Model\t\t: Raspberry Pi 4 Model B Rev 1.5\n'
} > "$WORK/cpuinfo"

mkdir -p "$WORK/sys/devices/system/cpu"
for f in possible present online; do echo 0-3 > "$WORK/sys/devices/system/cpu/$f"; done
for i in 0 1 2 3; do mkdir -p "$WORK/sys/devices/system/cpu/cpu$i"; done

# --- 1. the arm64 root ---------------------------------------------------------------------------------
if stage_wanted rootfs && [ ! -f "$ROOT/.faceberry-rootfs-done" ]; then
    say "debootstrap bookworm arm64 into $ROOT (minbase + systemd + python3, as on Raspberry Pi OS Lite)"
    rm -rf "$ROOT"
    start=$(date +%s)
    debootstrap --arch=arm64 --variant=minbase --include=systemd,python3,ca-certificates \
        bookworm "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    echo "ROOTFS_S=$(( $(date +%s) - start ))" >> "$TIMES"
    touch "$ROOT/.faceberry-rootfs-done"
fi

# --- 2. the bundle, trained and converted on x86 (the laptop's side) -----------------------------------
B="$WORK/x86"
FACES="$SHARED/data/faces"
if stage_wanted bundle && [ ! -f "$B/bundle/manifest.json" ]; then
    say "bundle: dlib-resnet backbone, five-celebrities/train, int8 (x86, $PY)"
    mkdir -p "$B"
    (cd "$REPO" && "$PY" -m train backbone --arch dlib-resnet --out "$B/backbone" --force) > "$B/train.log" 2>&1
    (cd "$REPO" && "$PY" -m train --photos "$FACES/five-celebrities/train" --out "$B/run" --backbone "$B/backbone" \
        --force) >> "$B/train.log" 2>&1
    (cd "$REPO" && "$PY" -m convert --run "$B/run" --out "$B/bundle.tmp") >> "$B/train.log" 2>&1
    mv "$B/bundle.tmp" "$B/bundle"
fi

# The eval photos: the 25 validation photos of the bundle's people, and N strangers from LFW (the first
# photos of each person, in name order, until N), as symlinks that resolve both here and in the root.
EVAL="$WORK/photos"
if [ ! -d "$EVAL" ]; then
    mkdir -p "$EVAL.tmp"
    for person in "$FACES/five-celebrities/val"/*/; do
        name=$(basename "$person"); mkdir -p "$EVAL.tmp/$name"
        for f in "$person"*; do ln -s "/shared/data/faces/five-celebrities/val/$name/$(basename "$f")" "$EVAL.tmp/$name/"; done
    done
    n=0
    for person in "$FACES/lfw-dev"/*/; do
        name=$(basename "$person"); k=0
        for f in "$person"*.jpg; do
            [ "$n" -lt "$PHOTOS" ] && [ "$k" -lt 4 ] || break
            mkdir -p "$EVAL.tmp/$name"; ln -s "/shared/data/faces/lfw-dev/$name/$(basename "$f")" "$EVAL.tmp/$name/"
            n=$((n + 1)); k=$((k + 1))
        done
        [ "$n" -lt "$PHOTOS" ] || break
    done
    mv "$EVAL.tmp" "$EVAL"
fi

# --- 3. install.sh inside the root (no booted systemd there: it enables the unit and does not start it) --
if stage_wanted install && [ ! -f "$WORK/install.done" ]; then
    mount_root
    # A copy of the checkout, as `rsync … USER@HOST:faceberry/` makes one on the Pi (and a script being
    # edited here while bash reads it there would not be the script that started).
    rsync -a --delete --exclude '.venv*' --exclude build --exclude '*.egg-info' --exclude __pycache__ \
        --exclude bench/results "$REPO/" "$ROOT/src/"
    rm -rf "$ROOT/tmp/bundle" && cp -r "$B/bundle" "$ROOT/tmp/bundle"
    sed -e 's#^  source: picamera2#  source: folder#' -e 's#^  device: 0#  device: /tmp/photos#' \
        -e 's#^device_id: front-door#device_id: pi-emulation#' "$REPO/systemd/faceberry.example.yaml" > "$ROOT/tmp/config.yaml"
    rm -rf "$ROOT/tmp/photos" && cp -r "$EVAL" "$ROOT/tmp/photos"
    say "install.sh in the arm64 root (log: $WORK/install.log)"
    start=$(date +%s)
    # The broker is skipped: there is none in the root, and the check's other lines are the point here.
    in_root bash /src/systemd/install.sh --bundle /tmp/bundle --config /tmp/config.yaml --check-skip broker \
        2>&1 | tee "$WORK/install.log"
    echo "INSTALL_S=$(( $(date +%s) - start ))" >> "$TIMES"
    echo "VENV_MB=$(du -sm "$ROOT/opt/faceberry/venv" | cut -f1)" >> "$TIMES"
    touch "$WORK/install.done"
fi

# --- 4. check and eval there, eval here, compare --------------------------------------------------------
if stage_wanted eval; then
    mount_root
    say "faceberry check in the root, as the faceberry user"
    in_root runuser -u faceberry -- /opt/faceberry/venv/bin/faceberry check --config /etc/faceberry/config.yaml \
        --skip broker 2>&1 | tee "$WORK/check.log"
    say "faceberry eval in the root (arm64 under qemu; log: $WORK/eval-arm64.log)"
    start=$(date +%s)
    in_root /opt/faceberry/venv/bin/faceberry eval --bundle /var/lib/faceberry/bundles/current --photos /tmp/photos \
        --json /tmp/eval-arm64.json --quiet > "$WORK/eval-arm64.log" 2>&1 || { tail -20 "$WORK/eval-arm64.log"; die "eval failed in the root"; }
    echo "EVAL_ARM64_S=$(( $(date +%s) - start ))" >> "$TIMES"
    cp "$ROOT/tmp/eval-arm64.json" "$WORK/eval-arm64.json"
    in_root /opt/faceberry/venv/bin/python -c 'import numpy, cv2, ai_edge_litert, platform, sys
print(f"ARM_PYTHON={platform.python_version()}"); print(f"ARM_MACHINE={platform.machine()}")
print(f"ARM_NUMPY={numpy.__version__}"); print(f"ARM_OPENCV={cv2.__version__}")' >> "$TIMES"
    say "the same eval on x86"
    # Same relative paths as in the root: /shared is this machine's shared folder.
    rm -rf "$WORK/photos-x86" && mkdir -p "$WORK/photos-x86"
    (cd "$EVAL" && find . -type l) | while read -r link; do
        mkdir -p "$WORK/photos-x86/$(dirname "$link")"
        ln -s "$SHARED/$(readlink "$EVAL/$link" | sed 's#^/shared/##')" "$WORK/photos-x86/$link"
    done
    (cd "$REPO" && "$REPO/.venv-device/bin/python" -m device eval --bundle "$B/bundle" --photos "$WORK/photos-x86" \
        --json "$WORK/eval-x86.json" --quiet) > "$WORK/eval-x86.log" 2>&1
    "$REPO/.venv-device/bin/python" - "$WORK" "$REPO/bench/results/pi_emulation.json" <<'PYEOF'
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
times = dict(line.split("=", 1) for line in (work / "times.env").read_text().split() if "=" in line)
arm = json.loads((work / "eval-arm64.json").read_text())
x86 = json.loads((work / "eval-x86.json").read_text())
a = {p["path"]: p for p in arm["probes"]}
b = {p["path"]: p for p in x86["probes"]}
common = sorted(set(a) & set(b))
same = [k for k in common if a[k]["predicted"] == b[k]["predicted"]]
diffs = [abs(a[k]["score"] - b[k]["score"]) for k in common]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
result = {
    "date": time.strftime("%Y-%m-%d", time.gmtime()),
    "machine": f"{cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, "
               f"{platform.system()} {platform.release()}",
    "root": "Debian 12 Bookworm arm64 (debootstrap minbase), qemu-aarch64-static user emulation",
    "arm64": {k[4:].lower(): v for k, v in times.items() if k.startswith("ARM_")},
    "install_s": int(times.get("INSTALL_S", 0)), "venv_mb": int(times.get("VENV_MB", 0)),
    "rootfs_s": int(times.get("ROOTFS_S", 0)), "eval_arm64_s": int(times.get("EVAL_ARM64_S", 0)),
    "photos": {"arm64": len(a), "x86": len(b), "compared": len(common)},
    "decisions_equal": len(same), "decisions_differ": sorted(set(common) - set(same)),
    "max_score_diff": max(diffs) if diffs else None,
    "only_in_one": sorted(set(a) ^ set(b)),
    "known_accuracy": {"arm64": arm.get("known_accuracy"), "x86": x86.get("known_accuracy")},
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"{'':24}{'arm64 (qemu)':>16}{'x86':>16}")
print(f"{'photos evaluated':24}{len(a):>16}{len(b):>16}")
print(f"{'known accuracy':24}{arm.get('known_accuracy', 0):>16.4f}{x86.get('known_accuracy', 0):>16.4f}")
print(f"decisions equal: {len(same)} of {len(common)}; largest score difference: {result['max_score_diff']}")
print(f"install: {result['install_s']} s, venv: {result['venv_mb']} MB, eval under qemu: {result['eval_arm64_s']} s")
print(f"wrote {out}")
PYEOF
fi
