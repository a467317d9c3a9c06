"""A person lingering in front of the camera: what re-verifying decided tracks every k frames saves (issue 23).

    python -m bench.lingering --bundle BUNDLE_DIR                 # k = 1 against the default k, peer if installed
    python -m bench.lingering --bundle BUNDLE_DIR --every 10 --still-frames 600 --no-peer

Two sequences of real frames from ../shared, each run through the daemon's recognition path (FacePipeline
with the tracker, then Tracker.update, 1 interpreter thread) twice, frame by frame in turn, so that both see
the same load on a shared machine: once embedding every face on every frame (recognition.reverify_every 1,
the behaviour before issue 23) and once with re-verification (the default k, or --every).

  video 640×360 (hamilton)   data/video/short_hamilton_clip.mp4, 275 frames: a man talking and moving his
                             head, a second face at times (the hard case: his face keeps changing)
  still 640×480 (<photo>)    one person standing still: data/photos/scenes/obama-720p.jpg (or --still) covered to
                             640×480, each frame shifted by up to 2 px and lit ±3 levels differently, JPEG-
                             encoded in memory and decoded per frame the way an MJPEG camera delivers it

Per frame: decode (video read or JPEG decode + BGR→RGB), recognition (detect + align + the embedder where
planned + tracking), wall and process CPU time (time.process_time), embedder runs (FaceClassifier.look calls).
fps (wall) = 1000 / (decode + recognition) wall ms per frame, as measured on the shared machine; fps per core
(CPU) = 1000 / their CPU ms: what one core of its own would sustain for one camera. The decisions of both
runs are compared (track, label, previous: the events). face_recognition 1.3 (HOG + 128-d encode, its
defaults, no tracking: it embeds every face on every frame) runs on every --peer-every-th frame of the same
decoded frames, interleaved with ours, when bench/setup_peer.sh installed it; its wall ms per frame is compared
with our mean wall ms per frame.

Writes bench/results/lingering.json. Not a test: nothing here passes or fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import PEER_WORKER, RESULTS, describe, machine, need_shared, peer_python, stats, table, write_result
from bench.speed import _cover, timed_video


def still(photo: Path, n: int, seed: int = 0) -> Iterator[tuple[float, np.ndarray]]:
    """A person standing still: the photo at 640×480, each frame shifted ≤ 2 px and lit ±3 levels, as JPEG."""
    encoded = still_jpegs(photo, n, seed)  # all made here, before the first frame is timed
    return jpeg_frames(encoded)


def still_jpegs(photo: Path, n: int, seed: int) -> list[np.ndarray]:
    base = _cover(cv2.imread(str(photo), cv2.IMREAD_COLOR), 640, 480)
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(n):
        dx, dy = rng.integers(-2, 3, size=2)
        moved = cv2.warpAffine(base, np.float32([[1, 0, dx], [0, 1, dy]]), (640, 480), borderMode=cv2.BORDER_REPLICATE)
        lit = np.clip(moved.astype(np.int16) + int(rng.integers(-3, 4)), 0, 255).astype(np.uint8)
        ok, data = cv2.imencode(".jpg", lit, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if ok:
            encoded.append(data)
    return encoded


def jpeg_frames(encoded: list[np.ndarray]) -> Iterator[tuple[float, np.ndarray]]:
    for data in encoded:
        t0 = time.perf_counter()
        rgb = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        yield (time.perf_counter() - t0) * 1e3, rgb


class Peer:
    """face_recognition in its own venv (bench/peer_face_recognition.py serve), one frame at a time."""

    def __init__(self) -> None:
        py = peer_python()
        assert py is not None
        self.versions = subprocess.run(
            [str(py), "-c", "from importlib.metadata import version as v; print(v('face_recognition'), v('dlib-bin'))"],
            capture_output=True, text=True, check=False).stdout.split()
        self.proc = subprocess.Popen([str(py), str(PEER_WORKER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.tmp = tempfile.TemporaryDirectory(prefix="faceberry-lingering-")

    def time(self, frame: np.ndarray) -> dict[str, Any]:
        path = Path(self.tmp.name) / "frame.npy"
        np.save(path, frame)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the face_recognition worker stopped (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.tmp.cleanup()


def run_sequence(pipeline, frames: Iterator[tuple[float, np.ndarray]], ks: list[int], votes: int,
                 peer: Peer | None, peer_every: int) -> dict[str, Any]:
    from faceberry.device.recognition.tracker import Observation, Tracker

    trackers = {k: Tracker(0.3, votes, 10) for k in ks}
    rows: dict[int, list[dict[str, float]]] = {k: [] for k in ks}
    decisions: dict[int, list[tuple]] = {k: [] for k in ks}
    decode_ms, decode_cpu, peer_rows = [], [], []
    source = iter(frames)
    for index in range(1 << 30):
        c0 = time.process_time()
        try:
            decode, frame = next(source)
        except StopIteration:
            break
        decode_cpu.append((time.process_time() - c0) * 1e3)
        decode_ms.append(decode)
        # Alternate which k goes first, so neither always finds the caches the other warmed.
        for k in (ks if index % 2 == 0 else ks[::-1]):
            tracker = trackers[k]
            w0, c0 = time.perf_counter(), time.process_time()
            result = pipeline.process(frame, tracker, k)
            observations = [Observation(r.face.box, r.prediction.label, r.prediction.score)
                            for r in result.recognitions]
            made = tracker.update(observations, index)
            rows[k].append({"wall_ms": (time.perf_counter() - w0) * 1e3, "cpu_ms": (time.process_time() - c0) * 1e3,
                            "faces": len(result.recognitions), "embedded": result.embedded, **result.timings_ms})
            decisions[k] += [(d.track_id, d.label, d.previous) for d in made]
        if peer is not None and index % peer_every == 0:
            peer_rows.append(peer.time(frame))
    out: dict[str, Any] = {"frames": len(decode_ms), "decode": stats(decode_ms), "decode_cpu": stats(decode_cpu),
                           "runs": {}}
    decode_mean, decode_cpu_mean = float(np.mean(decode_ms)), float(np.mean(decode_cpu))
    for k in ks:
        r = rows[k]
        wall = float(np.mean([x["wall_ms"] for x in r]))
        out["runs"][str(k)] = {
            "reverify_every": k,
            "faces": sum(x["faces"] for x in r),
            "embedder_runs": sum(x["embedded"] for x in r),
            "embedder_runs_per_frame": round(sum(x["embedded"] for x in r) / len(r), 3),
            "recognition_wall": stats([x["wall_ms"] for x in r]),
            "recognition_cpu": stats([x["cpu_ms"] for x in r]),
            "classify": stats([x["classify"] for x in r]),
            "fps": round(1000.0 / (decode_mean + wall), 1),
            "cpu_ms_per_frame": round(decode_cpu_mean + float(np.mean([x["cpu_ms"] for x in r])), 3),
            "fps_per_core_from_cpu": round(1000.0 / (decode_cpu_mean + float(np.mean([x["cpu_ms"] for x in r]))), 1),
            "reasons": dict(trackers[k].reasons),
            "decisions": decisions[k],
        }
    out["same_decisions"] = all(decisions[k] == decisions[ks[0]] for k in ks)
    if peer_rows:
        peer_ms = [p["detect_ms"] + p["encode_ms"] for p in peer_rows]
        out["peer"] = {"frames": len(peer_rows), "faces": sum(p["faces"] for p in peer_rows),
                       "total": stats(peer_ms), "fps": round(1000.0 / (decode_mean + float(np.mean(peer_ms))), 2)}
        for k in ks:
            run = out["runs"][str(k)]
            run["peer_ratio"] = round(float(np.mean(peer_ms)) / run["recognition_wall"]["mean"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    from faceberry.device.recognition.tracker import REVERIFY_EVERY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="the bundle to run")
    parser.add_argument("--every", type=int, default=REVERIFY_EVERY, metavar="K",
                        help="recognition.reverify_every to compare with 1 (default %(default)s, the config's)")
    parser.add_argument("--votes", type=int, default=5, metavar="N", help="tracking.votes_needed (default 5)")
    parser.add_argument("--still", type=Path, default=None, metavar="PHOTO",
                        help="the still person's photo (default ../shared/data/photos/scenes/obama-720p.jpg)")
    parser.add_argument("--still-frames", type=int, default=300, metavar="N",
                        help="frames of the still person (default 300: 10 s at 30 fps)")
    parser.add_argument("--peer-every", type=int, default=10, metavar="N",
                        help="face_recognition times every N-th frame (default 10)")
    parser.add_argument("--no-peer", action="store_true", help="skip face_recognition even if it is installed")
    parser.add_argument("--out", type=Path, default=RESULTS / "lingering.json",
                        help="JSON result (default %(default)s)")
    args = parser.parse_args(argv)
    if args.every < 1 or args.still_frames < 1 or args.peer_every < 1:
        parser.error("--every, --still-frames and --peer-every must be at least 1")

    from faceberry.bundle import BundleError, load_bundle
    from faceberry.device.recognition.pipeline import FacePipeline

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clip = need_shared("video", "short_hamilton_clip.mp4")
    photo = args.still or need_shared("photos", "scenes", "obama-720p.jpg")
    if not photo.is_file():
        print(f"error: {photo} is not a file; give a photo of one person with --still", file=sys.stderr)
        return 2
    info = machine()
    peer = None
    if not args.no_peer:
        if peer_python() is None:
            print("note: face_recognition is not installed (bash bench/setup_peer.sh); skipping the ratio",
                  file=sys.stderr)
        else:
            peer = Peer()
    pipeline = FacePipeline(bundle, num_threads=1)
    ks = [1, args.every] if args.every != 1 else [1]
    sequences = {}
    try:
        warm = next(still(photo, 1))[1]
        for _ in range(3):
            pipeline.process(warm)
        if peer is not None:
            peer.time(warm)
        for name, frames in (("video 640×360 (hamilton)", timed_video(clip)),
                             (f"still 640×480 ({photo.name})", still(photo, args.still_frames))):
            print(f"running {name}…", file=sys.stderr, flush=True)
            sequences[name] = run_sequence(pipeline, frames, ks, args.votes, peer, args.peer_every)
    finally:
        if peer is not None:
            peer.close()
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]

    print(f"\nA person lingering: re-verification every {args.every} frames against every frame — {describe(info)}")
    print(f"bundle {bundle.bundle_id}: {bundle.kind}, {bundle.manifest['classifier'].get('quantization')}, "
          f"{bundle.preprocessing.input_size}px; 1 interpreter thread; votes_needed {args.votes}")
    rows = []
    for name, seq in sequences.items():
        for k in ks:
            run = seq["runs"][str(k)]
            rows.append([name, seq["frames"], k, run["embedder_runs_per_frame"],
                         f"{run['recognition_wall']['mean']:.2f} / {run['recognition_wall']['median']:.2f}",
                         f"{run['cpu_ms_per_frame']:.2f}", run["fps"], run["fps_per_core_from_cpu"],
                         "yes" if seq["same_decisions"] else "NO", len(run["decisions"]),
                         f"{run['peer_ratio']}×" if "peer_ratio" in run else "—"])
    print(table(["sequence", "frames", "k", "embedder runs / frame", "recognition wall ms (mean / median)",
                 "CPU ms / frame (decode + recognition)", "fps (wall)", "fps per core (CPU)", "same events",
                 "events", "face_recognition ÷ ours (wall)"],
                rows))
    for name, seq in sequences.items():
        if "peer" in seq:
            p = seq["peer"]
            print(f"{name}: face_recognition {fmt_peer(p)} on {p['frames']} of the frames")
    if peer is not None:
        print(f"face_recognition {peer.versions[0] if peer.versions else '?'} "
              f"(dlib {peer.versions[1] if len(peer.versions) > 1 else '?'}), HOG + encode, its defaults")
    path = write_result("lingering", {
        "machine": info, "every": args.every, "votes_needed": args.votes,
        "bundle": {"dir": str(args.bundle), "id": bundle.bundle_id, "kind": bundle.kind,
                   "quantization": bundle.manifest["classifier"].get("quantization"),
                   "input_size": bundle.preprocessing.input_size},
        "peer": ({"face_recognition": peer.versions[0] if peer.versions else None,
                  "dlib": peer.versions[1] if len(peer.versions) > 1 else None} if peer is not None else None),
        "sequences": sequences}, args.out)
    print(f"\nwrote {path}")
    return 0


def fmt_peer(p: dict[str, Any]) -> str:
    return f"{p['total']['mean']:.1f} ms per frame (median {p['total']['median']:.1f}), {p['fps']} fps"


if __name__ == "__main__":
    sys.exit(main())
