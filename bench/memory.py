"""Size and memory: the bundle on disk, and the daemon's RSS and start-up time on a real video.

    python -m bench.memory --bundle BUNDLE_DIR [--seconds 30] [--video PATH] [--threads 2]

Starts a throw-away mosquitto on a loopback port, writes a device config (camera = the video file,
played at its own frame rate like a live camera, looping), runs the real daemon (`python -m device run
--config …`) and samples its RSS from /proc every 50 ms. Reports:
- peak RSS (the kernel's VmHWM) and steady RSS (median of the samples after the first event);
- start-up: process start → retained `online` on the broker, and → first event on <prefix>/<id>/events;
- events received and the daemon's exit code after SIGTERM (a clean shutdown is 0).
A Raspberry Pi Zero 2 W has 512 MB; the issue's aim is under 150 MB. Linux only (/proc).

Writes bench/results/memory.json.
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

from bench.common import RESULTS, ROOT, SHARED_DATA, LocalBroker, describe, machine, table, write_result


def _proc_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def bundle_size(bundle_dir: Path) -> dict[str, int]:
    files = {p.name: p.stat().st_size for p in sorted(bundle_dir.iterdir()) if p.is_file()}
    return {"total_bytes": sum(files.values()), **files}


class Listener:
    """Subscribes to the daemon's topics and stamps the first `online` and the first event."""

    def __init__(self, host: str, port: int, device_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.online_at: float | None = None
        self.first_event_at: float | None = None
        self.events: list[dict[str, Any]] = []
        self.statuses: list[str] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="faceberry-bench-listener")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(f"faceberry/{device_id}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        with self.lock:
            if msg.topic.endswith("/status"):
                status = msg.payload.decode(errors="replace")
                self.statuses.append(status)
                if status == "online" and self.online_at is None:
                    self.online_at = now
            elif msg.topic.endswith("/events"):
                if self.first_event_at is None:
                    self.first_event_at = now
                self.events.append(json.loads(msg.payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def video_fps(path: Path) -> float:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    cap.release()
    return float(fps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="bundle the daemon runs")
    parser.add_argument("--video", type=Path, default=SHARED_DATA / "video" / "short_hamilton_clip.mp4",
                        help="video file played as the camera (default: the shared Hamilton clip)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long the daemon runs before SIGTERM (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="recognition.num_threads (default 2, as the example)")
    parser.add_argument("--fps", type=float, default=None,
                        help="camera.fps: play the video at this rate (default: its own frame rate; 0 = as fast "
                        "as it can be processed)")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json", help="JSON result (default %(default)s)")
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        print(f"error: {args.bundle} is not a bundle ; pass --bundle DIR written by python -m convert",
              file=sys.stderr)
        return 2
    if not args.video.is_file():
        print(f"error: {args.video} is absent ; pass --video FILE or put ../shared beside the repo", file=sys.stderr)
        return 2
    info = machine()
    fps = video_fps(args.video) if args.fps is None else args.fps
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="faceberry-mem-") as tmp:
        if broker is None:
            print("error: mosquitto is not installed ; apt install mosquitto (the daemon needs a broker)",
                  file=sys.stderr)
            return 2
        config = Path(tmp) / "config.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "bundle": str(args.bundle.resolve()), "device_id": "bench",
            "camera": {"source": "opencv", "device": str(args.video.resolve()), "fps": fps, "loop": True,
                       "name": "bench"},
            "recognition": {"num_threads": args.threads},
            "events": {"cooldown": 0},
            "mqtt": {"host": broker.host, "port": broker.port},
            "stats_interval": 10,
            # Its own outbox: what another run with device_id `bench` left would be replayed into this one.
            "state_dir": str(Path(tmp) / "state"),
        }))
        listener = Listener(broker.host, broker.port, "bench")
        log_path = Path(tmp) / "daemon.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(config)], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            samples: list[tuple[float, int]] = []
            peak = 0
            while time.monotonic() - started < args.seconds and proc.poll() is None:
                rss = _proc_kb(proc.pid, "VmRSS")
                peak = max(peak, _proc_kb(proc.pid, "VmHWM") or 0)
                if rss:
                    samples.append((time.monotonic() - started, rss))
                time.sleep(0.05)
            peak = max(peak, _proc_kb(proc.pid, "VmHWM") or 0)
            still_running = proc.poll() is None
            if still_running:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        time.sleep(0.3)
        listener.close()
        daemon_log = log_path.read_text(errors="replace")
    if not still_running:
        print(f"error: the daemon exited early with {code}:\n{daemon_log[-2000:]}", file=sys.stderr)
        return 1
    first_event = None if listener.first_event_at is None else listener.first_event_at - started
    online = None if listener.online_at is None else listener.online_at - started
    steady_from = first_event if first_event is not None else args.seconds / 2
    steady = [kb for t, kb in samples if t >= steady_from]
    stats_lines = [line for line in daemon_log.splitlines() if "stats:" in line]
    result = {
        "machine": info,
        "bundle": {"dir": str(args.bundle), "size": bundle_size(args.bundle)},
        "video": str(args.video), "camera_fps": fps, "threads": args.threads, "seconds": args.seconds,
        "peak_rss_mb": round(peak / 1024, 1),
        "steady_rss_mb": round(float(np.median(steady)) / 1024, 1) if steady else None,
        "steady_rss_max_mb": round(max(steady) / 1024, 1) if steady else None,
        "startup_to_online_s": None if online is None else round(online, 2),
        "startup_to_first_event_s": None if first_event is None else round(first_event, 2),
        "events": len(listener.events),
        "event_labels": sorted({e["label"] for e in listener.events}),
        "statuses": listener.statuses,
        "exit_code": code,
        "last_stats_line": stats_lines[-1] if stats_lines else None,
        "rss_samples_mb": [[round(t, 2), round(kb / 1024, 1)] for t, kb in samples[::10]],
    }
    size_mb = result["bundle"]["size"]["total_bytes"] / 1e6
    print(f"\ndaemon memory and start-up — {describe(info)}")
    print(table(["bundle size", "peak RSS", "steady RSS", "start → online", "start → first event", "events",
                 "exit after SIGTERM"],
                [[f"{size_mb:.2f} MB", f"{result['peak_rss_mb']} MB", f"{result['steady_rss_mb']} MB",
                  f"{result['startup_to_online_s']} s", f"{result['startup_to_first_event_s']} s",
                  result["events"], code]]))
    print(f"video {args.video.name} at {fps:g} fps, {args.threads} thread(s), {args.seconds:g} s; "
          f"{result['last_stats_line'] or ''}")
    path = write_result("memory", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
