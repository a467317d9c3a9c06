"""End to end with a real Home Assistant: `python -m bench.homeassistant_e2e --bundle BUNDLE`.

1. Installs Home Assistant Core from PyPI into its own venv (`.venv-ha`, `--ha-version`, default the 2024.1
   series: the newest that supports Python 3.11) unless it is there already.
2. Starts a loopback mosquitto, and Home Assistant with a fresh config dir; onboards a user over REST,
   adds the MQTT integration by its config flow, pointed at that mosquitto.
3. Runs `python -m device run` over a looping folder: a photo the bundle recognises, empty frames, a face
   it does not know (from --lfw), empty frames; with discovery, images, commands and strangers on.
4. Reads every promised entity back through Home Assistant's REST API and checks its state; then names the
   unknown face with Home Assistant's own `mqtt.publish` action, checks that the Face event entity reports
   the new name and the Bundle sensor the new bundle id; presses "Last recognition was wrong" (a
   `button.press`) and checks the face becomes `unknown`; "Undo" brings the name back.

Prints one line per check and a JSON summary (timings included); exit 0 when every check passed. Slow
(Home Assistant installs integration requirements on its first start), so not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "e2e"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def ensure_ha(venv: Path, version: str) -> Path:
    hass = venv / "bin" / "hass"
    if not hass.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"homeassistant{version}"], check=True)
    return hass


class Rest:
    def __init__(self, base: str) -> None:
        self.base = base
        self.token: str | None = None

    def call(self, method: str, path: str, data: Any = None, form: bool = False) -> Any:
        body, headers = None, {}
        if data is not None:
            if form:
                body = urllib.parse.urlencode(data).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                body = json.dumps(data).encode()
                headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else None

    def states(self) -> list[dict]:
        return self.call("GET", "/api/states")


def onboard(rest: Rest) -> None:
    client_id = rest.base + "/"
    code = rest.call("POST", "/api/onboarding/users", {"client_id": client_id, "name": "e2e", "username": "e2e",
                                                        "password": "e2e-password-1", "language": "en"})["auth_code"]
    token = rest.call("POST", "/auth/token", {"grant_type": "authorization_code", "code": code,
                                              "client_id": client_id}, form=True)
    rest.token = token["access_token"]


def add_mqtt(rest: Rest, port: int) -> dict:
    flow = rest.call("POST", "/api/config/config_entries/flow", {"handler": "mqtt", "show_advanced_options": False})
    for _ in range(3):
        if flow.get("type") == "create_entry":
            return flow
        flow = rest.call("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                         {"broker": "127.0.0.1", "port": port})
    raise RuntimeError(f"the MQTT config flow did not finish: {flow}")


def pick_photos(bundle: Path, lfw: Path) -> tuple[str, Path, Path, int]:
    """(a person, a photo the bundle names as them, a photo of someone else it calls unknown, people)."""
    from device.bundle import load_bundle
    from device.contract import list_images
    from device.pipeline import FacePipeline
    from device.preprocess import load_image

    b = load_bundle(bundle)
    pipe = FacePipeline(b, num_threads=2)

    def label(photo: Path) -> str:
        recs = pipe.process(load_image(photo)).recognitions
        return max(recs, key=lambda r: r.face.width).prediction.label if recs else ""

    known = next(((p, ph) for p in b.labels if (lfw / p).is_dir() for ph in list_images(lfw / p)[:10]
                  if label(ph) == p), None)
    stranger = next((ph for d in sorted(lfw.iterdir())[::-1] if d.is_dir() and d.name not in b.labels
                     for ph in list_images(d)[:1] if label(ph) == "unknown"), None)
    if known is None or stranger is None:
        raise SystemExit(f"error: cannot find a recognised and an unknown photo in {lfw} for {bundle}")
    return known[0], known[1], stranger, len([p for p in b.labels if p != "unknown"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an embedding bundle (copied, never changed)")
    ap.add_argument("--lfw", type=Path, default=ROOT.parent / "shared" / "data" / "faces" / "lfw-dev",
                    help="photo folders <person>/*.jpg to pick a known and an unknown face from")
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-ha", help="Home Assistant's own venv")
    ap.add_argument("--ha-version", default=">=2024.1,<2024.2", help="pip version spec for homeassistant")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds Home Assistant may take to start")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    hass = ensure_ha(args.venv, args.ha_version)
    version = subprocess.run([str(hass), "--version"], capture_output=True, text=True).stdout.strip()
    timings: dict[str, float] = {"install_s": round(time.monotonic() - t0, 1)}
    work = args.work or Path(tempfile.mkdtemp(prefix="faceberry-ha-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    person, known_photo, stranger_photo, people = pick_photos(args.bundle, args.lfw)
    newcomer = "Newcomer"
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: Any = "") -> bool:
        checks.append((name, bool(ok), str(detail)[:300]))
        print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else f': {detail}'}", flush=True)
        return bool(ok)

    procs: list[subprocess.Popen] = []
    try:
        mport, hport = free_port(), free_port()
        (work / "mosquitto.conf").write_text(f"listener {mport} 127.0.0.1\nallow_anonymous true\n"
                                             "persistence false\n")
        procs.append(subprocess.Popen(["mosquitto", "-c", str(work / "mosquitto.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert wait_port(mport, 10), "mosquitto did not start"
        ha_dir = work / "ha"
        ha_dir.mkdir(exist_ok=True)
        (ha_dir / "configuration.yaml").write_text(yaml.safe_dump({
            "homeassistant": {"name": "e2e", "latitude": 0, "longitude": 0, "elevation": 0, "unit_system": "metric",
                              "time_zone": "UTC"},
            "http": {"server_host": "127.0.0.1", "server_port": hport},
            "api": None, "onboarding": None, "config": None, "logger": {"default": "warning"},
        }))
        t1 = time.monotonic()
        ha_log = open(work / "ha.log", "w")  # noqa: SIM115 - open while HA runs
        procs.append(subprocess.Popen([str(hass), "-c", str(ha_dir)], stdout=ha_log, stderr=subprocess.STDOUT))
        rest = Rest(f"http://127.0.0.1:{hport}")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                rest.call("GET", "/api/onboarding")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        else:
            raise SystemExit(f"error: Home Assistant did not answer within {args.timeout:.0f}s; see {work}/ha.log")
        timings["ha_start_s"] = round(time.monotonic() - t1, 1)
        onboard(rest)
        check("onboarding over REST gives a token", rest.token)
        entry = add_mqtt(rest, mport)
        check("MQTT integration added by its config flow", entry.get("type") == "create_entry", entry)

        # The daemon over a looping folder.
        camera = work / "camera"
        camera.mkdir(exist_ok=True)
        for name, src in (("a_known.jpg", known_photo), ("c_unknown.jpg", stranger_photo)):
            (camera / name).unlink(missing_ok=True)
            (camera / name).symlink_to(src.resolve())
        for i in range(8):
            cv2.imwrite(str(camera / f"b_empty_{i}.jpg"), np.full((240, 320, 3), 128, np.uint8))
            cv2.imwrite(str(camera / f"d_empty_{i}.jpg"), np.full((240, 320, 3), 128, np.uint8))
        bundle = work / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(args.bundle, bundle)
        config = work / "faceberry.yaml"
        config.write_text(yaml.safe_dump({
            "bundle": str(bundle), "device_id": DEVICE, "state_dir": str(work / "state"),
            "camera": {"source": "folder", "device": str(camera), "loop": True, "fps": 4},
            "tracking": {"votes_needed": 1, "max_age": 0}, "events": {"cooldown": 0, "homeassistant": True},
            "homeassistant": {"presence_timeout": 2, "images": True, "commands": True},
            "memory": {"strangers": True}, "mqtt": {"host": "127.0.0.1", "port": mport}, "stats_interval": 2,
        }))
        daemon_log = open(work / "daemon.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(config)], cwd=ROOT,
                                      stdout=daemon_log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}))

        def entity(suffix: str, states: list[dict]) -> dict | None:
            """A state by its friendly name's end (HA names MQTT entities '<device name> <entity name>')."""
            return next((s for s in states if s["attributes"].get("friendly_name", "").endswith(suffix)), None)

        def wait(pred, timeout: float = 90) -> list[dict]:
            end = time.monotonic() + timeout
            while True:
                states = rest.states()
                if pred(states) or time.monotonic() > end:
                    return states
                time.sleep(1)

        names = ["Face", "Last face", f"{person} present", f"{person} last seen", "Last face image",
                 "Last unknown face image", "Frames per second", "Detect time", "Align time", "Classify time",
                 "Dropped frames", "Outbox depth", "Bundle", "People enrolled", "Name the last unknown face",
                 "Last recognition was wrong", "Undo last correction", "Forget stored faces and strangers"]
        t2 = time.monotonic()
        states = wait(lambda st: all(entity(n, st) for n in names) and entity("Frames per second", st)["state"]
                      not in ("unknown", "unavailable"))
        timings["entities_s"] = round(time.monotonic() - t2, 1)
        for n in names:
            check(f"entity '{n}' exists", entity(n, states), [s["entity_id"] for s in states])
        face = entity("Face", states)
        check("event entity lists the people and unknown",
              face and set(face["attributes"].get("event_types", [])) >= {person, "unknown"}, face)
        check("fps diagnostic is a number > 0", float(entity("Frames per second", states)["state"]) > 0)
        check("'People enrolled' is the bundle's", entity("People enrolled", states)["state"] == str(people),
              entity("People enrolled", states))
        states = wait(lambda st: entity(f"{person} present", st)["state"] == "on", 60)
        check(f"'{person} present' turns on", entity(f"{person} present", states)["state"] == "on")
        states = wait(lambda st: entity(f"{person} present", st)["state"] == "off", 60)
        check(f"'{person} present' turns off when unseen", entity(f"{person} present", states)["state"] == "off")
        check(f"'{person} last seen' is a timestamp", "T" in entity(f"{person} last seen", states)["state"])
        states = wait(lambda st: entity("Face", st)["attributes"].get("event_type") == "unknown", 60)
        face = entity("Face", states)
        check("an unknown face fires the event entity with a stranger_id",
              face["attributes"].get("event_type") == "unknown" and face["attributes"].get("stranger_id"), face)
        check("image entity has a picture", entity("Last unknown face image", states)["state"] not in
              ("unknown", "unavailable"), entity("Last unknown face image", states))
        old_bundle = entity("Bundle", states)["state"]

        # Naming, from Home Assistant's own mqtt.publish.
        t3 = time.monotonic()
        rest.call("POST", "/api/services/mqtt/publish", {"topic": f"faceberry/{DEVICE}/command", "payload": json.dumps(
            {"command": "name_last_unknown", "name": newcomer})})
        states = wait(lambda st: entity("Face", st)["attributes"].get("event_type") == newcomer, 120)
        timings["naming_s"] = round(time.monotonic() - t3, 1)
        face = entity("Face", states)
        check("after mqtt.publish name_last_unknown the face is named",
              face["attributes"].get("event_type") == newcomer, face)
        check("... by the new bundle", face["attributes"].get("bundle") not in (None, old_bundle), face)
        states = wait(lambda st: entity("Bundle", st)["state"] != old_bundle, 30)
        check("the Bundle sensor shows the new bundle id", entity("Bundle", states)["state"] != old_bundle)
        states = wait(lambda st: entity(f"{newcomer} present", st) is not None, 30)
        check("the new person's presence entity was discovered", entity(f"{newcomer} present", states))

        # Correction of that event, by mqtt.publish; undo by the dashboard's button.
        event_id = face["attributes"].get("event_id")
        rest.call("POST", "/api/services/mqtt/publish", {"topic": f"faceberry/{DEVICE}/command", "payload": json.dumps(
            {"command": "wrong", "event_id": event_id, "not": newcomer})})
        states = wait(lambda st: entity("Face", st)["attributes"].get("event_type") == "unknown", 60)
        face = entity("Face", states)
        check("after 'wrong' the same face is unknown", face["attributes"].get("event_type") == "unknown", face)
        undo = entity("Undo last correction", states)["entity_id"]
        rest.call("POST", "/api/services/button/press", {"entity_id": undo})
        states = wait(lambda st: entity("Face", st)["attributes"].get("event_type") == newcomer, 60)
        check("after 'undo' the name is back", entity("Face", states)["attributes"].get("event_type") == newcomer)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    timings["total_s"] = round(time.monotonic() - t0, 1)
    passed = sum(ok for _, ok, _ in checks)
    summary = {"homeassistant": version, "checks": len(checks), "passed": passed, "timings": timings,
               "work": str(work), "failed": [(n, d) for n, ok, d in checks if not ok]}
    print(json.dumps(summary, indent=1))
    return 0 if checks and passed == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
