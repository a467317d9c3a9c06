"""What every benchmark shares: where results go, the machine description, statistics, tables,
a throw-away mosquitto, and the separate venv that holds the face_recognition (dlib) peer."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SHARED_DATA = Path(os.environ.get("FACEBERRY_SHARED", ROOT.parent / "shared")).resolve() / "data"
RESULTS = ROOT / "bench" / "results"
PEER_VENV = Path(os.environ.get("FACEBERRY_PEER_VENV", ROOT / ".venv-bench"))
PEER_WORKER = ROOT / "bench" / "peer_face_recognition.py"
SHARED_WEIGHTS = SHARED_DATA / "weights" / "mobilenet_v2_1.0_224_no_top.weights.h5"


def need_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        sys.exit(f"error: {path} is absent ; put the shared data beside the repo as ../shared "
                 "(or set FACEBERRY_SHARED)")
    return path


def machine() -> dict[str, Any]:
    """The machine the figures come from, as the docs quote it."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    info: dict[str, Any] = {
        "arch": platform.machine(),
        "cores": cores,
        "cpu": model,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        from importlib.metadata import version

        info["ai_edge_litert"] = version("ai-edge-litert")
        info["opencv"] = version("opencv-python-headless")
    except Exception:
        pass
    return info


def describe(info: dict[str, Any]) -> str:
    return f"{info['arch']}, {info['cores']} cores, {info['cpu']}, load {info['loadavg_at_start'][0]}"


def stats(values: list[float] | np.ndarray) -> dict[str, float | int | None]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"median": None, "p95": None, "mean": None, "n": 0}
    return {
        "median": round(float(np.median(arr)), 3),
        "p95": round(float(np.percentile(arr, 95)), 3),
        "mean": round(float(arr.mean()), 3),
        "n": int(arr.size),
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain, aligned text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [["—" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def fmt(r: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"
    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def fmt_ms(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("median") is None:
        return "—"
    return f"{stat['median']:.2f} / {stat['p95']:.2f}"


def pct(value: float | None, digits: int = 1) -> str:
    """A share as a percentage, "—" where there is none."""
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def peer_python() -> Path | None:
    """The peer venv's python, if face_recognition is installed there (bench/setup_peer.sh)."""
    py = PEER_VENV / "bin" / "python"
    if not py.is_file():
        return None
    ok = subprocess.run([str(py), "-c", "import face_recognition, dlib"], capture_output=True, check=False)
    return py if ok.returncode == 0 else None


def run_peer(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run bench/peer_face_recognition.py in the peer venv; returns its JSON result."""
    py = peer_python()
    if py is None:
        raise RuntimeError(f"face_recognition is not installed in {PEER_VENV}; run `bash bench/setup_peer.sh`")
    with tempfile.TemporaryDirectory(prefix="faceberry-peer-") as tmp:
        out = Path(tmp) / "peer.json"
        proc = subprocess.run([str(py), str(PEER_WORKER), *args, "--out", str(out)], check=False, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the face_recognition worker failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalBroker:
    """A throw-away mosquitto on a loopback port, or nothing when mosquitto is not installed."""

    def __init__(self) -> None:
        self.binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None)
        self.proc: subprocess.Popen | None = None
        self.host, self.port = "127.0.0.1", 0
        self._dir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> LocalBroker | None:
        if self.binary is None:
            return None
        self._dir = tempfile.TemporaryDirectory(prefix="faceberry-bench-mqtt-")
        self.port = _free_port()
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        return None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
