"""Library-sync latency (issue 23): a person named on device A → device B serving a bundle with them.

    nice python -m bench.library_sync --bundle BUNDLE_DIR            # 100 trials
    nice python -m bench.library_sync --bundle BUNDLE_DIR --trials 20
    nice python -m bench.library_sync --bundle BUNDLE_DIR --bridge   # A and B on two bridged mosquittos

Two devices' libraries (device/messaging/library.py, the daemon's own class) on one real mosquitto on
loopback, each with its own copy of an embedding bundle and its own state_dir. Per trial, A does what the
`name_last_unknown` command does after its enrolment from crops: enrols the person into its own bundle, then
shares the entry (`Library.share`); the clock starts at the share. B receives the retained entry (paho's
thread), applies it on the library's thread (the rule, the enrolment into its bundle with the threshold
recalibrated on the stranger cohort, a new bundle written and verified) and asks its frame loop for a reload;
the clock stops when B's reload has loaded the bundle with the person (load_bundle + FacePipeline, what the
daemon's reload does). Then A forgets the person (`forget` with `name`) and the same is timed until B serves a
bundle without them, so every trial starts from the same gallery. With --bridge, A is on a local mosquitto
bridged to B's (docs/MQTT.md's bridge configuration, `topic faceberry/# both 1`).

Not a daemon: B's "frame loop" serves reload requests every 1/--fps s and processes no frames (the daemon
serves them between two frames, so a busy one adds up to one frame's time). A's own enrolment from crops
(seconds on a Pi: detection and embedding of each crop) is not in the figure: the embeddings are random unit
vectors of the bundle's width, three per person, which cost the receiving side what real ones do.

Writes bench/results/library_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, LocalBroker, describe, machine, stats, table, write_result


class BridgedBroker(LocalBroker):
    """A LocalBroker whose configuration also bridges it to `central` with docs/MQTT.md's bridge block."""

    def __init__(self, central: LocalBroker) -> None:
        super().__init__()
        self.central = central

    def __enter__(self) -> LocalBroker | None:
        import re
        import subprocess

        broker = super().__enter__()
        if broker is None:
            return None
        # Restarted with the bridge appended (LocalBroker picks its port and writes its configuration).
        assert self.proc is not None and self._dir is not None
        self.proc.terminate()
        self.proc.wait(5)
        doc = (ROOT / "docs" / "MQTT.md").read_text(encoding="utf-8")
        block = re.search(r"```conf\n(.*?)```", doc.split("### A local broker on each site", 1)[1], re.S)
        assert block, "docs/MQTT.md: the bridge configuration block is missing"
        bridge = re.sub(r"^address .*$", f"address {self.central.host}:{self.central.port}", block.group(1),
                        flags=re.M)
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(conf.read_text() + bridge)
        self.proc = subprocess.Popen([str(self.binary), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return self


class Device:
    """One device's library, as device/app.py wires it, minus the camera: a real bundle, a real paho client,
    the library's own thread, and a loop that serves reload requests by loading the bundle."""

    def __init__(self, root: Path, name: str, broker: LocalBroker, bundle: Path, fps: float) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from faceberry.device.messaging.dispatcher import ReloadRequests
        from faceberry.device.messaging.library import Library
        from faceberry.device.messaging.topics import Topics
        from faceberry.device.recognition.enroll import enroll, unenroll

        self.bundle = root / name / "bundle"
        shutil.copytree(bundle, self.bundle)
        manifest = json.loads((self.bundle / "manifest.json").read_text())
        self.embedder_id = manifest["files"][manifest["classifier"]["file"]]
        self.labels: list[str] = []
        self.served_at: list[tuple[float, list[str]]] = []
        self.received_at: dict[str, float] = {}
        self.applied_at: dict[str, float] = {}
        self.reloads = ReloadRequests()
        self.period = 1.0 / fps
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-library-{name}", clean_session=True)

        def enrol(label: str, rows: np.ndarray) -> dict[str, Any]:
            out = enroll(self.bundle, label, Path(), embeddings=rows, merge=False)
            self.applied_at[label] = time.perf_counter()
            return out

        def forget(label: str) -> dict[str, Any]:
            out = unenroll(self.bundle, label)
            self.applied_at[label] = time.perf_counter()
            return out

        self.library = Library(Topics("faceberry", name),
                               lambda t, p, retain=False, qos=0: self.client.publish(t, p, qos=qos, retain=retain),
                               state=root / name / f"library-{name}.json", enroll=enrol, unenroll=forget,
                               reloads=self.reloads, embedder=lambda: self.embedder_id,
                               enroll_lock=threading.Lock())
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._serve, name=f"loop-{name}", daemon=True)
        self._loop.start()
        self.library.start()
        subscribed = threading.Event()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            if msg.payload:
                self.received_at[msg.topic.rsplit("/", 1)[-1]] = time.perf_counter()
            self.library.receive(msg.topic, bytes(msg.payload), msg.retain)

        self.client.on_connect = lambda c, *a: c.subscribe("faceberry/library/#", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError(f"{name} could not subscribe")

    def _serve(self) -> None:
        from faceberry.bundle import load_bundle
        from faceberry.device.messaging.dispatcher import ReloadResult
        from faceberry.device.recognition.pipeline import FacePipeline

        def reload() -> ReloadResult:
            bundle = load_bundle(os.path.realpath(self.bundle))  # what device/app.py's load_pipeline does
            FacePipeline(bundle, num_threads=2)
            self.labels = [str(x) for x in bundle.gallery_labels]
            self.served_at.append((time.perf_counter(), self.labels))
            return ReloadResult(True, bundle.bundle_id, str(self.bundle))

        while not self._stop.wait(self.period):
            self.reloads.serve(reload)

    def serving_since(self, predicate: Any, timeout: float) -> float | None:
        """When the first bundle for which `predicate(labels)` holds was loaded (None: not within timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for at, labels in list(self.served_at):
                if predicate(labels):
                    return at
            time.sleep(0.005)
        return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.library.stop()
        self._stop.set()
        self.reloads.close()


def run_trials(bundle: Path, trials: int, fps: float, work: Path, bridge: bool = False) -> dict[str, Any]:
    central = LocalBroker()
    with central as broker:
        if broker is None:
            sys.exit("error: mosquitto is not installed; install it (apt-get install mosquitto)")
        if not bridge:
            return _trials(bundle, trials, fps, work, broker, broker)
        with BridgedBroker(central) as local:
            assert local is not None
            return _trials(bundle, trials, fps, work, local, broker)


def _trials(bundle: Path, trials: int, fps: float, work: Path, broker_a: LocalBroker,
            broker_b: LocalBroker) -> dict[str, Any]:
    from faceberry.device.recognition.enroll import enroll, unenroll

    rng = np.random.default_rng(0)
    a = Device(work, "door-a", broker_a, bundle, fps)
    b = Device(work, "door-b", broker_b, bundle, fps)
    manifest = json.loads((a.bundle / "manifest.json").read_text())
    if not manifest.get("gallery"):
        sys.exit(f"error: {bundle} has no gallery (a softmax bundle enrols nobody); pass an embedding bundle")
    dim = int(np.load(a.bundle / manifest["gallery"]["file"])["embeddings"].shape[1])
    rows: dict[str, list[float]] = {k: [] for k in ("name_arrival", "name_applied", "name_served",
                                                    "forget_arrival", "forget_applied", "forget_served")}
    lost = 0

    def timed(step: str, name: str, served: bool, publish: Callable[[], str]) -> bool:
        """A's change to `name`, from `publish()` until B serves a bundle with (`served`) or without it: the
        rows `<step>_arrival`, `_applied`, `_served`; False if B did not within 120 s."""
        b.served_at.clear()
        t0 = time.perf_counter()
        entry = publish()
        at = b.serving_since(lambda labels: (name in labels) == served, 120)
        if at is None:
            return False
        rows[f"{step}_arrival"].append(b.received_at[entry] - t0)
        rows[f"{step}_applied"].append(b.applied_at[name] - t0)
        rows[f"{step}_served"].append(at - t0)
        return True

    try:
        for i in range(trials):
            name = f"Bench Person {i:03d}"
            emb = rng.standard_normal((3, dim)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            summary = enroll(a.bundle, name, Path(), embeddings=emb, merge=False)
            if not timed("name", name, True, partial(a.library.share, name, summary["embeddings"],
                                                     summary["embedder"])):
                lost += 1
                continue
            unenroll(a.bundle, name)
            if not timed("forget", name, False, partial(a.library.forget, name)):
                lost += 1
                continue
            if (i + 1) % 10 == 0:
                print(f"{i + 1}/{trials} trials", file=sys.stderr, flush=True)
    finally:
        a.close()
        b.close()
    return {"ms": {k: stats([1000 * v for v in vals]) for k, vals in rows.items()}, "lost": lost,
            "refused": b.library.stats["library_refused"], "people_in_bundle": len(b.labels)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="an embedding bundle (default: the bundle of the summary in "
                        "$FACEBERRY_TINY_EMBEDDING, the test suite's tiny embedding build)")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--fps", type=float, default=8.0, help="how often B's loop serves reloads (default 8/s)")
    parser.add_argument("--bridge", action="store_true", help="A on a local mosquitto bridged to B's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    bundle = args.bundle
    if bundle is None and os.environ.get("FACEBERRY_TINY_EMBEDDING"):
        bundle = Path(json.loads(Path(os.environ["FACEBERRY_TINY_EMBEDDING"]).read_text())["bundle"])
    if bundle is None or not (bundle / "manifest.json").is_file():
        sys.exit("error: no embedding bundle; pass --bundle DIR (a bundle with a gallery: `python -m convert` "
                 "of an embedding run)")
    info = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faceberry-library-sync-") as tmp:
        result = run_trials(bundle, args.trials, args.fps, Path(tmp), args.bridge)
    wall = time.perf_counter() - started
    ms = result["ms"]
    print(f"library sync, {args.trials} trials{' across a bridge' if args.bridge else ''}, {describe(info)}; "
          f"B serves reloads at {args.fps:g}/s")
    print(table(["A → B", "arrived (ms) median / p95", "applied (ms)", "B serving (ms)", "n"], [
        [what, f"{ms[f'{key}_arrival']['median']} / {ms[f'{key}_arrival']['p95']}",
         f"{ms[f'{key}_applied']['median']} / {ms[f'{key}_applied']['p95']}",
         f"{ms[f'{key}_served']['median']} / {ms[f'{key}_served']['p95']}", ms[f"{key}_served"]["n"]]
        for what, key in (("named", "name"), ("forgotten", "forget"))]))
    print(f"lost {result['lost']}, refused {result['refused']}, wall {wall:.0f} s")
    path = write_result("library_sync-bridge" if args.bridge else "library_sync",
                        {"machine": info, "bundle": str(bundle), "trials": args.trials, "bridge": args.bridge,
                         "fps": args.fps, "wall_s": round(wall, 1), **result}, args.out)
    print(f"wrote {path}")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
