"""Several cameras, one daemon: can one device serve 1, 2, 4 cameras at a camera's frame rate? (issue 23)

    nice -n 5 python -m bench.cameras --bundle BUNDLE_DIR                 # 1, 2 and 4 cameras, 40 s each
    nice -n 5 python -m bench.cameras --bundle BUNDLE_DIR --cameras 1 2 --seconds 20 --fps 15

For each camera count, the real daemon (`python -m device run`, its own composition root, loop and round
robin) reads that many folder cameras, each played at --fps (a live camera's pace: a frame the loop has not
taken when the next arrives is dropped and counted), looping. Each camera's frames are a person lingering at
640×480, made as bench/lingering.py makes them (../shared's photos/scenes/obama-720p.jpg covered to 640×480,
each frame shifted by up to 2 px and lit ±3 levels, JPEG), a different jitter per camera, then --away frames of
an empty scene: every pass of the folder is one visit, so each camera announces one event per pass
(tracking.max_age 3, events.cooldown 0; the rest is the config's defaults, recognition.reverify_every included).

Events go to a real mosquitto on a loopback port; a subscriber counts the distinct event_ids it is delivered.
After a warm-up (every camera has delivered frames, then --warmup seconds) the bench measures for --seconds:
per camera, frames recognised per second and frames dropped (from the daemon's status file, written every 5 s:
the window runs from one write to another); for the process, CPU % (its user + system time over the wall time,
100% = one core) and the peak RSS (VmHWM). Then SIGTERM, as from systemd; events lost = the events the daemon
says it published (its status file after the stop) − the distinct event_ids the subscriber got.

Prints a table and a projection to a Raspberry Pi 4 and 5, stated as a projection (no Pi was available): this
machine's CPU ms per frame scaled by the ratio of published per-core speeds for the same int8 model class
(--pi4-factor, --pi5-factor). Writes bench/results/cameras.json. Linux only (/proc). Not a test: nothing
here passes or fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import RESULTS, ROOT, LocalBroker, describe, machine, need_shared, table, write_result
from bench.lingering import still_jpegs

DEVICE = "cams"
TICK = os.sysconf("SC_CLK_TCK")


class Counter:
    """A subscriber to the device's events: the distinct event_ids delivered, per camera."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.ids: dict[str, str] = {}  # event_id -> camera
        self.received = 0
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="faceberry-bench-cameras")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"faceberry/{DEVICE}/events", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the event subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        event = json.loads(msg.payload)
        with self.lock:
            self.received += 1
            self.ids[event["event_id"]] = event.get("camera", "?")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_camera(dest: Path, photo: Path, linger: int, away: int, seed: int) -> int:
    """One camera's folder: a person lingering for `linger` frames, then `away` frames of nobody."""
    dest.mkdir(parents=True)
    frames = still_jpegs(photo, linger, seed)
    empty = np.full((480, 640, 3), 90, np.uint8)
    ok, blank = cv2.imencode(".jpg", empty, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    frames += [blank] * away
    for i, data in enumerate(frames):
        (dest / f"{i:05d}.jpg").write_bytes(data.tobytes())
    return len(frames)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def read_status(path: Path) -> tuple[float, dict[str, Any]] | None:
    try:
        mtime = path.stat().st_mtime
        return mtime, json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or caught mid-replace


def run_daemon(n: int, args: argparse.Namespace, tmp: Path, photo: Path) -> dict[str, Any]:
    """One daemon with `n` cameras: warm up, measure, stop; its figures."""
    work = tmp / f"n{n}"
    names = [f"cam{i + 1}" for i in range(n)]
    per_pass = 0
    for i, name in enumerate(names):
        per_pass = make_camera(work / name, photo, args.linger, args.away, seed=i)
    with LocalBroker() as broker:
        if broker is None:
            raise SystemExit("error: mosquitto is not installed ; apt install mosquitto")
        counter = Counter(broker.host, broker.port)
        state = work / "state"
        config = work / "config.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "bundle": str(args.bundle.resolve()), "device_id": DEVICE,
            "cameras": [{"name": name, "source": "folder", "device": str(work / name), "loop": True,
                         "fps": args.fps, "width": 640, "height": 480} for name in names],
            "tracking": {"max_age": 3},
            "events": {"cooldown": 0},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 10},
            "stats_interval": 10, "state_dir": str(state),
        }))
        status_path = state / f"status-{DEVICE}.json"
        log_path = work / "daemon.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(config)], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                window = measure(proc, status_path, names, args)
                rss_peak_kb = proc_kb(proc.pid, "VmHWM")
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
        final = read_status(status_path)
        published = final[1]["events"] if final else None
        deadline = time.monotonic() + 15
        while published is not None and len(counter.ids) < published and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        counter.close()
    with counter.lock:
        delivered = len(counter.ids)
        by_camera = {name: sum(1 for c in counter.ids.values() if c == name) for name in names}
    a, b = window["first"], window["last"]
    dt = b["t"] - a["t"]
    cameras = {}
    for name in names:
        ca, cb = a["status"]["cameras"][name], b["status"]["cameras"][name]
        cameras[name] = {"fps": round((cb["frames"] - ca["frames"]) / dt, 2),
                         "captured_fps": round((cb["captured"] - ca["captured"]) / dt, 2),
                         "dropped": cb["dropped"] - ca["dropped"], "frames": cb["frames"] - ca["frames"],
                         "state": cb["state"], "events_delivered": by_camera[name]}
    frames = sum(c["frames"] for c in cameras.values())
    cpu_s = b["cpu_s"] - a["cpu_s"]
    log_text = log_path.read_text(errors="replace")
    return {
        "cameras": n, "window_s": round(dt, 1), "per_camera": cameras,
        "fps_per_camera_min": min(c["fps"] for c in cameras.values()),
        "fps_total": round(frames / dt, 2), "dropped": sum(c["dropped"] for c in cameras.values()),
        "drop_pct": round(100 * sum(c["dropped"] for c in cameras.values())
                          / max(1, sum(c["dropped"] + c["frames"] for c in cameras.values())), 1),
        "cpu_pct": round(100 * cpu_s / dt, 1), "cpu_ms_per_frame": round(1000 * cpu_s / max(1, frames), 2),
        "rss_peak_mb": round(rss_peak_kb / 1024, 1), "frames_per_pass": per_pass,
        "ms_per_frame": b["status"].get("ms_per_frame"),
        "events_published": published, "events_delivered": delivered,
        "events_lost": None if published is None else max(0, published - delivered), "exit_code": code,
        "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        "errors_in_log": [line for line in log_text.splitlines() if "Traceback" in line or "ERROR" in line][:10],
    }


def measure(proc: subprocess.Popen, status_path: Path, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Two status-file writes --seconds apart, after the warm-up, each with the process CPU time of its moment."""
    deadline = time.monotonic() + 120
    warm_at: float | None = None
    first: dict[str, Any] | None = None
    seen = 0.0
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: the daemon exited with {proc.returncode} before the measurement ended")
        if time.monotonic() > deadline and first is None:
            raise SystemExit("error: the cameras did not all deliver frames within 120 s")
        time.sleep(0.1)
        got = read_status(status_path)
        if got is None or got[0] == seen:
            continue
        seen = got[0]
        sample = {"t": time.monotonic(), "cpu_s": proc_cpu_s(proc.pid), "status": got[1]}
        cams = got[1].get("cameras", {})
        if warm_at is None:
            if all(cams.get(name, {}).get("frames", 0) > 0 for name in names):
                warm_at = time.monotonic()
            continue
        if first is None:
            if time.monotonic() - warm_at >= args.warmup:
                first = sample
            continue
        if sample["t"] - first["t"] >= args.seconds - 1:
            return {"first": first, "last": sample}


def loop_ms(result: dict[str, Any]) -> float:
    """The recognition loop's own ms per frame (detect, align, classify, track and publish: one thread)."""
    return float(sum((result.get("ms_per_frame") or {}).values()))


def project(results: list[dict[str, Any]], fps: float, factors: dict[str, list[float]],
            cores: int = 4) -> list[dict[str, Any]]:
    """Per Pi and factor: a frame's CPU ms there (the process's, decoding included), the cores N cameras at
    `fps` keep busy, and the cameras at `fps` that fit: the fewer of what the loop (one thread: frames are
    recognised in turn) and what all `cores` can serve."""
    out = []
    for pi, span in factors.items():
        for factor in span:
            for r in results:
                ms, loop = r["cpu_ms_per_frame"] * factor, loop_ms(r) * factor
                fit = min(int(1000.0 / loop // fps) if loop else 0, int(cores * 1000.0 / ms // fps))
                out.append({"pi": pi, "factor": factor, "cameras": r["cameras"], "cpu_ms_per_frame": round(ms, 1),
                            "loop_ms_per_frame": round(loop, 1),
                            "cores_busy": round(r["cameras"] * fps * ms / 1000.0, 2), "cameras_that_fit": fit})
    return out


def report(payload: dict[str, Any], factors: dict[str, list[float]]) -> dict[str, Any]:
    """Print the measured table and the projection; the projection rows for the JSON."""
    results, fps = payload["results"], payload["fps"]
    print(f"\nOne daemon, N cameras of 640×480 at {fps:g} fps, a person lingering — {describe(payload['machine'])}")
    rows = [[r["cameras"], " / ".join(f"{c['fps']:.1f}" for c in r["per_camera"].values()),
             r["fps_total"], f"{r['dropped']} ({r['drop_pct']}%)", r["cpu_pct"], r["cpu_ms_per_frame"],
             f"{loop_ms(r):.2f}", r["rss_peak_mb"], f"{r['events_published']} / {r['events_delivered']}",
             r["events_lost"]] for r in results]
    print(table(["cameras", "fps per camera", "fps total", "dropped", "CPU % (100 = 1 core)", "CPU ms / frame",
                 "loop ms / frame", "RSS peak MB", "events published / delivered", "events lost"], rows))
    projection = project(results, fps, factors)
    print("\nPROJECTION, not a measurement (no Pi here): this machine's ms per frame × an assumed factor per Pi "
          "(4 cores)")
    print(table(["Pi", "factor", "cameras", "CPU ms / frame", "loop ms / frame", f"cores busy at {fps:g} fps each",
                 f"cameras at {fps:g} fps that fit"],
                [[p["pi"], f"×{p['factor']:g}", p["cameras"], p["cpu_ms_per_frame"], p["loop_ms_per_frame"],
                  p["cores_busy"], p["cameras_that_fit"]] for p in projection]))
    return {"factors": factors, "rows": projection}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cameras", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, metavar="DIR", help="the bundle the daemon runs")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4], metavar="N",
                        help="camera counts to run, one daemon each (default 1 2 4)")
    parser.add_argument("--fps", type=float, default=10.0, help="each camera's frame rate (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=40.0, help="measured seconds per count (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after every camera's first frame "
                        "before measuring (default %(default)s)")
    parser.add_argument("--linger", type=int, default=50, help="frames of the person per pass (default %(default)s)")
    parser.add_argument("--away", type=int, default=10, help="empty frames ending each visit (default %(default)s)")
    parser.add_argument("--photo", type=Path, default=None,
                        help="the lingering person (default ../shared/data/photos/scenes/obama-720p.jpg)")
    parser.add_argument("--pi4-factor", type=float, nargs=2, default=[8.0, 15.0], metavar=("LOW", "HIGH"),
                        help="a Pi 4 core's CPU time for the same work ÷ this machine's core's, an assumed range "
                             "(default 8 15: see docs/BENCHMARKS.md, Several cameras)")
    parser.add_argument("--pi5-factor", type=float, nargs=2, default=[3.0, 6.0], metavar=("LOW", "HIGH"),
                        help="the same for a Pi 5 (default 3 6)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cameras.json", help="JSON result (default %(default)s)")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="print the tables of an earlier run's JSON (with these factors) instead of running")
    args = parser.parse_args(argv)
    factors = {"Pi 4": args.pi4_factor, "Pi 5": args.pi5_factor}
    if args.report is not None:
        report(json.loads(args.report.read_text()), factors)
        return 0
    if args.bundle is None or not (args.bundle / "manifest.json").is_file():
        print(f"error: {args.bundle} is not a bundle ; pass --bundle DIR written by python -m convert", file=sys.stderr)
        return 2
    if min(args.cameras) < 1 or args.fps <= 0 or args.seconds < 5 or args.linger < 1 or args.away < 4:
        parser.error("--cameras ≥ 1, --fps > 0, --seconds ≥ 5, --linger ≥ 1 and --away ≥ 4 (to end the track)")
    photo = args.photo or need_shared("photos", "scenes", "obama-720p.jpg")
    info = machine()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="faceberry-bench-cameras-") as tmp:
        for n in args.cameras:
            print(f"{n} camera(s)…", file=sys.stderr, flush=True)
            results.append(run_daemon(n, args, Path(tmp), photo))
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    payload = {"machine": info, "fps": args.fps, "seconds": args.seconds, "linger": args.linger, "away": args.away,
               "photo": str(photo), "bundle": str(args.bundle), "results": results}
    payload["projection"] = report(payload, factors)
    path = write_result("cameras", payload, args.out)
    print(f"\nwrote {path}")
    return 0 if all(r["events_lost"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
