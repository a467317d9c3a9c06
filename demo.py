"""faceberry end to end on this machine: sample faces → train → convert → device daemon → MQTT.

`./quickstart.sh demo` sets up the environments and runs this. Stages:

1. photos    sample face photos, one folder per person: $FACEBERRY_SAMPLE_PHOTOS (or --photos) if set,
             otherwise Labeled Faces in the Wild through scikit-learn's fetcher (about 200 MB, once).
2. split     picks a few people; for each, some photos to train on and some held out for the camera;
             other people become strangers (in front of the camera) and negatives (for training).
3. train     `python -m train backbone --arch dlib-resnet` (dlib's face embedder rebuilt, seconds), then
             `python -m train --backbone` (a gallery of the people; no training). With --backbone none:
             fine-tunes ImageNet MobileNetV2 ($FACEBERRY_WEIGHTS or --weights), slower and far less accurate.
4. convert   `python -m convert`: the int8 bundle.
5. broker    mosquitto if installed, otherwise amqtt (embedded: a pure-Python broker from PyPI).
6. device    `python -m device check` then `python -m device run` with a folder camera: each held-out photo
             is a "visit" (the photo for a few frames, then an empty frame, as if the person walked off).
             A subscriber prints every event it receives; the summary is computed from those events.
7. latency   `python -m device eval --json` over the same held-out photos, for per-stage device latency.

Everything is written under demo/ (or --workdir); nothing outside it is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from faceberry.contract import UNKNOWN, list_images

ROOT = Path(__file__).resolve().parent
DEVICE_ID = "demo"

# Sizes of the two presets. "standard" is what the README's demo runs; "quick" is for CI and impatient people.
PRESETS: dict[str, dict[str, Any]] = {
    "standard": {"people": 5, "train_photos": 12, "test_photos": 4, "strangers": 6, "negatives": 30,
                 "train_args": []},
    "quick": {"people": 3, "train_photos": 8, "test_photos": 3, "strangers": 3, "negatives": 15,
              "train_args": ["--epochs", "6", "--fine-tune-epochs", "0", "--input-size", "96"]},
}
FRAMES_PER_VISIT = 3  # the daemon decides a face's identity by a vote over this many frames
# Start-up chatter of TensorFlow and LiteRT: kept in the stage's log file, not echoed to the terminal.
NOISE = ("All log messages before absl::InitializeLog", "oneDNN custom operations", "XNNPACK delegate",
         "Assets written to:", "fully_quantize:", "TF_ENABLE_ONEDNN_OPTS")


class DemoError(RuntimeError):
    """A stage failed; the message says which and what to do."""


# ---- small helpers -----------------------------------------------------------------------------------

def say(text: str = "") -> None:
    print(text, flush=True)


def stage(title: str) -> None:
    say(f"\n== {title}")


def images_in(folder: Path) -> list[Path]:
    return list_images(folder)


def people_in(photos: Path) -> dict[str, list[Path]]:
    return {d.name: images_in(d) for d in sorted(photos.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_logged(cmd: list[str], log_path: Path, title: str, env: dict[str, str] | None = None,
               echo: bool = True) -> float:
    """Run a command, streaming its output to the terminal (if echo) and to log_path; returns seconds."""
    say("$ " + " ".join(_short(c) for c in cmd))
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo and not any(n in line for n in NOISE):
                sys.stdout.write("   " + line)
                sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8").strip().splitlines()[-1:] or ["(no output)"]
        raise DemoError(f"{title} failed (exit {rc}): {tail[0]}; full log: {log_path}")
    return time.monotonic() - start


def _short(arg: str) -> str:
    """Paths under the repository shown relative to it, so the printed commands can be copied."""
    with contextlib.suppress(ValueError):
        rel = Path(arg).resolve().relative_to(ROOT)
        if Path(arg).is_absolute():
            return str(rel)
    return arg


# ---- 1. photos ---------------------------------------------------------------------------------------

def lfw_photos(dest: Path, min_faces: int) -> Path:
    """Labeled Faces in the Wild through scikit-learn, as JPEGs in dest/<person>/.

    fetch_lfw_people downloads and unpacks the funneled LFW set once (to ~/scikit_learn_data); its
    arrays are 0–1 floats, so the original JPEGs are copied from the unpacked folder rather than
    re-encoded. Asking for a tiny resize keeps its in-memory copy small.
    """
    if dest.is_dir() and people_in(dest):
        return dest
    try:
        from sklearn.datasets import fetch_lfw_people, get_data_home
    except ImportError as exc:
        raise DemoError("scikit-learn is missing; run ./quickstart.sh demo (it installs requirements-train.txt)") \
            from exc
    say(f"downloading Labeled Faces in the Wild with scikit-learn (people with >= {min_faces} photos; "
        "about 200 MB, only the first time) …")
    try:
        lfw = fetch_lfw_people(min_faces_per_person=min_faces, color=False, resize=0.1, download_if_missing=True)
    except Exception as exc:  # network errors come in many types
        raise DemoError(f"could not download LFW ({exc}); check the network, or set FACEBERRY_SAMPLE_PHOTOS to a "
                        "folder of <person>/*.jpg photos") from exc
    names = sorted({str(n) for n in lfw.target_names})
    unpacked = Path(get_data_home()) / "lfw_home" / "lfw_funneled"
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if unpacked.is_dir():
        for name in names:
            src = unpacked / name.replace(" ", "_")
            if src.is_dir():
                shutil.copytree(src, tmp / name.replace(" ", "_"))
    else:  # a scikit-learn that keeps its files elsewhere: write the arrays out instead
        write_lfw_arrays(tmp, min_faces)
    if not tmp.is_dir() or not people_in(tmp):
        raise DemoError("LFW downloaded but no photos were found; set FACEBERRY_SAMPLE_PHOTOS to a folder instead")
    tmp.rename(dest)
    return dest


def write_lfw_arrays(dest: Path, min_faces: int) -> None:
    """LFW via fetch_lfw_people's arrays (full 250×250 colour frames) written as JPEGs to dest/<person>/."""
    import cv2
    import numpy as np
    from sklearn.datasets import fetch_lfw_people

    lfw = fetch_lfw_people(min_faces_per_person=max(min_faces, 50), color=True, resize=1.0, slice_=None)
    counts: Counter[str] = Counter()
    for image, target in zip(lfw.images, lfw.target, strict=True):
        name = str(lfw.target_names[target]).replace(" ", "_")
        pixels = image * 255.0 if image.max() <= 1.0 else image  # scikit-learn >= 1.x returns 0–1 floats
        out = dest / name / f"{name}_{counts[name] + 1:04d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(np.clip(pixels, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        counts[name] += 1


# ---- 2. split ----------------------------------------------------------------------------------------

@dataclass
class Visit:
    """One held-out photo shown to the camera."""

    index: int
    photo: str
    person: str  # the true person, or the stranger's name
    known: bool  # whether the model was trained on this person
    frames: list[str] = field(default_factory=list)  # the camera-folder file names showing it


@dataclass
class Plan:
    people: list[str]
    train_dir: Path
    negatives_dir: Path
    test_dir: Path
    camera_dir: Path
    cohort_dir: Path | None = None  # every other person who is not a stranger at the camera
    visits: list[Visit] = field(default_factory=list)
    screened_out: list[str] = field(default_factory=list)


def one_face(detector: Any, path: Path) -> bool:
    from faceberry.preprocess import ImageError, load_image

    try:
        return len(detector.detect(load_image(path))) == 1
    except ImageError:
        return False


def make_plan(photos: Path, work: Path, preset: dict[str, Any], seed: int) -> Plan:
    """Choose people and photos; write train/, negatives/, test/ and the camera folder."""
    import cv2
    import numpy as np

    from faceberry.detector import FaceDetector
    from faceberry.models import default_detector_path

    everyone = people_in(photos)
    need = preset["train_photos"] + preset["test_photos"]
    eligible = sorted(p for p, imgs in everyone.items() if len(imgs) >= need)
    if len(eligible) < preset["people"]:
        raise DemoError(f"{photos} has {len(eligible)} people with >= {need} photos; the demo needs "
                        f"{preset['people']}: point FACEBERRY_SAMPLE_PHOTOS at a bigger set")
    rng = random.Random(seed)
    people = sorted(rng.sample(eligible, preset["people"]))
    others = sorted(p for p, imgs in everyone.items() if p not in people and imgs)
    rng.shuffle(others)
    strangers = others[:preset["strangers"]]
    negatives = others[preset["strangers"]:preset["strangers"] + preset["negatives"]]
    if len(strangers) < preset["strangers"]:
        raise DemoError(f"{photos} has too few other people to act as strangers")

    plan = Plan(people, work / "photos", work / "negatives", work / "test", work / "camera")
    plan.cohort_dir = work / "cohort-faces"
    for d in (plan.train_dir, plan.negatives_dir, plan.test_dir, plan.camera_dir, plan.cohort_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    # The stranger cohort that calibrates `unknown`: people who are neither the household nor the strangers
    # the camera will see (a user builds theirs from LFW: `python -m train cohort --lfw`).
    for name in others[preset["strangers"]:]:
        (plan.cohort_dir / name).mkdir()
        for img in everyone[name]:
            (plan.cohort_dir / name / img.name).symlink_to(img.resolve())
    detector = FaceDetector(default_detector_path(), min_face_size=40)
    shows: list[tuple[Path, str, bool]] = []
    for person in people:
        imgs = list(everyone[person])
        rng.shuffle(imgs)
        (plan.train_dir / person).mkdir()
        for img in imgs[:preset["train_photos"]]:
            shutil.copy2(img, plan.train_dir / person / img.name)
        shows += [(img, person, True) for img in imgs[preset["train_photos"]:need]]
    for name in negatives:
        (plan.negatives_dir / name).mkdir()
        for img in everyone[name][:2]:
            shutil.copy2(img, plan.negatives_dir / name / img.name)
    for name in strangers:
        shows.append((rng.choice(everyone[name]), name, False))
    rng.shuffle(shows)

    # The camera only sees photos with exactly one face, so that each visit is one face and one event
    # (events name the frame file that decided them, which maps back to its visit); the others are
    # reported, not hidden.
    blank: np.ndarray | None = None
    frame_no = 0
    for img, person, known in shows:
        if not one_face(detector, img):
            plan.screened_out.append(str(img))
            continue
        visit = Visit(len(plan.visits), str(img), person, known)
        plan.visits.append(visit)
        (plan.test_dir / person).mkdir(exist_ok=True)
        copy_for_device(img, plan.test_dir / person / img.stem)
        for _ in range(FRAMES_PER_VISIT):
            name = copy_for_device(img, plan.camera_dir / f"{frame_no:05d}")
            visit.frames.append(name)
            frame_no += 1
        if blank is None:
            from faceberry.preprocess import load_image

            blank = np.zeros(load_image(img).shape, dtype=np.uint8)
        # An empty frame: the person has walked off, the track ends before the next visit.
        cv2.imwrite(str(plan.camera_dir / f"{frame_no:05d}.png"), blank)
        frame_no += 1
    (work / "visits.json").write_text(json.dumps([asdict(v) for v in plan.visits], indent=1) + "\n")
    return plan


def copy_for_device(img: Path, dest_stem: Path) -> str:
    """`img` copied to dest_stem + its suffix; a phone photo (HEIC/AVIF) written as PNG instead, because the
    daemon and `device eval` run in the Pi's environment, which reads no phone formats. Returns the file name."""
    import cv2

    from faceberry.contract import PHONE_SUFFIXES
    from faceberry.preprocess import load_image

    if img.suffix.lower() in PHONE_SUFFIXES:
        dest = dest_stem.with_name(dest_stem.name + ".png")
        cv2.imwrite(str(dest), cv2.cvtColor(load_image(img), cv2.COLOR_RGB2BGR))
    else:
        dest = dest_stem.with_name(dest_stem.name + img.suffix.lower())
        shutil.copy2(img, dest)
    return dest.name


# ---- 5. broker ---------------------------------------------------------------------------------------

def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((c for c in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(c).is_file()), None)


def _wait_for_port(port: int, timeout: float, proc: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            other = "embedded" if name == "mosquitto" else "mosquitto"
            raise DemoError(f"{name} exited at once (exit {proc.returncode}, see {log}); try --broker {other}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise DemoError(f"{name} did not accept connections on 127.0.0.1:{port} within {timeout:g}s (see {log})")


@contextlib.contextmanager
def _broker_process(cmd: list[str], name: str, port: int, log_path: Path) -> Iterator[None]:
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            _wait_for_port(port, 10, proc, name, log_path)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def amqtt_version() -> str | None:
    """The installed amqtt (requirements-train.txt), found without importing it; None when absent."""
    from importlib import metadata

    try:
        return metadata.version("amqtt")
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def local_broker(choice: str, work: Path) -> Iterator[tuple[str, int]]:
    """Start a broker on a free loopback port: yields (description, port).

    auto: mosquitto if installed, else the embedded one; embedded: amqtt (a maintained pure-Python broker
    from PyPI, in requirements-train.txt) run by this Python in a child process. Neither is the Pi's broker.
    """
    binary = mosquitto_binary() if choice in ("auto", "mosquitto") else None
    if choice == "mosquitto" and binary is None:
        raise DemoError("mosquitto is not installed (sudo apt install mosquitto); or use --broker embedded")
    port = free_port()
    if binary:
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n", encoding="utf-8")
        with _broker_process([binary, "-c", str(conf)], "mosquitto", port, work / "mosquitto.log"):
            yield f"mosquitto ({binary})", port
        return
    version = amqtt_version()
    if version is None:
        raise DemoError(
            f"no MQTT broker: mosquitto is not installed (sudo apt install mosquitto) and amqtt is not in "
            f"{sys.executable}'s environment (pip install -r requirements-train.txt)"
        )
    conf = work / "amqtt.yaml"
    conf.write_text(
        f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n",
        encoding="utf-8",
    )
    cmd = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
    with _broker_process(cmd, "amqtt", port, work / "amqtt.log"):
        yield f"embedded amqtt {version} (pure-Python broker from PyPI)", port


class Subscriber:
    """A paho client on faceberry/<device>/#: what a Home Assistant would receive."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.received: queue.Queue[tuple[float, str, bytes, bool]] = queue.Queue()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="faceberry-demo-subscriber")
        topic = f"faceberry/{DEVICE_ID}/#"

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            client.subscribe(topic, qos=1)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = lambda c, u, msg: self.received.put(
            (time.monotonic(), msg.topic, msg.payload, bool(msg.retain)))
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise DemoError(f"the subscriber could not subscribe at 127.0.0.1:{port}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- 6. the daemon -----------------------------------------------------------------------------------

def write_config(path: Path, bundle: Path, camera: Path, port: int) -> None:
    import yaml

    config = {
        "bundle": str(bundle),
        "device_id": DEVICE_ID,
        "camera": {"source": "folder", "device": str(camera), "name": "demo-photos"},
        # Each visit is FRAMES_PER_VISIT frames of one photo, then one empty frame: the vote covers the
        # visit and the track ends with it (max_age 0), so every visit is decided exactly once.
        "tracking": {"votes_needed": FRAMES_PER_VISIT, "max_age": 0},
        # A real door wants a cooldown; the demo wants one event per visit, even for the same person.
        "events": {"cooldown": 0},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "stats_interval": 3600,
        # The outbox and status file stay in demo/, not in the system's /var/lib/faceberry.
        "state_dir": str(path.parent / "state"),
    }
    path.write_text("# written by demo.py; see systemd/faceberry.example.yaml for every key\n"
                    + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


@dataclass
class Outcome:
    visit: Visit
    label: str
    score: float

    @property
    def right(self) -> bool:
        return self.label == (self.visit.person if self.visit.known else UNKNOWN)


def run_daemon(device_python: str, config: Path, sub: Subscriber, visits: list[Visit], log_path: Path,
               timeout: float) -> dict[str, Any]:
    """Run `device run` until the folder ends; print and collect what the subscriber receives."""
    cmd = [device_python, "-m", "device", "run", "--config", str(config)]
    say("$ " + " ".join(_short(c) for c in cmd) + f"   (log: {_short(str(log_path))})")
    by_frame = {name: v for v in visits for name in v.frames}
    outcomes: list[Outcome] = []
    statuses: list[str] = []
    other: list[str] = []
    first_event_s: float | None = None
    unmatched = 0
    exited_at: float | None = None
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    when, topic, payload, retained = sub.received.get(timeout=0.2)
                except queue.Empty:
                    if proc.poll() is not None:
                        # Done once its "offline" arrived (or, failing that, shortly after it exited).
                        exited_at = exited_at or time.monotonic()
                        if "offline" in statuses or time.monotonic() - exited_at > 3:
                            break
                    if time.monotonic() - start > timeout:
                        raise DemoError(f"the daemon ran longer than {timeout:g}s; see {log_path}") from None
                    continue
                if topic.endswith("/status"):
                    statuses.append(payload.decode())
                    say(f"   {topic} {payload.decode()}{' (retained)' if retained else ''}")
                    continue
                if not topic.endswith("/events"):
                    other.append(topic)
                    continue
                event = json.loads(payload)
                if first_event_s is None:
                    first_event_s = when - start
                # The event names the camera frame that decided it, and each frame belongs to one visit.
                visit = by_frame.get(Path(event["source"]).name) if event.get("source") else None
                if visit is None:
                    unmatched += 1
                    say(f"   event {event['label']} from {event.get('source')}: not a frame of any visit")
                    continue
                outcome = Outcome(visit, str(event["label"]), float(event["score"]))
                outcomes.append(outcome)
                truth = visit.person if visit.known else f"stranger ({visit.person})"
                say(f"   event #{len(outcomes):<3} {outcome.label:<26} score {outcome.score:.2f}  track "
                    f"{event['track_id']:<3} {'right' if outcome.right else 'WRONG'}: {truth}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8").strip().splitlines()[-1:] or ["(no output)"]
        raise DemoError(f"the device daemon failed (exit {proc.returncode}): {tail[0]}; log: {log_path}")
    return {"outcomes": outcomes, "statuses": statuses, "other_topics": other, "unmatched": unmatched,
            "seconds": elapsed, "first_event_s": first_event_s}


# ---- the summary -------------------------------------------------------------------------------------

def agreement_with_eval(outcomes: list[Outcome], probes: list[dict[str, Any]]) -> tuple[int, int]:
    """(agreeing, compared): the daemon's event label against `device eval`'s answer for the same photo.

    The same code decides both, so they should agree on every photo; a mismatch means events were
    matched to the wrong photos (or the daemon and eval paths diverged)."""
    by_file = {(str(p.get("folder")), Path(str(p.get("path"))).name): p.get("predicted") for p in probes}
    compared = agreeing = 0
    for o in outcomes:
        predicted = by_file.get((o.visit.person, Path(o.visit.photo).name))
        if predicted is not None:
            compared += 1
            agreeing += predicted == o.label
    return agreeing, compared


def summarise(result: dict[str, Any], visits: list[Visit], timings: dict[str, float],
              latency: dict[str, Any] | None, eval_probes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    outcomes: list[Outcome] = result["outcomes"]
    known = [o for o in outcomes if o.visit.known]
    strangers = [o for o in outcomes if not o.visit.known]
    summary = {
        "faces_shown": len(visits),
        "events_received": len(outcomes) + result["unmatched"],
        "known_faces": len(known),
        "known_right": sum(o.right for o in known),
        "known_unknown": sum(o.label == UNKNOWN for o in known),
        "known_wrong_person": sum(o.label not in (UNKNOWN, o.visit.person) for o in known),
        "strangers": len(strangers),
        "strangers_right": sum(o.right for o in strangers),
        "status": result["statuses"],
        "seconds": timings,
        "first_event_s": result["first_event_s"],
        "latency_ms": latency,
        "agrees_with_eval": agreement_with_eval(outcomes, eval_probes or []),
    }

    def pct(a: int, b: int) -> str:
        return f"{100.0 * a / b:.0f}%" if b else "-"

    stage("summary (computed from the events the subscriber received)")
    say(f"faces shown to the camera: {summary['faces_shown']}, events received: {summary['events_received']}")
    say(f"known people:  {summary['known_right']} of {summary['known_faces']} recognised correctly "
        f"({pct(summary['known_right'], summary['known_faces'])}); {summary['known_unknown']} called unknown, "
        f"{summary['known_wrong_person']} taken for someone else")
    say(f"strangers:     {summary['strangers_right']} of {summary['strangers']} called unknown "
        f"({pct(summary['strangers_right'], summary['strangers'])}); "
        f"{summary['strangers'] - summary['strangers_right']} taken for someone known")
    agree, compared = summary["agrees_with_eval"]
    if compared:
        say(f"cross-check:   the events agree with `device eval` on {agree} of {compared} photos")
    say(f"device status messages: {' → '.join(result['statuses']) or 'none'}")
    say("time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    if result["first_event_s"] is not None:
        say(f"first event {result['first_event_s']:.1f} s after the daemon started (includes loading the models)")
    if latency:
        parts = [f"{k} {v['median']:.1f}/{v['p95']:.1f}" for k, v in latency.items()
                 if isinstance(v, dict) and "median" in v]
        say("device latency per face, median/p95 ms (device eval, 1 thread): " + ", ".join(parts))
    return summary


# ---- main --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python demo.py",
        description="faceberry end to end: sample photos → train → convert → device daemon → MQTT events, "
        "with a summary computed from the events a subscriber receives. Normally run by ./quickstart.sh demo.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                        help="size of the run: standard (5 people, ~the README's timing) or quick "
                        "(3 people, a short training; for CI)")
    parser.add_argument("--photos", type=Path, default=os.environ.get("FACEBERRY_SAMPLE_PHOTOS") or None,
                        help="folder of <person>/*.jpg to draw people from (default: $FACEBERRY_SAMPLE_PHOTOS, "
                        "else Labeled Faces in the Wild downloaded with scikit-learn)")
    parser.add_argument("--weights", default=os.environ.get("FACEBERRY_WEIGHTS") or "imagenet",
                        help="MobileNetV2 initialisation passed to `python -m train --weights` (default: "
                        "$FACEBERRY_WEIGHTS, else imagenet)")
    parser.add_argument("--backbone", default=os.environ.get("FACEBERRY_BACKBONE") or "dlib-resnet",
                        help="face backbone for `python -m train --backbone`: dlib-resnet (default; built in seconds "
                        "with `python -m train backbone --arch dlib-resnet`), a backbone directory, or none to "
                        "fine-tune ImageNet MobileNetV2 instead (much less accurate); default $FACEBERRY_BACKBONE")
    parser.add_argument("--workdir", type=Path, default=ROOT / "demo",
                        help="where everything is written (default demo/)")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                        help="auto: mosquitto if installed, else embedded (amqtt, a pure-Python broker from PyPI)")
    parser.add_argument("--device-python", default=sys.executable,
                        help="Python of the device environment (requirements-device.txt) that runs the daemon "
                        "(default: this one)")
    parser.add_argument("--seed", type=int, default=0, help="which people and photos are picked (default 0)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the daemon may run (default 600)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    say(f"faceberry demo ({args.preset} preset): sample faces → train → convert → device daemon → MQTT events. "
        f"Everything goes to {_short(str(args.workdir.resolve()))}/.")
    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        stage("1. sample photos")
        t0 = time.monotonic()
        if args.photos:
            photos = Path(args.photos).resolve()
            if not photos.is_dir():
                raise DemoError(f"photo folder not found: {photos}; fix --photos or FACEBERRY_SAMPLE_PHOTOS")
        else:
            photos = lfw_photos(work / "lfw", min_faces=preset["train_photos"] + preset["test_photos"])
        everyone = people_in(photos)
        say(f"{photos}: {len(everyone)} people, {sum(map(len, everyone.values()))} photos")

        stage("2. pick people, hold out photos for the camera")
        plan = make_plan(photos, work, preset, args.seed)
        timings["photos"] = time.monotonic() - t0
        n_known = sum(v.known for v in plan.visits)
        say(f"people: {', '.join(plan.people)}")
        say(f"training on {preset['train_photos']} photos each (+ {preset['negatives']} other people as "
            f"negatives); the camera will see {n_known} held-out photos of them and "
            f"{len(plan.visits) - n_known} strangers")
        if plan.screened_out:
            say(f"{len(plan.screened_out)} held-out photos left out: not exactly one face found")

        stage("3. train")
        run_dir, bundle = work / "run", work / "bundle"
        backbone: Path | None = None
        t_backbone = 0.0
        if args.backbone == "dlib-resnet":
            backbone = work / "backbone"
            t_backbone = run_logged(
                [sys.executable, "-m", "train", "backbone", "--arch", "dlib-resnet", "--out", str(backbone),
                 "--force"], work / "backbone.log", "face backbone (dlib's ResNet, rebuilt)", env)
            t_backbone += run_logged(
                [sys.executable, "-m", "train", "cohort", "--backbone", str(backbone), "--photos",
                 str(plan.cohort_dir), "--max-per-person", "20"], work / "cohort.log",
                "stranger cohort (other people's faces, embeddings only)", env)
        elif args.backbone != "none":
            backbone = Path(args.backbone)
        timings["training"] = t_backbone + run_logged(
            [sys.executable, "-m", "train", "--photos", str(plan.train_dir), "--negatives", str(plan.negatives_dir),
             "--out", str(run_dir), "--force", "--seed", str(args.seed),
             # --weights initialises the fine-tune only; a backbone run would say it ignores them.
             *(["--backbone", str(backbone)] if backbone else ["--weights", str(args.weights), *preset["train_args"]])],
            work / "train.log", "training" if backbone is None else "few-shot gallery", env)
        report = run_dir / "report.json"
        if report.is_file():
            plots = " (and curves.png, confusion.png beside it)" if backbone is None else ""
            say(f"training report: {_short(str(report))}{plots}")

        stage("4. convert to an int8 bundle")
        shutil.rmtree(bundle, ignore_errors=True)
        timings["conversion"] = run_logged(
            [sys.executable, "-m", "convert", "--run", str(run_dir), "--out", str(bundle)],
            work / "convert.log", "conversion", env)

        stage("5. MQTT broker")
        with local_broker(args.broker, work) as (broker_name, port):
            say(f"{broker_name} on 127.0.0.1:{port}")
            config = work / "device.yaml"
            write_config(config, bundle, plan.camera_dir, port)

            stage("6. device: check, then run over the held-out photos")
            run_logged([args.device_python, "-m", "device", "check", "--config", str(config)],
                       work / "check.log", "device check", env)
            sub = Subscriber(port)
            try:
                result = run_daemon(args.device_python, config, sub, plan.visits, work / "daemon.log",
                                    args.timeout)
            finally:
                sub.close()
        timings["device"] = result["seconds"]

        stage("7. per-stage device latency (device eval over the same photos)")
        eval_json = work / "eval.json"
        timings["eval"] = run_logged(
            [args.device_python, "-m", "device", "eval", "--bundle", str(bundle), "--photos", str(plan.test_dir),
             "--json", str(eval_json), "--quiet"],
            work / "eval.log", "device eval", env)
        evaluation = json.loads(eval_json.read_text()) if eval_json.is_file() else {}
        latency = evaluation.get("latency_ms")

        timings["total"] = time.monotonic() - started
        summary = summarise(result, plan.visits, timings, latency, evaluation.get("probes"))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        if not result["outcomes"]:
            raise DemoError(f"the subscriber received no events; see {work / 'daemon.log'}")
        if len(result["outcomes"]) != len(plan.visits) or result["unmatched"]:
            say(f"warning: {len(plan.visits)} faces shown but {len(result['outcomes']) + result['unmatched']} "
                "events received (a track that changed its mind, or a face decided twice)")
        say(f"\nEverything is in {_short(str(work))}/: the bundle (bundle/), the training report (run/), "
            "logs, and device.yaml.")
        return 0
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
