"""Pipeline speed per stage on real frames, the bare model invokes, and the dlib peer — one run.

    python -m bench.speed --bundle BUNDLE_DIR            # 1 and 2 threads, peer if installed
    python -m bench.speed --bundle BUNDLE_DIR --no-peer --threads 1

Frame sets: ../shared/data/video/short_hamilton_clip.mp4 (640×360), the Intel clips (480×270),
and 640×480 and 1280×720 versions of ../shared/data/photos/scenes (JPEG-encoded in memory, the way
an MJPEG camera delivers them). Stages per frame: decode (video read / JPEG decode + BGR→RGB),
detect, align, classify (FacePipeline's own timings), publish (event payload built as the daemon
builds it + a QoS 1 paho publish to a throw-away local mosquitto; payload only if mosquitto is
absent — the table says which). publish is paid per recognised face here, on every frame: the
daemon only publishes when a track's identity is decided, so this is an upper bound.

Bare model invokes (interpreter.invoke() alone) are measured in the same run: right after each frame,
on that frame's own inputs (paired, so both sides of the ratio see the same load), and again in a
separate loop over 60 real inputs. The pipeline's overhead over its models is, per frame with a face,
    ratio = (detect + align + classify) / (detector invoke + faces × classifier invoke)   (paired)
reported as the median over frames. The peer, face_recognition 1.3 (HOG detect +
128-d encode, its defaults), runs on a subset of the same decoded frames in .venv-bench, and the fps
ratio compares processing a decoded frame (ours: detect+align+classify, 1 thread), both timed
frame by frame in turn (ours, then the peer's) so that both see the same load.

Writes bench/results/speed.json. Not a test: nothing here passes or fails on a timing.
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

from bench.common import (
    PEER_WORKER,
    RESULTS,
    LocalBroker,
    describe,
    fmt_ms,
    machine,
    need_shared,
    peer_python,
    stats,
    table,
    write_result,
)

STAGES = ("decode", "detect", "align", "classify", "publish")


def _cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize keeping the aspect ratio, then centre-crop to exactly width×height."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    resized = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    y0 = (resized.shape[0] - height) // 2
    x0 = (resized.shape[1] - width) // 2
    return resized[y0:y0 + height, x0:x0 + width]


class FrameSet:
    """A named source of (decode_ms, rgb frame) pairs that can be replayed once per thread count."""

    def __init__(self, name: str, encoding: str, items: list[Any]) -> None:
        self.name, self.encoding, self.items = name, encoding, items

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        if self.encoding == "jpeg":
            for data in self.items:
                t0 = time.perf_counter()
                bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                yield (time.perf_counter() - t0) * 1e3, rgb
        else:
            for path, limit in self.items:
                yield from timed_video(path, limit)


def timed_video(path: Path, limit: int | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """(decode_ms, rgb frame) for each frame of the video at `path`, `limit` frames at most."""
    cap = cv2.VideoCapture(str(path))
    try:
        n = 0
        while limit is None or n < limit:
            t0 = time.perf_counter()
            ok, bgr = cap.read()
            if not ok:
                return
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield (time.perf_counter() - t0) * 1e3, rgb
            n += 1
    finally:
        cap.release()


def frame_sets(video_frames: int, repeat: int) -> list[FrameSet]:
    video = need_shared("video")
    from faceberry.contract import list_images

    scenes = list_images(need_shared("photos", "scenes"))
    sets = []
    hamilton = video / "short_hamilton_clip.mp4"
    if hamilton.is_file():
        sets.append(FrameSet("video 640×360 (hamilton)", "video", [(hamilton, video_frames)]))
    intel = sorted((video / "intel").glob("*.mp4"))
    if intel:
        per_clip = max(1, video_frames // len(intel))
        sets.append(FrameSet(f"video 480×270 (intel ×{len(intel)})", "video", [(p, per_clip) for p in intel]))
    for width, height in ((640, 480), (1280, 720)):
        encoded = []
        for path in scenes:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            ok, data = cv2.imencode(".jpg", _cover(bgr, width, height), [cv2.IMWRITE_JPEG_QUALITY, 90])
            if ok:
                encoded.append(data)
        sets.append(FrameSet(f"scenes {width}×{height}", "jpeg", encoded * repeat))
    return sets


class Publisher:
    """The daemon's publishing path: event payload + person state built by faceberry.device.outputs.events, handed to
    faceberry.device.messaging.mqtt.MqttPublisher (paho, QoS 1) when a broker is running; payload building only
    otherwise."""

    def __init__(self, broker: LocalBroker | None, model: str) -> None:
        from faceberry.device.outputs import events

        self.events = events
        self.topic = events.events_topic("faceberry", "bench")
        self.model = model
        self.mqtt = None
        self._sent = 0
        # Its own outbox, removed afterwards: a leftover of an earlier run would be replayed into this one.
        self._outbox_dir = tempfile.TemporaryDirectory(prefix="faceberry-speed-outbox-")
        if broker is not None:
            from faceberry.device.config import MqttConfig
            from faceberry.device.messaging.mqtt import MqttPublisher

            self.mqtt = MqttPublisher(MqttConfig(host=broker.host, port=broker.port, client_id="faceberry-bench",
                                                 queue_size=100000), "bench",
                                      outbox=Path(self._outbox_dir.name) / "outbox.sqlite3")
            self.mqtt.start()
            if not self.mqtt.wait_connected(10):
                self.mqtt.stop(1)
                self.mqtt = None

    @property
    def mode(self) -> str:
        return ("event + person-state payloads, MqttPublisher (paho, QoS 1) to a local mosquitto" if self.mqtt
                else "payload build only (no broker)")

    def publish(self, recognitions: list, track_id: int) -> None:
        ev = self.events
        for rec in recognitions:
            payload = ev.event_payload(
                device_id="bench", camera="bench", label=rec.prediction.label, score=rec.prediction.score,
                bbox=rec.face.box.tolist(), track_id=track_id, frames=5, model=self.model, timestamp=time.time())
            data = ev.encode(payload)
            state = ev.encode(ev.person_state_payload(payload))
            if self.mqtt is not None:
                self.mqtt.publish(self.topic, data)
                self.mqtt.publish(ev.person_topic("faceberry", "bench", rec.prediction.label), state, retain=True)
                self._sent += 2

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def acked(self) -> int:
        return self.mqtt.published if self.mqtt else 0

    def close(self) -> None:
        if self.mqtt is not None:
            self.mqtt.stop(timeout=10)
        self._outbox_dir.cleanup()


def bare_invoke_ms(model, inputs: list[np.ndarray], repeat: int = 3) -> dict[str, Any]:
    """interpreter.invoke() alone on each real input (set by one untimed run), and model.run (the
    wrapper: quantise, set, invoke, read, dequantise) separately, `repeat` times per input."""
    invoke, wrapper = [], []
    for x in inputs:
        model.run(x)
        for _ in range(repeat):
            t0 = time.perf_counter()
            model.interpreter.invoke()
            invoke.append((time.perf_counter() - t0) * 1e3)
    for x in inputs:
        for _ in range(repeat):
            t0 = time.perf_counter()
            model.run(x)
            wrapper.append((time.perf_counter() - t0) * 1e3)
    return {"invoke": stats(invoke), "run": stats(wrapper)}


def bench_threads(bundle, sets: list[FrameSet], threads: int, broker: LocalBroker | None,
                  keep_for_peer: dict[str, set[int]] | None) -> tuple[dict[str, Any], dict[str, list]]:
    from faceberry.device.recognition.pipeline import FacePipeline
    from faceberry.preprocess import normalize

    pipeline = FacePipeline(bundle, num_threads=threads)
    publisher = Publisher(broker, bundle.bundle_id)
    kept: dict[str, list] = {}
    det_inputs: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    per_set: dict[str, Any] = {}
    warm = next(sets[0].frames())[1]
    for _ in range(3):
        pipeline.process(warm)
    for fset in sets:
        rows = []
        for i, (decode_ms, frame) in enumerate(fset.frames()):
            result = pipeline.process(frame)
            t0 = time.perf_counter()
            publisher.publish(result.recognitions, track_id=i)
            publish_ms = (time.perf_counter() - t0) * 1e3
            faces = len(result.recognitions)
            # Bare invokes paired with this frame: the interpreters still hold this frame's inputs
            # (the detector's letterbox, the last face's crop), so invoke() alone repeats exactly the
            # model work the pipeline just did, under the same load as its stage timings.
            t0 = time.perf_counter()
            pipeline.detector.model.interpreter.invoke()
            det_invoke = (time.perf_counter() - t0) * 1e3
            cls_invoke = None
            if faces:
                t0 = time.perf_counter()
                pipeline.classifier.model.interpreter.invoke()
                cls_invoke = (time.perf_counter() - t0) * 1e3
            rows.append({"decode": decode_ms, **result.timings_ms, "publish": publish_ms if faces else None,
                         "faces": faces, "detector_invoke": det_invoke, "classifier_invoke": cls_invoke})
            if i % 4 == 0 and len(det_inputs) < 60:
                det_inputs.append(pipeline.detector.letterbox(frame)[0].astype(np.float32)[None] / 127.5 - 1.0)
            if faces and len(crops) < 60:
                crops.append(result.recognitions[0].crop)
            if keep_for_peer is not None and i in keep_for_peer[fset.name]:
                kept.setdefault(fset.name, []).append((i, frame))
        per_set[fset.name] = {"frames": rows}
    publisher.close()
    sent, acked = publisher.sent, publisher.acked
    det = bare_invoke_ms(pipeline.detector.model, det_inputs)
    cls = bare_invoke_ms(pipeline.classifier.model, [normalize(c[None], pipeline.classifier.prep) for c in crops])
    all_rows = [r for data in per_set.values() for r in data["frames"]]
    det["paired_invoke"] = stats([r["detector_invoke"] for r in all_rows])
    cls["paired_invoke"] = stats([r["classifier_invoke"] for r in all_rows if r["classifier_invoke"] is not None])
    summary: dict[str, Any] = {"threads": threads, "publish_mode": publisher.mode,
                               "published": sent, "acked": acked,
                               "bare": {"detector": det, "classifier": cls}, "sets": {}}
    all_ratios = []
    for name, data in per_set.items():
        rows = data["frames"]
        stage_stats = {s: stats([r[s] for r in rows if r[s] is not None and (s in ("decode", "detect") or r["faces"])])
                       for s in STAGES}
        processing = [r["detect"] + r["align"] + r["classify"] for r in rows]
        total = [r["decode"] + r["detect"] + r["align"] + r["classify"] + (r["publish"] or 0.0) for r in rows]
        ratios = [(r["detect"] + r["align"] + r["classify"])
                  / (r["detector_invoke"] + r["faces"] * r["classifier_invoke"]) for r in rows if r["faces"]]
        all_ratios += ratios
        summary["sets"][name] = {
            "frames": len(rows),
            "frames_with_faces": sum(1 for r in rows if r["faces"]),
            "faces": sum(r["faces"] for r in rows),
            "stages": stage_stats,
            "processing": stats(processing),
            "total": stats(total),
            "fps": round(1000.0 / float(np.median(total)), 1),
            "overhead_ratio": stats(ratios),
            "per_frame": rows,
        }
    summary["overhead_ratio"] = stats(all_ratios)
    return summary, kept


def bench_peer(kept: dict[str, list], bundle) -> dict[str, Any]:
    """face_recognition and faceberry (1 thread) on the same decoded frames, interleaved frame by frame
    (ours, then the peer's), so both see the same load on a shared machine."""
    from faceberry.device.recognition.pipeline import FacePipeline

    py = peer_python()
    versions = subprocess.run(
        [str(py), "-c", "from importlib.metadata import version as v; print(v('face_recognition'), v('dlib-bin'))"],
        capture_output=True, text=True, check=False).stdout.split()
    pipeline = FacePipeline(bundle, num_threads=1)
    proc = subprocess.Popen([str(py), str(PEER_WORKER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    rows: dict[str, list[tuple[int, float, dict]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="faceberry-speed-") as tmp:
            def peer(frame: np.ndarray) -> dict:
                path = Path(tmp) / "frame.npy"
                np.save(path, frame)
                proc.stdin.write(f"{path}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the face_recognition worker stopped (exit {proc.poll()})")
                return json.loads(line)

            first = next(iter(kept.values()))[0][1]
            peer(first)
            for _ in range(3):
                pipeline.process(first)
            for name, items in kept.items():
                for _, frame in items:
                    result = pipeline.process(frame)
                    ours_ms = result.timings_ms["detect"] + result.timings_ms["align"] + result.timings_ms["classify"]
                    rows.setdefault(name, []).append((len(result.recognitions), ours_ms, peer(frame)))
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    out: dict[str, Any] = {"face_recognition": versions[0] if versions else None,
                           "dlib": versions[1] if len(versions) > 1 else None, "interleaved": True, "sets": {}}
    for name, items in rows.items():
        peer_ms = [p["detect_ms"] + p["encode_ms"] for _, _, p in items]
        our_ms = [ms for _, ms, _ in items]
        peer_fps = 1000.0 / float(np.median(peer_ms))
        our_fps = 1000.0 / float(np.median(our_ms))
        out["sets"][name] = {
            "frames": len(items),
            "peer_faces": sum(p["faces"] for _, _, p in items),
            "our_faces": sum(n for n, _, _ in items),
            "peer_detect": stats([p["detect_ms"] for _, _, p in items]),
            "peer_encode": stats([p["encode_ms"] for _, _, p in items if p["faces"]]),
            "peer_total": stats(peer_ms),
            "our_total": stats(our_ms),
            "peer_fps": round(peer_fps, 2),
            "our_fps": round(our_fps, 1),
            "fps_ratio": round(our_fps / peer_fps, 1),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR",
                        help="bundle to time (e.g. the int8 bundle bench/accuracy.py builds)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="interpreter thread counts to run, each over every frame set (default: 1 2)")
    parser.add_argument("--video-frames", type=int, default=120, metavar="N",
                        help="frames read from each video set (default 120)")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="passes over the 12 scene photos at each size (default 5)")
    parser.add_argument("--peer-frames", type=int, default=12, metavar="N",
                        help="frames of each set also given to face_recognition (default 12; 0 = skip the peer)")
    parser.add_argument("--no-peer", action="store_true", help="skip face_recognition even if it is installed")
    parser.add_argument("--no-broker", action="store_true", help="time payload building only, without mosquitto")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json", help="JSON result (default %(default)s)")
    args = parser.parse_args(argv)

    from faceberry.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = machine()
    sets = frame_sets(args.video_frames, args.repeat)
    want_peer = not args.no_peer and args.peer_frames > 0
    if want_peer and peer_python() is None:
        print("note: face_recognition is not installed (bash bench/setup_peer.sh); skipping the peer", file=sys.stderr)
        want_peer = False
    keep = None
    if want_peer:
        keep = {}
        for fset in sets:
            n = sum(1 for _ in fset.frames())
            step = max(1, n // args.peer_frames)
            keep[fset.name] = set(range(0, n, step)[: args.peer_frames])

    runs = []
    kept: dict[str, list] = {}
    broker_cm = LocalBroker() if not args.no_broker else None
    broker = broker_cm.__enter__() if broker_cm else None
    try:
        for t in args.threads:
            print(f"timing the pipeline with {t} thread(s)…", file=sys.stderr, flush=True)
            summary, got = bench_threads(bundle, sets, t, broker, keep if (keep and t == args.threads[0]) else None)
            runs.append(summary)
            kept = kept or got
    finally:
        if broker_cm:
            broker_cm.__exit__()
    peer = None
    if want_peer and kept:
        print("timing face_recognition on the same frames…", file=sys.stderr, flush=True)
        peer = bench_peer(kept, bundle)
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]

    print(f"\nfaceberry pipeline speed — {describe(info)}")
    print(f"bundle {bundle.bundle_id}: {bundle.kind}, {bundle.manifest['classifier'].get('quantization')}, "
          f"{bundle.preprocessing.input_size}px; publish = {runs[0]['publish_mode']}")
    rows = []
    for run in runs:
        for name, s in run["sets"].items():
            rows.append([run["threads"], name, s["frames"], s["faces"],
                         *[fmt_ms(s["stages"][st]) for st in STAGES], fmt_ms(s["total"]), s["fps"],
                         f"{s['overhead_ratio']['median']:.2f}" if s["overhead_ratio"]["n"] else "—"])
    print(table(["threads", "frames", "n", "faces", *[f"{s} ms (med / p95)" for s in STAGES], "total ms", "fps",
                 "overhead"], rows))
    print()
    print(table(["threads", "model", "invoke paired with each frame ms (med / p95)", "bare invoke ms (med / p95)",
                 "model.run ms (med / p95)"],
                [[r["threads"], m, fmt_ms(r["bare"][m]["paired_invoke"]), fmt_ms(r["bare"][m]["invoke"]),
                  fmt_ms(r["bare"][m]["run"])] for r in runs for m in ("detector", "classifier")]))
    for r in runs:
        o = r["overhead_ratio"]
        print(f"pipeline / (detector + classifier invokes), {r['threads']} thread(s): median {o['median']:.2f}×, "
              f"p95 {o['p95']:.2f}× over {o['n']} frames with faces")
    if peer:
        print(f"\nface_recognition {peer['face_recognition']} (dlib {peer['dlib']}, HOG + encode) on the same frames:")
        print(table(["frames", "n", "faces (ours / peer)", "peer detect ms", "peer encode ms", "peer total ms",
                     "ours ms (1 thr)", "peer fps", "our fps", "ours ÷ peer"],
                    [[name, s["frames"], f"{s['our_faces']} / {s['peer_faces']}", fmt_ms(s["peer_detect"]),
                      fmt_ms(s["peer_encode"]), fmt_ms(s["peer_total"]), fmt_ms(s["our_total"]), s["peer_fps"],
                      s["our_fps"], f"{s['fps_ratio']}×"] for name, s in peer["sets"].items()]))
    path = write_result("speed", {"machine": info, "bundle": {"dir": str(args.bundle), "id": bundle.bundle_id,
                                  "kind": bundle.kind,
                                  "quantization": bundle.manifest["classifier"].get("quantization"),
                                  "input_size": bundle.preprocessing.input_size},
                                  "runs": runs, "peer": peer}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
