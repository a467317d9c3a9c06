"""Same decisions before and after a refactor: one bundle, one set of photos, every decision recorded.

    python bench/same_decisions.py --work DIR --out before.json            # build (once) and record
    python bench/same_decisions.py --work DIR --out after.json --compare before.json   # record again, compare
    python bench/same_decisions.py --compare before.json --against after.json          # compare two files

What it builds (once, under --work; a later run with the same --work reuses every file, so an "after" run
measures the same bundle with only the code changed): the README's recommended path on a small fixed draw from
../shared — the dlib-ResNet backbone (`train backbone --arch dlib-resnet`), a stranger cohort of 40 lfw-dev people
(`train cohort --photos`, 6 faces each), a gallery of 4 people (`train --photos --backbone`; one of their photos
a HEIC, one a group photo beside a cohort person), the int8 bundle (`convert`) and a fifth person added on the
"Pi" by `device enroll` (6 photos and a group photo).

What it records, per photo, from two doors into the same decisions:
- `device eval --json` over probes: 4 photos of each gallery person (one also as HEIC), 3 of the enrolled
  person, a group photo (a stranger beside a gallery person), 2 photos each of 15 strangers in neither the
  gallery nor the cohort, and a few scenes (two people, Obama and Biden, a 240p photo, a partial face):
  predicted label, best candidate, score (4 places), face width, the subject rule used; photos skipped as
  ambiguous or unreadable are listed.
- the daemon, `device run`, on a folder camera of the same photos, each followed by an empty frame so every
  photo is a new track and its own event (`votes_needed: 1`, `max_age: 0`, `cooldown: 0`, no fps, so no frame
  is dropped), publishing to a real mosquitto on loopback: each event's label, score and box, per photo, and
  the set of MQTT topics the daemon published on.

It calls the command line only (`python -m device|train|convert …`, or other module names with
--device-module/--train-module/--convert-module), never imports the project, so the same file runs before and
after a reorganisation of the packages. Run it from the repository root (its subprocesses get the root on
PYTHONPATH); ../shared must be beside the repository (or --shared).

`--compare BEFORE.json` prints, for eval and for the daemon: photos, photos with the same label(s), the largest
|score difference|, the photos that differ; it exits 1 when any label differs (or a photo decided on one side
has no decision on the other), 2 when the two runs did not use the same bundle files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
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

SCHEMA = 1
SEED = 22
HOUSEHOLD, TRAIN_PHOTOS, PROBES = 4, 10, 4
COHORT_PEOPLE, COHORT_PER_PERSON = 40, 6
STRANGERS, STRANGER_PHOTOS = 15, 2
ENROLL_PHOTOS, ENROLL_PROBES = 6, 3
SCENES = ("photos/knn_examples/test/obama_and_biden.jpg", "photos/scenes/two_people.jpg",
          "photos/scenes/obama-240p.jpg", "photos/scenes/obama_partial_face.jpg")
DEVICE_ID = "samecam"
EMPTY = "empty.jpg"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the command line of the project, as subprocesses ----------------------------------------------------

class Cli:
    def __init__(self, args: argparse.Namespace) -> None:
        self.repo = args.repo.resolve()
        self.python = args.python
        self.modules = {"device": args.device_module, "train": args.train_module, "convert": args.convert_module}
        self.nice = ["nice", "-n", str(args.nice)] if args.nice and shutil.which("nice") else []
        path = os.environ.get("PYTHONPATH", "")
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(self.repo) + (os.pathsep + path if path else "")}

    def argv(self, tool: str, *args: str | Path) -> list[str]:
        return [*self.nice, self.python, "-m", *shlex.split(self.modules[tool]), *(str(a) for a in args)]

    def run(self, tool: str, *args: str | Path) -> str:
        cmd = self.argv(tool, *args)
        log("$ " + " ".join(shlex.quote(c) for c in cmd))
        t0 = time.monotonic()
        res = subprocess.run(cmd, cwd=self.repo, env=self.env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.stderr.write(res.stdout[-2000:] + res.stderr[-4000:])
            sys.exit(f"error: `{' '.join(cmd[-len(args) - 1:])}` failed (exit {res.returncode}); see its output above")
        log(f"  ({time.monotonic() - t0:.0f} s)")
        return res.stdout

    def popen(self, tool: str, *args: str | Path, stderr: Any) -> subprocess.Popen:
        cmd = self.argv(tool, *args)
        log("$ " + " ".join(shlex.quote(c) for c in cmd))
        return subprocess.Popen(cmd, cwd=self.repo, env=self.env, stdout=stderr, stderr=stderr)


# ---- inputs: a fixed draw from ../shared ------------------------------------------------------------------

def _link(dest: Path, src: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(src.resolve())


def _pair(dest: Path, left: Path, right: Path) -> None:
    """Two LFW frames side by side: a group photo of two faces of one size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dest), np.hstack([cv2.imread(str(left)), cv2.imread(str(right))])):
        sys.exit(f"error: could not write {dest}")


def _heic(dest: Path, src: Path) -> bool:
    try:
        import pillow_heif
        from PIL import Image
    except ImportError:
        log("note: pillow-heif is not installed here; no HEIC photo in the draw (pip install pillow-heif)")
        return False
    pillow_heif.register_heif_opener()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").save(dest, format="HEIF", quality=90)
    return True


def make_inputs(shared: Path, inputs: Path) -> dict[str, Any]:
    """Photos for training, the cohort, enrolment and the probes, as symlinks into ../shared (and a few made
    images: the HEIC copies and the side-by-side group photos). Written once; a later run reuses them."""
    lfw = shared / "faces" / "lfw-dev"
    if not lfw.is_dir():
        sys.exit(f"error: {lfw} is absent; put the shared data beside the repository as ../shared or pass --shared")
    people = sorted(d.name for d in lfw.iterdir() if d.is_dir())
    # LFW folders hold one JPEG per file: listed, not filtered by a suffix.
    photos = {p: sorted(f for f in (lfw / p).iterdir() if f.is_file()) for p in people}
    order = [str(p) for p in np.random.default_rng(SEED).permutation(people)]
    big = [p for p in order if len(photos[p]) >= TRAIN_PHOTOS + PROBES + 1]
    household = big[:HOUSEHOLD]
    rest = [p for p in order if p not in household]
    newcomer = next(p for p in rest if len(photos[p]) >= ENROLL_PHOTOS + ENROLL_PROBES + 1)
    rest.remove(newcomer)
    cohort, strangers = rest[:COHORT_PEOPLE], rest[COHORT_PEOPLE:COHORT_PEOPLE + STRANGERS]
    tmp = inputs.with_name(inputs.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in cohort:
        for f in photos[p]:
            _link(tmp / "cohort" / p / f.name, f)
    heic = False
    for i, p in enumerate(household):
        train = photos[p][:TRAIN_PHOTOS]
        for f in train[1:] if i == 0 else train:
            _link(tmp / "photos" / p / f.name, f)
        for f in photos[p][TRAIN_PHOTOS:TRAIN_PHOTOS + PROBES]:
            _link(tmp / "probes" / p / f.name, f)
    first = household[0]
    # An iPhone's photo in training, and one probe again as HEIC.
    if _heic(tmp / "photos" / first / f"{photos[first][0].stem}.heic", photos[first][0]):
        heic = True
        probe = photos[first][TRAIN_PHOTOS]
        _heic(tmp / "probes" / first / f"{probe.stem}.heic", probe)
    else:
        _link(tmp / "photos" / first / photos[first][0].name, photos[first][0])
    # Group photos: training and enrolment must take the person's face, eval the folder's person.
    _pair(tmp / "photos" / first / "zz_pair.jpg", photos[first][1], photos[cohort[0]][0])
    _pair(tmp / "probes" / household[1] / "zz_pair.jpg", photos[strangers[0]][-1],
          photos[household[1]][TRAIN_PHOTOS + PROBES])
    for f in photos[newcomer][:ENROLL_PHOTOS]:
        _link(tmp / "enroll" / newcomer / f.name, f)
    _pair(tmp / "enroll" / newcomer / "zz_pair.jpg", photos[cohort[1]][0], photos[newcomer][ENROLL_PHOTOS])
    for f in photos[newcomer][ENROLL_PHOTOS + 1:ENROLL_PHOTOS + 1 + ENROLL_PROBES]:
        _link(tmp / "probes" / newcomer / f.name, f)
    for p in strangers:
        for f in photos[p][:STRANGER_PHOTOS]:
            _link(tmp / "probes" / p / f.name, f)
    for rel in SCENES:
        src = shared / rel
        if src.is_file():
            _link(tmp / "probes" / "zz_scenes" / src.name, src)
    draw = {"seed": SEED, "household": household, "enrolled": newcomer, "cohort": cohort, "strangers": strangers,
            "heic": heic, "scenes": [r for r in SCENES if (shared / r).is_file()]}
    (tmp / "draw.json").write_text(json.dumps(draw, indent=1) + "\n")
    tmp.rename(inputs)
    return draw


# ---- the bundle -------------------------------------------------------------------------------------------

def build(cli: Cli, inputs: Path, dest: Path) -> Path:
    """backbone → cohort → gallery → int8 bundle → enrol a fifth person; returns the bundle. Written to a
    partial folder and renamed, so an interrupted build is never taken for a finished one."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    draw = json.loads((inputs / "draw.json").read_text())
    cli.run("train", "backbone", "--arch", "dlib-resnet", "--out", tmp / "backbone", "-q")
    cli.run("train", "cohort", "--backbone", tmp / "backbone", "--photos", inputs / "cohort",
            "--per-person", str(COHORT_PER_PERSON))
    cli.run("train", "--photos", inputs / "photos", "--out", tmp / "run", "--backbone", tmp / "backbone")
    cli.run("convert", "--run", tmp / "run", "--out", tmp / "bundle")
    cli.run("device", "enroll", "--bundle", tmp / "bundle", "--name", draw["enrolled"], "--photos",
            inputs / "enroll" / draw["enrolled"], "--no-reload")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest / "bundle"


def bundle_digest(bundle: Path) -> dict[str, Any]:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(bundle.iterdir()) if p.is_file()}
    manifest = json.loads((bundle / "manifest.json").read_text())
    labels = (bundle / "labels.txt").read_text().split() if (bundle / "labels.txt").is_file() else None
    return {"path": str(bundle), "files": files, "labels": labels,
            "thresholds": manifest.get("thresholds"), "classifier": manifest.get("classifier")}


# ---- door 1: device eval ----------------------------------------------------------------------------------

def eval_decisions(cli: Cli, bundle: Path, probes: Path, out: Path) -> dict[str, Any]:
    cli.run("device", "eval", "--bundle", bundle, "--photos", probes, "--json", out, "--quiet")
    result = json.loads(out.read_text())
    photos = {}
    for p in result["probes"]:
        key = p["path"]  # relative to the probes folder: <folder>/<file>
        photos[key] = {"label": p["predicted"], "best": p.get("best"), "score": round(float(p["score"]), 4),
                       "faces": p.get("faces"), "face_width": p.get("face_width"),
                       **({"subject": p["subject"]} if "subject" in p else {})}
    # Listed with the path given to eval (not resolved: the probes are symlinks into ../shared).
    skipped = sorted(os.path.relpath(s["path"], probes) if Path(s["path"]).is_absolute() else s["path"]
                     for s in [*result.get("several_faces", []), *result.get("unreadable", [])])
    totals = {k: result.get(k) for k in ("known_accuracy", "stranger_false_accept_rate", "no_face_rate",
                                         "closed_set_accuracy")}
    return {"photos": photos, "skipped": skipped, "totals": totals}


# ---- door 2: the daemon over MQTT -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """A throw-away mosquitto on a loopback port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None)
        if binary is None:
            sys.exit("error: mosquitto is not installed (apt install mosquitto); the daemon's events need a broker")
        self.host, self.port = "127.0.0.1", _free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n")
        self.log = open(workdir / "mosquitto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        sys.exit(f"error: mosquitto did not start; see {workdir / 'mosquitto.log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Subscriber:
    """Every message on the broker, in arrival order."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"same-decisions-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self.ready.wait(10):
            sys.exit("error: could not subscribe to the local broker")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _events(messages: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    out = []
    for topic, payload in messages:
        if not topic.endswith("/events") or not payload:
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        if isinstance(event, dict) and "label" in event and "source" in event:
            out.append(event)
    return out


def daemon_decisions(cli: Cli, bundle: Path, probes: Path, work: Path, timeout: float) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    camera = work / "camera"
    camera.mkdir(parents=True)
    shown: dict[str, str] = {}
    files = sorted(p for folder in sorted(probes.iterdir()) if folder.is_dir() for p in sorted(folder.iterdir()))
    for i, photo in enumerate(files):
        frame = camera / f"{i:03d}a_{photo.parent.name}__{photo.name}"
        frame.symlink_to(photo.resolve())
        shown[str(frame)] = f"{photo.parent.name}/{photo.name}"
        # An empty frame after each photo ends its track: every photo is a new face and its own event.
        cv2.imwrite(str(camera / f"{i:03d}b_{EMPTY}"), np.zeros((250, 250, 3), np.uint8))
    config = {
        "bundle": str(bundle), "device_id": DEVICE_ID,
        "camera": {"source": "folder", "device": str(camera), "loop": True},
        "tracking": {"votes_needed": 1, "max_age": 0},
        "events": {"cooldown": 0, "homeassistant": True},
        "mqtt": {"host": "127.0.0.1", "port": 0, "keepalive": 5, "reconnect_max_delay": 2},
        "stats_interval": 5, "state_dir": str(work / "state"),
    }
    broker = Broker(work)
    sub = None
    proc = None
    try:
        config["mqtt"]["port"] = broker.port
        import yaml

        (work / "config.yaml").write_text(yaml.safe_dump(config))
        sub = Subscriber(broker.host, broker.port)
        daemon_log = open(work / "daemon.log", "w")  # noqa: SIM115 - closed below
        proc = cli.popen("device", "run", "--config", work / "config.yaml", stderr=daemon_log)
        # The folder loops: once the first photo decided comes round again, the first pass is complete (events
        # go out in order). A photo without a detectable face makes no event, so "every photo" cannot be waited for.
        deadline = time.monotonic() + timeout
        while True:
            sources = [e["source"] for e in _events(sub.snapshot())]
            if sources and sources.count(sources[0]) >= 2:
                break
            if proc.poll() is not None:
                daemon_log.close()
                sys.exit(f"error: the daemon exited ({proc.returncode}) before a pass of the folder; see "
                         f"{work / 'daemon.log'}:\n" + (work / "daemon.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                sys.exit(f"error: no full pass of the folder within {timeout:.0f} s; see {work / 'daemon.log'}")
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        daemon_log.close()
        messages = sub.snapshot()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if sub is not None:
            sub.close()
        broker.stop()
    text = (work / "daemon.log").read_text()
    if rc != 0 or "Traceback" in text:
        sys.exit(f"error: the daemon stopped with {rc} or a traceback; see {work / 'daemon.log'}")
    events = _events(messages)
    first = events[0]["source"]
    second = next(i for i, e in enumerate(events) if i > 0 and e["source"] == first)
    photos: dict[str, list[dict[str, Any]]] = {}
    for e in events[:second]:
        key = shown.get(e["source"])
        if key is None:
            continue  # an empty frame never decides, but never let a stray source crash the record
        photos.setdefault(key, []).append({"label": e["label"], "score": round(float(e["score"]), 4),
                                           "bbox": [round(float(v), 1) for v in e.get("bbox", [])]})
    for decisions in photos.values():
        decisions.sort(key=lambda d: (d["bbox"][:1], d["label"]))
    # Topics with the device id and people's names, as published: a refactor of the outputs must keep them.
    topics = sorted({t for t, _ in messages})
    return {"photos": photos, "no_event": sorted(set(shown.values()) - set(photos)), "events": second,
            "topics": topics}


# ---- compare ----------------------------------------------------------------------------------------------

def _labels(decision: Any) -> Any:
    if isinstance(decision, list):
        return [d["label"] for d in decision]
    return decision["label"]


def _scores(decision: Any) -> list[float]:
    return [d["score"] for d in decision] if isinstance(decision, list) else [decision["score"]]


def compare_section(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    b, a = before["photos"], after["photos"]
    keys = sorted(set(b) | set(a))
    same, diffs, max_diff = 0, [], 0.0
    for k in keys:
        if k not in b or k not in a:
            diffs.append(f"{k}: {'no decision' if k not in b else _labels(b[k])} → "
                         f"{'no decision' if k not in a else _labels(a[k])}")
            continue
        if _labels(b[k]) != _labels(a[k]):
            diffs.append(f"{k}: {_labels(b[k])} → {_labels(a[k])}")
            continue
        same += 1
        max_diff = max([max_diff, *(abs(x - y) for x, y in zip(_scores(b[k]), _scores(a[k]), strict=True))])
    return {"photos": len(keys), "same": same, "max_score_diff": round(max_diff, 4), "differing": diffs}


def compare(before: dict[str, Any], after: dict[str, Any]) -> int:
    if before.get("bundle", {}).get("files") != after.get("bundle", {}).get("files"):
        print("error: the two runs did not use the same bundle files (sha256 differ); run the after side with the "
              "before side's --work so only the code changes", file=sys.stderr)
        return 2
    rows, failed = [], False
    for door in ("eval", "daemon"):
        if door not in before or door not in after:
            continue
        c = compare_section(before[door], after[door])
        failed |= bool(c["differing"])
        rows.append((door, c))
    if "rebuilt" in after and "eval" in after["rebuilt"]:
        c = compare_section(before["eval"], after["rebuilt"]["eval"])
        failed |= bool(c["differing"])
        rows.append(("eval, bundle rebuilt by this code", c))
    print(f"before: {before.get('code', {}).get('commit', '?')} ({before.get('finished', '?')}); "
          f"after: {after.get('code', {}).get('commit', '?')} ({after.get('finished', '?')})")
    print("| decisions | photos | same label | max abs score diff | differing photos |")
    print("|---|---|---|---|---|")
    for door, c in rows:
        print(f"| {door} | {c['photos']} | {c['same']} | {c['max_score_diff']:.4f} | {len(c['differing'])} |")
    for door, c in rows:
        for d in c["differing"]:
            print(f"  {door}: {d}")
    if "daemon" in before and "daemon" in after:
        tb, ta = set(before["daemon"].get("topics", [])), set(after["daemon"].get("topics", []))
        print(f"daemon's MQTT topics: {len(tb)} before, {len(ta)} after, "
              + ("the same" if tb == ta else f"only before: {sorted(tb - ta)}; only after: {sorted(ta - tb)}"))
    if "rebuilt" in after:
        old, new = before["bundle"]["files"], after["rebuilt"]["bundle"]["files"]
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        thresholds = after["rebuilt"]["bundle"]["thresholds"] == before["bundle"]["thresholds"]
        # The manifest holds the build's time and paths, so it always differs; the models, gallery and cohort
        # of a deterministic build do not.
        print(f"bundle rebuilt by this code: files differing from the one compared: {', '.join(differ) or 'none'}; "
              f"manifest thresholds {'equal' if thresholds else 'differ'}")
    print("SAME DECISIONS" if not failed else "DECISIONS DIFFER")
    return 1 if failed else 0


# ---- main -------------------------------------------------------------------------------------------------

def code_version(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return res.stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the photos drawn, the bundle and the runs; reused when it holds them "
                        "(default: bench/results/same-decisions); keep it outside the repository across a refactor")
    parser.add_argument("--out", type=Path, default=None,
                        help="the decisions JSON to write (default: bench/results/same-decisions.json)")
    parser.add_argument("--compare", type=Path, metavar="BEFORE.json",
                        help="compare with this earlier result; exit 1 when a label differs")
    parser.add_argument("--against", type=Path, metavar="AFTER.json",
                        help="with --compare: compare this file instead of running (nothing is built or run)")
    parser.add_argument("--rebuild", action="store_true",
                        help="also build the bundle again with this code (under WORK/rebuild) and record device "
                        "eval on it: does the build itself give the same decisions? (minutes)")
    parser.add_argument("--skip-daemon", action="store_true", help="record device eval only")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="repository root (default: the current folder)")
    parser.add_argument("--shared", type=Path, default=None, help="the shared data folder (default: REPO/../shared)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter for the CLIs (default: this one)")
    parser.add_argument("--device-module", default="device", help="`python -m` module of the device CLI, e.g. "
                        "'faceberry device' (default %(default)s)")
    parser.add_argument("--train-module", default="train", help="`python -m` module of train (default %(default)s)")
    parser.add_argument("--convert-module", default="convert",
                        help="`python -m` module of convert (default %(default)s)")
    parser.add_argument("--nice", type=int, default=10, help="run the CLIs under nice -n N, 0 for none (default 10)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the daemon's pass (default 600)")
    args = parser.parse_args(argv)

    if args.against is not None:
        if args.compare is None:
            parser.error("--against needs --compare BEFORE.json")
        return compare(json.loads(args.compare.read_text()), json.loads(args.against.read_text()))
    repo = args.repo.resolve()
    work = (args.work or repo / "bench" / "results" / "same-decisions").resolve()
    out = (args.out or repo / "bench" / "results" / "same-decisions.json").resolve()
    shared = (args.shared or repo.parent / "shared").resolve()
    shared = shared / "data" if (shared / "data").is_dir() else shared
    cli = Cli(args)
    started = time.monotonic()
    load_start = [round(v, 2) for v in os.getloadavg()]
    work.mkdir(parents=True, exist_ok=True)

    inputs = work / "inputs"
    if not (inputs / "draw.json").is_file():
        make_inputs(shared, inputs)
    else:
        log(f"reusing the photos drawn in {inputs}")
    draw = json.loads((inputs / "draw.json").read_text())
    build_dir = work / "build"
    if not (build_dir / "bundle" / "manifest.json").is_file():
        bundle = build(cli, inputs, build_dir)
    else:
        bundle = build_dir / "bundle"
        log(f"reusing the bundle {bundle} (delete {build_dir} to build it again)")
    digest = bundle_digest(bundle)

    result: dict[str, Any] = {
        "benchmark": "same_decisions", "schema": SCHEMA, "code": code_version(repo),
        "machine": {"arch": platform.machine(), "python": platform.python_version(), "loadavg_at_start": load_start},
        "draw": draw, "bundle": digest,
        "commands": {t: f"{args.python} -m {m}" for t, m in cli.modules.items()},
    }
    result["eval"] = eval_decisions(cli, bundle, inputs / "probes", work / "eval.json")
    if not args.skip_daemon:
        result["daemon"] = daemon_decisions(cli, bundle, inputs / "probes", work / "daemon", args.timeout)
    if bundle_digest(bundle)["files"] != digest["files"]:
        sys.exit(f"error: the bundle {bundle} changed while it was measured; rebuild it (delete {build_dir})")
    if args.rebuild:
        rebuilt = build(cli, inputs, work / "rebuild")
        result["rebuilt"] = {"bundle": bundle_digest(rebuilt),
                             "eval": eval_decisions(cli, rebuilt, inputs / "probes", work / "eval-rebuilt.json")}
    result["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    result["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as fh:
        fh.write(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    os.chmod(fh.name, 0o644)  # a temporary file is private; the record is for everyone to compare against
    Path(fh.name).replace(out)

    ev = result["eval"]
    print(f"eval: {len(ev['photos'])} photos decided, {len(ev['skipped'])} skipped; "
          f"labels {sorted(set(_labels(d) for d in ev['photos'].values()))}")
    if "daemon" in result:
        d = result["daemon"]
        print(f"daemon: {d['events']} events on {len(d['photos'])} photos, {len(d['no_event'])} photos without an "
              f"event, {len(d['topics'])} MQTT topics")
    if "rebuilt" in result:
        new = result["rebuilt"]["bundle"]["files"]
        differ = sorted(k for k in set(new) | set(digest["files"]) if new.get(k) != digest["files"].get(k))
        print(f"rebuilt bundle: files differing from {bundle}: {', '.join(differ) or 'none'}")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    if args.compare is not None:
        return compare(json.loads(args.compare.read_text()), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
