"""faceberry as an installed package: pyproject.toml's metadata, and its console scripts from any directory.

The wheel is built from a copy of the project's packages (the repository is not written to) with the
workstation's setuptools, and installed with --no-deps into a fresh venv that sees .venv-device's
packages (the Pi's set) through a .pth file: nothing is downloaded, so it runs offline in seconds. The
commands then run from a temporary directory, so nothing is found through the checkout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.plugins.processes import run

tomllib = pytest.importorskip("tomllib")

# What the wheel is built from: the core and the card's folders (bench/ and tests/ are not installed).
PACKAGES = ("faceberry", "device", "train", "convert", "models")
DEVICE_VENV = ROOT / ".venv-device"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_lines(path: Path) -> list[str]:
    """A requirements file's requirements, as written (no comments, no -r includes)."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-r")):
            lines.append(line)
    return lines


def _norm(requirement: str) -> str:
    """Compare requirements the way pip reads them: case, spaces and quote style aside."""
    return re.sub(r"\s+", "", requirement).replace("'", '"').lower()


# ---- metadata ---------------------------------------------------------------------------------------

def test_dependencies_are_the_pis_requirements_file() -> None:
    project = _pyproject()
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements-device.txt"]}
    pi = [_norm(r) for r in _requirement_lines(ROOT / "requirements-device.txt")]
    assert any(r.startswith("pydantic") for r in pi) and any(r.startswith("paho-mqtt") for r in pi)
    assert not any("tensorflow" in r or "amqtt" in r for r in pi), "the Pi installs neither TensorFlow nor a broker"


def test_train_and_dev_extras_match_their_requirements_files() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    train = [_norm(r) for r in _requirement_lines(ROOT / "requirements-train.txt")]
    assert sorted(_norm(r) for r in extras["train"]) == sorted(train)
    dev = [_norm(r) for r in _requirement_lines(ROOT / "requirements-dev.txt")]
    assert sorted(_norm(r) for r in extras["dev"]) == sorted(dev)


def test_console_scripts_and_packages() -> None:
    project = _pyproject()
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"faceberry", "faceberry-train", "faceberry-convert"}
    for target in scripts.values():
        module, func = target.split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        assert f"def {func}() -> int:" in Path(spec.origin).read_text(encoding="utf-8")
    # One top-level name installed: faceberry. Every folder with an __init__.py is listed, under faceberry.
    listed = project["tool"]["setuptools"]["packages"]
    assert {name.split(".")[0] for name in listed} == {"faceberry"}
    folders = {"faceberry"} | {"faceberry." + ".".join(init.parent.relative_to(ROOT).parts)
                               for top in PACKAGES[1:] for init in (ROOT / top).rglob("__init__.py")
                               if "__pycache__" not in init.parts}
    assert set(listed) == folders, set(listed) ^ folders
    assert project["tool"]["setuptools"]["package-dir"] == {f"faceberry.{top}": top for top in PACKAGES[1:]}


# ---- built, installed, run --------------------------------------------------------------------------

def _builder() -> str:
    """An interpreter that can build the wheel offline (setuptools with bdist_wheel), else skip."""
    probe = ("import importlib.util, setuptools, sys; "
             "v = tuple(int(p) for p in setuptools.__version__.split('.')[:2]); "
             "sys.exit(0 if v >= (70, 1) or (v >= (62, 6) and importlib.util.find_spec('wheel')) else 1)")
    for python in (sys.executable, str(ROOT / ".venv" / "bin" / "python")):
        if Path(python).exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
            return python
    pytest.skip("no interpreter here has setuptools>=62.6 with bdist_wheel (pip install setuptools wheel)")


def _device_python() -> Path:
    python = DEVICE_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-device is absent (./quickstart.sh setup creates it)")
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the faceberry wheel and .venv-device's packages; returns its bin/ folder."""
    builder = _builder()
    device_python = _device_python()
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements-device.txt"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "work", "cache")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    wheels = tmp / "wheels"
    quiet = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run(
        [builder, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(wheels)],
        capture_output=True, text=True, timeout=120, env=quiet,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = wheels.glob("faceberry-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as whl:
        tops = {name.split("/")[0] for name in whl.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"faceberry"}, f"the wheel claims top-level names besides faceberry: {tops}"

    venv = tmp / "venv"
    made = subprocess.run([str(device_python), "-m", "venv", "--without-pip", str(venv)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    device_purelib = subprocess.run(
        [str(device_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    # --system-site-packages would show the base interpreter's packages, not .venv-device's: a .pth does.
    Path(purelib, "faceberry-device-env.pth").write_text(device_purelib + "\n", encoding="utf-8")
    install = subprocess.run(
        [str(device_python), "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=120, env=quiet,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FACEBERRY_DETECTOR", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return run(list(cmd), cwd=cwd, raw_env=env, timeout=60)


def test_faceberry_help_and_check_help_from_another_directory(installed: Path, tmp_path: Path) -> None:
    top = _run(installed, tmp_path, str(installed / "faceberry"), "--help")
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: faceberry ")
    assert all(command in top.stdout for command in ("run", "check", "eval", "enroll"))
    check = _run(installed, tmp_path, str(installed / "faceberry"), "check", "--help")
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("usage: faceberry check ") and "--config" in check.stdout


def test_exit_codes_come_back_through_the_scripts(installed: Path, tmp_path: Path) -> None:
    nothing = _run(installed, tmp_path, str(installed / "faceberry"))
    assert nothing.returncode == 2 and "usage: faceberry" in nothing.stderr
    # A check that fails (no config file) fails the process too, with the reason and no traceback.
    missing = _run(installed, tmp_path, str(installed / "faceberry"), "check", "--config", str(tmp_path / "none.yaml"))
    said = missing.stdout + missing.stderr
    assert missing.returncode != 0 and "none.yaml" in said and "Traceback" not in said
    # The Pi's environment has no TensorFlow: the workstation's commands say so in one line, exit 2.
    for script in ("faceberry-train", "faceberry-convert"):
        proc = _run(installed, tmp_path, str(installed / script), "--help")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"error: {script} needs the Python module 'tensorflow'")
        assert proc.stderr.count("\n") == 1
    # `faceberry train` and `faceberry convert` (the same tree's nodes) say it too, and how to get it.
    for command in ("train", "convert"):
        proc = _run(installed, tmp_path, str(installed / "faceberry"), command, "--help")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"error: faceberry {command} needs the Python module 'tensorflow'")
        assert proc.stderr.count("\n") == 1 and "requirements-train.txt" in proc.stderr


def test_installed_code_is_the_wheels_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = ("import sys; import faceberry.device as device, faceberry.models as models; print(device.__file__); "
            "print(models.default_detector_path()); sys.exit(0)")
    proc = _run(installed, tmp_path, str(installed / "python"), "-c", code)
    assert proc.returncode == 0, proc.stderr
    device_file, detector = (Path(line) for line in proc.stdout.splitlines())
    venv = installed.parent.resolve()
    assert device_file.resolve().is_relative_to(venv), device_file
    assert detector.resolve().is_relative_to(venv), detector  # models/ of the installed package
    repo_detector = ROOT / "models" / detector.name
    if repo_detector.exists():  # fetched before the build: the wheel carries it, byte for byte
        assert hashlib.sha256(detector.read_bytes()).digest() == hashlib.sha256(repo_detector.read_bytes()).digest()
    else:
        assert not detector.exists()
    env_chosen = subprocess.run(
        [str(installed / "python"), "-c", "import faceberry.models as m; print(m.default_detector_path())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "FACEBERRY_DETECTOR": str(tmp_path / "mine.tflite"), "PYTHONPATH": ""},
    )
    assert Path(env_chosen.stdout.strip()) == tmp_path / "mine.tflite"


def test_python_dash_m_keeps_working_in_the_checkout() -> None:
    proc = subprocess.run([sys.executable, "-m", "device", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m device ")
