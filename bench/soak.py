"""Soak: the real daemon over a looping camera for tens of thousands of frames, with the broker stopped and
restarted several times under it; nothing may be lost and nothing may grow.

    python -m bench.soak --bundle BUNDLE_DIR [--frames 50000] [--outages 5] [--outage-s 20]

(the tiny test bundle works: .pytest_cache/d/faceberry-softmax/*/bundle after a test run that built it)

Builds a camera folder of small frames (320×240 by default) from ../shared/data/faces/lfw-dev: face photos
of several people, each followed by an empty frame, so every face is a new track and an event
(tracking.votes_needed 1, max_age 0, events.cooldown 0): thousands of events, each one counted. Starts a
persistent mosquitto on a loopback port (sessions kept across its restarts, no per-client queue limit) and a
subscriber with a persistent QoS 1 session, runs `python -m device run`, and stops the broker for
`--outage-s` seconds `--outages` times, evenly spread over the first `--frames` (the daemon keeps processing;
its events wait in the durable outbox). Once the frames are done and the outbox has drained, the daemon gets
SIGTERM, as from systemd.

Samples the daemon's RSS, open file descriptors and outbox rows (from /proc and its status file) every 2 s.
Reports frames, outages, RSS/fds/outbox at start (after the first 1,000 frames: models loaded, caches warm)
and at the end, events the daemon published (its own count) against distinct `event_id`s the subscriber got
(events lost; at-least-once delivery may duplicate: counted), events out of order, and the outbox left on disk.

Writes bench/results/soak.json. Linux only (/proc). Takes about frames / fps: 15-30 minutes on two cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import RESULTS, ROOT, SHARED_DATA, _free_port, describe, machine, table, write_result

DEVICE = "soak"


class Broker:
    """mosquitto with persistence on a fixed port: stop() and start() keep sessions and the port."""

    def __init__(self, workdir: Path) -> None:
        self.binary = next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
                            if Path(p).is_file()), None)
        self.host, self.port = "127.0.0.1", _free_port()
        self.conf = workdir / "mosquitto.conf"
        # max_queued_messages 0: the subscriber's offline queue is unbounded, so a loss can only be ours.
        self.conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {workdir}/\nmax_queued_messages 0\n"
                             f"user {os.environ.get('USER', 'root')}\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(self.binary), "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not self._accepts():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-500:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its sessions first
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        while self._accepts():
            time.sleep(0.05)


class Counter:
    """A subscriber with a persistent session: every event payload it receives, in arrival order."""

    def __init__(self, broker: Broker) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.ids: list[str] = []
        self.stamps: list[str] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="faceberry-soak-counter", clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"faceberry/{DEVICE}/events", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        event = json.loads(msg.payload)
        with self.lock:
            self.ids.append(event["event_id"])
            self.stamps.append(event["timestamp"])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_frames(dest: Path, people: int, per_person: int, size: tuple[int, int]) -> int:
    """Face photos (people interleaved) each followed by an empty frame; returns the number of frames."""
    from faceberry.contract import list_images

    lfw = SHARED_DATA / "faces" / "lfw-dev"
    folders = [p for p in sorted(lfw.iterdir()) if p.is_dir() and len(list_images(p)) >= per_person][:people]
    if not folders:
        raise SystemExit(f"error: no photos in {lfw} ; put the shared data beside the repo as ../shared")
    dest.mkdir(parents=True)
    w, h = size
    blank = np.full((h, w, 3), 90, np.uint8)
    n = 0
    for i in range(per_person):
        for folder in folders:
            photo = list_images(folder)[i]
            image = cv2.imread(str(photo))
            scale = min(w / image.shape[1], h / image.shape[0])
            small = cv2.resize(image, (int(image.shape[1] * scale), int(image.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
            frame = blank.copy()
            y, x = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
            frame[y:y + small.shape[0], x:x + small.shape[1]] = small
            cv2.imwrite(str(dest / f"{n:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
            cv2.imwrite(str(dest / f"{n + 1:05d}.jpg"), blank)
            n += 2
    return n


def sample(pid: int, status_file: Path, outbox: Path) -> dict[str, Any] | None:
    try:
        status = json.loads(status_file.read_text())
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, StopIteration):
        return None
    try:
        with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=1) as db:
            rows = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    except sqlite3.Error:
        rows = status.get("mqtt", {}).get("pending")
    return {"t": round(time.monotonic(), 1), "frames": status.get("frames", 0), "rss_mb": round(rss_kb / 1024, 1),
            "fds": fds, "outbox_rows": rows, "outbox_bytes": outbox.stat().st_size if outbox.exists() else 0,
            "mqtt": status.get("mqtt_state")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="bundle the daemon runs")
    parser.add_argument("--frames", type=int, default=50_000, help="frames the daemon processes (default %(default)s)")
    parser.add_argument("--outages", type=int, default=5, help="broker outages injected (default %(default)s)")
    parser.add_argument("--outage-s", type=float, default=20.0, help="seconds each outage lasts (default %(default)s)")
    parser.add_argument("--people", type=int, default=12, help="people in the camera folder (default %(default)s)")
    parser.add_argument("--per-person", type=int, default=5, help="photos of each (default %(default)s)")
    parser.add_argument("--size", default="320x240", help="frame size WxH (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="recognition.num_threads (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="JSON result (default %(default)s)")
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        print(f"error: {args.bundle} is not a bundle ; pass --bundle DIR written by python -m convert", file=sys.stderr)
        return 2
    size = tuple(int(v) for v in args.size.lower().split("x"))
    info = machine()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="faceberry-soak-") as tmp_name:
        tmp = Path(tmp_name)
        per_pass = make_frames(tmp / "camera", args.people, args.per_person, size)  # type: ignore[arg-type]
        (tmp / "broker").mkdir()
        broker = Broker(tmp / "broker")
        if broker.binary is None:
            print("error: mosquitto is not installed ; apt install mosquitto", file=sys.stderr)
            return 2
        broker.start()
        counter = Counter(broker)
        state = tmp / "state"
        config = tmp / "config.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "bundle": str(args.bundle.resolve()), "device_id": DEVICE,
            "camera": {"source": "folder", "device": str(tmp / "camera"), "loop": True, "name": "soak"},
            "recognition": {"num_threads": args.threads},
            "tracking": {"votes_needed": 1, "max_age": 0},
            "events": {"cooldown": 0},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5, "reconnect_max_delay": 2,
                     "outbox": {"max_messages": 1_000_000, "max_bytes": 1_000_000_000}},
            "stats_interval": 2, "state_dir": str(state),
        }))
        status_file, outbox = state / f"status-{DEVICE}.json", state / f"outbox-{DEVICE}.sqlite3"
        log_path = tmp / "daemon.log"
        # Outages spread over the run; after the last one the daemon runs until its outbox is empty.
        marks = [int(args.frames * (i + 1) / (args.outages + 1)) for i in range(args.outages)]
        samples: list[dict[str, Any]] = []
        outages: list[dict[str, Any]] = []
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(config)], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            down_since: float | None = None
            last_print = 0.0
            stop_sent = False
            drain_since: float | None = None
            while proc.poll() is None:
                time.sleep(2)
                s = sample(proc.pid, status_file, outbox)
                if s is None:
                    continue
                samples.append(s)
                done = s["frames"] >= args.frames and not marks and down_since is None
                if done and drain_since is None:
                    drain_since = time.monotonic()
                # Events keep coming, so a few rows are always in flight; the stop delivers those.
                drained = (s["outbox_rows"] or 0) < 50 and s["mqtt"] == "connected"
                if not stop_sent and done and (drained or time.monotonic() - drain_since > 300):
                    # Every outage over and the outbox drained: a normal stop (SIGTERM, as systemd does).
                    proc.send_signal(signal.SIGTERM)
                    stop_sent = True
                elif down_since is None and marks and s["frames"] >= marks[0]:
                    marks.pop(0)
                    broker.stop()
                    down_since = time.monotonic()
                    outages.append({"at_frame": s["frames"], "outbox_rows_before": s["outbox_rows"]})
                elif down_since is not None and time.monotonic() - down_since >= args.outage_s:
                    broker.start()
                    outages[-1].update(seconds=round(time.monotonic() - down_since, 1),
                                       outbox_rows_at_restart=s["outbox_rows"])
                    down_since = None
                if time.monotonic() - last_print > 60:
                    last_print = time.monotonic()
                    print(f"{s['frames']} frames, rss {s['rss_mb']} MB, fds {s['fds']}, outbox {s['outbox_rows']}, "
                          f"mqtt {s['mqtt']}, outages {len(outages)}", flush=True)
            code = proc.wait()
        if broker.proc is None:
            broker.start()
        elapsed = time.monotonic() - t0
        status = json.loads(status_file.read_text())
        published = status["events"]
        left = 0
        if outbox.exists():
            with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as db:
                left = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        deadline = time.monotonic() + 60
        while len(set(counter.ids)) < published and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        counter.close()
        broker.stop()
        daemon_log = log_path.read_text(errors="replace")
    with counter.lock:
        ids, stamps = list(counter.ids), list(counter.stamps)
    distinct = len(set(ids))
    first_seen: dict[str, str] = {}
    for event_id, stamp in zip(ids, stamps, strict=True):
        first_seen.setdefault(event_id, stamp)
    ordered = list(first_seen.values())
    out_of_order = sum(1 for a, b in itertools.pairwise(ordered) if b < a)
    start = next((s for s in samples if s["frames"] >= 1000), samples[0] if samples else None)
    end = samples[-1] if samples else None
    result = {
        "date": started_at, "machine": info, "bundle": str(args.bundle), "frame_size": list(size),
        "frames_per_pass": per_pass, "frames": status["frames"], "exit_code": code,
        "stopped_by_bench": stop_sent, "seconds": round(elapsed, 1),
        "fps": round(status["frames"] / elapsed, 1), "outages": outages, "outage_s": args.outage_s,
        "events_published": published, "events_received": len(ids), "events_distinct": distinct,
        "events_lost": max(0, published - distinct), "duplicates": len(ids) - distinct, "out_of_order": out_of_order,
        "outbox_left": left, "mqtt_final": status.get("mqtt"), "start": start, "end": end,
        "rss_max_mb": max((s["rss_mb"] for s in samples), default=None),
        "fds_max": max((s["fds"] for s in samples), default=None),
        "outbox_rows_max": max((s["outbox_rows"] or 0 for s in samples), default=None),
        "samples": samples[::5],
        "errors_in_log": [line for line in daemon_log.splitlines() if "Traceback" in line or "ERROR" in line][:20],
        "daemon_log_tail": daemon_log.splitlines()[-15:],
    }
    path = write_result("soak", result, args.out)
    print(f"machine: {describe(info)}; {result['seconds']:.0f} s, {result['fps']} fps, daemon exit {code}")
    rows = [["frames", status["frames"], ""], ["broker outages", len(outages), f"{args.outage_s:g} s each"],
            ["RSS MB", start and start["rss_mb"], end and end["rss_mb"]],
            ["open fds", start and start["fds"], end and end["fds"]],
            ["outbox rows", start and start["outbox_rows"], left],
            ["outbox rows, most during an outage", result["outbox_rows_max"], ""],
            ["events published / received (distinct)", published, distinct],
            ["events lost", result["events_lost"], ""], ["duplicates", result["duplicates"], ""],
            ["out of order", out_of_order, ""]]
    print(table(["", "start", "end"], rows))
    print(f"wrote {path}")
    return 0 if code == 0 and result["events_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
