"""The Raspberry Pi's environment: requirements-device.txt resolves to wheels for a 64-bit Pi, without
TensorFlow; and the requirement files hang together the way the README says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# 64-bit Raspberry Pi OS Bookworm: aarch64, glibc 2.36, CPython 3.11. pip does not widen an explicit
# --platform to older glibc versions, so every manylinux tag the Pi accepts is listed.
PI_PYTHON = "3.11"
PI_GLIBC_MINOR = 36
PI_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(17, PI_GLIBC_MINOR + 1)]
TENSORFLOW = re.compile(r"^(tensorflow|tf[-_]nightly|tf[-_]keras|keras|jax)([-_].*)?$", re.IGNORECASE)


def requirement_names(path: Path, seen: set[Path] | None = None) -> list[str]:
    """Project names in a requirements file, following `-r other.txt`."""
    seen = seen if seen is not None else set()
    if path in seen:
        return []
    seen.add(path)
    names: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            names += requirement_names(path.parent / line.split(None, 1)[1], seen)
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        assert match, f"{path.name}: cannot read requirement {raw!r}"
        names.append(match.group(1).lower().replace("_", "-"))
    return names


def test_device_requirements_name_no_tensorflow() -> None:
    names = requirement_names(ROOT / "requirements-device.txt")
    assert "ai-edge-litert" in names and "paho-mqtt" in names
    assert not [n for n in names if TENSORFLOW.match(n)], names
    assert "picamera2" not in names  # comes from apt on the Pi (python3-picamera2)


def test_train_requirements_include_the_device_ones() -> None:
    train = requirement_names(ROOT / "requirements-train.txt")
    dev = requirement_names(ROOT / "requirements-dev.txt")
    device = requirement_names(ROOT / "requirements-device.txt")
    assert set(device) <= set(train), "training makes crops with the device's own code, so it needs its packages"
    assert set(train) <= set(dev)
    assert any(n.startswith("tensorflow") for n in train)
    assert {"pytest", "ruff"} <= set(dev)


@pytest.mark.network
def test_device_requirements_resolve_for_raspberry_pi_aarch64(tmp_path: Path) -> None:
    """`pip download` of requirements-device.txt as binary wheels for the Pi: the same resolution pip does
    on the Pi itself, so a package without an aarch64 wheel (or a pin that excludes them) fails here."""
    if os.environ.get("FACEBERRY_OFFLINE"):
        pytest.skip("FACEBERRY_OFFLINE is set: this test needs the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", PI_PYTHON,
           "--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for platform in PI_PLATFORMS:
        cmd += ["--platform", platform]
    # pip judges platform_machine by this machine, not --platform, so the Pi-only caps are passed as plain
    # requirements: the download then proves they resolve together with everything else on the Pi.
    cmd += ["-r", str(ROOT / "requirements-device.txt"), *pi_only_caps(), "-d", str(tmp_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("pip download for aarch64 did not finish in 600 s (is the package index reachable?)")
    assert proc.returncode == 0, f"requirements-device.txt does not resolve for a 64-bit Pi:\n{proc.stderr[-3000:]}"
    wheels = sorted(p.name for p in tmp_path.glob("*.whl"))
    assert not list(tmp_path.glob("*.tar.gz")), "only wheels: the Pi must not compile anything"
    downloaded = {re.split(r"-\d", w, maxsplit=1)[0].lower().replace("_", "-") for w in wheels}
    for name in requirement_names(ROOT / "requirements-device.txt"):
        assert name in downloaded, f"{name} was not downloaded: {wheels}"
    for wheel in wheels:
        tags = wheel[:-4].split("-")[-1]
        assert tags == "any" or "aarch64" in tags, f"{wheel} is not a wheel for aarch64"
    assert not [w for w in wheels if TENSORFLOW.match(w.split("-")[0])], f"TensorFlow pulled in: {wheels}"
    numpy_wheel = next(w for w in wheels if w.startswith("numpy-"))
    assert numpy_wheel.startswith("numpy-1."), f"apt's picamera2 needs numpy 1.x on Bookworm: {numpy_wheel}"


def pi_only_caps() -> list[str]:
    """The requirements in requirements-device.txt that apply only on the Pi, without their markers."""
    from packaging.requirements import Requirement

    caps = []
    for raw in (ROOT / "requirements-device.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if ";" in line and "platform_machine" in line:
            req = Requirement(line)
            caps.append(f"{req.name}{req.specifier}")
    return caps


def test_numpy_is_capped_on_bookworm_only() -> None:
    """apt's picamera2 on Bookworm (Python 3.11) is built on numpy 1.24; Trixie (3.13) ships numpy 2; the
    workstation is free."""
    from packaging.requirements import Requirement

    def applies(env: dict[str, str]) -> set[str]:
        out = set()
        for raw in (ROOT / "requirements-device.txt").read_text(encoding="utf-8").splitlines():
            line = raw.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate(env):
                    out.add(f"{req.name}{req.specifier}")
        return out

    bookworm = applies({"platform_machine": "aarch64", "python_version": "3.11", "sys_platform": "linux"})
    trixie = applies({"platform_machine": "aarch64", "python_version": "3.13", "sys_platform": "linux"})
    x86 = applies({"platform_machine": "x86_64", "python_version": "3.11", "sys_platform": "linux"})
    assert "numpy<2" in bookworm and "numpy<2" not in trixie and "numpy<2" not in x86
    assert pi_only_caps() and all(c.split("<")[0] in {"numpy", "opencv-python-headless", "ml-dtypes", "ml_dtypes"}
                                  for c in pi_only_caps())
