"""`faceberry status`: what the daemon is doing (from its status file) and which bundle versions the store holds.

The daemon writes `<state_dir>/status-<device_id>.json` at start, at its first frame, every few seconds
(faceberry.device.service.STATUS_WRITE_S), after each reload and at its stop; this reads it and checks that the pid
is still alive, so a daemon killed without writing its last status is reported as not running. What a
daemon that is not running last wrote (fps, MQTT state) describes the past: it is shown as "last" values
with the file's age, and its MQTT state is not reported as a connection now. Exit 0 when a daemon is
running, 3 when none is (as `systemctl status` does for an inactive unit).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from faceberry.device.ops.reloader import is_faceberry, pid_alive, read_setup, status_files, store_root
from faceberry.device.ops.status_file import StatusFile, check_status
from faceberry.device.ops.store import BundleStore, StoreError, default_root
from faceberry.errors import EXIT_OK, EXIT_UNAVAILABLE

HELP = "show the running daemon (bundle, fps, MQTT, reloads) and the bundle versions in the store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", default=None,
                       help="config file naming state_dir, device_id and the bundle (default: $FACEBERRY_CONFIG "
                       "or /etc/faceberry/config.yaml, when readable)")
    where.add_argument("--state-dir", type=Path, default=None,
                       help="read every status-*.json in this directory instead of the config's state_dir")
    parser.add_argument("--store", default=None,
                        help=f"the versions store (default: the parent of the config's `bundle:` when that is "
                        f"<store>/current, else {default_root(None)})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _age_s(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            moment = datetime.strptime(stamp, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        return round(time.time() - moment.timestamp(), 1)
    return None


def daemon_view(path: Path, status: StatusFile) -> dict[str, Any]:
    alive = pid_alive(status.pid) and is_faceberry(status.pid)
    # `running` in the file is the daemon's word; a daemon killed (-9, power cut) never took it back.
    running = status.running and alive
    view = {**status.model_dump(mode="json"), "status_file": str(path), "alive": alive, "running": running,
            "stale": status.running and not alive, "age_s": _age_s(status.updated_at)}
    if not running:
        # A daemon that is not running has no connection and no frame rate now, whatever it last wrote.
        view["last_mqtt_state"], view["mqtt_state"] = status.mqtt_state, "none (not running)"
        view["last_fps"], view["fps"] = status.fps, 0.0
    return view


def store_view(root: Path) -> dict[str, Any]:
    try:
        store = BundleStore(root)
        return {"root": str(root), "current": store.current(), "previous": store.previous(),
                "versions": store.versions()}
    except (StoreError, OSError) as exc:
        return {"root": str(root), "error": str(exc)}


def _text(daemons: list[dict[str, Any]], store: dict[str, Any], where: list[Path],
          problems: dict[str, str] | None = None) -> str:
    lines = [f"status file {path} is {why}" for path, why in (problems or {}).items()]
    hidden = [d for d in dict.fromkeys(where) if d.is_dir() and not os.access(d, os.R_OK | os.X_OK)]
    if not daemons and hidden and not problems:
        lines.append(f"cannot read {', '.join(map(str, hidden))} as this user: run `sudo faceberry status` (the "
                     "state directory belongs to the service user)")
    elif not daemons and not problems:
        lines.append(f"no status file in {', '.join(map(str, where))}: the daemon has not run here (or under "
                     "another state_dir: pass --config or --state-dir)")
    for d in daemons:
        pid = d.get("pid")
        if d["running"]:
            state = f"running, pid {pid}"
        elif d["stale"]:
            state = f"not running (pid {pid} is gone without stopping cleanly)"
        else:
            state = "stopped"
        age = f", updated {d['age_s']:.0f} s ago" if d.get("age_s") is not None else ""
        lines.append(f"daemon {d.get('device_id', '?')}: {state}{age}")
        bundle = d.get("bundle") or {}
        lines.append(f"  bundle   {d.get('bundle_id')} ({d.get('bundle_path')}); reloads {bundle.get('reloads', 0)}, "
                     f"refused {bundle.get('refused', 0)}")
        last = d.get("last_reload")
        if last:
            what = "ok" if last.get("ok") else f"refused: {last.get('error')}"
            lines.append(f"  reload   last at {last.get('at')}: {what}")
        if d["running"]:
            lines.append(f"  fps      {d.get('fps')}   frames {d.get('frames')}   events {d.get('events')}")
            lines.append(f"  mqtt     {d.get('mqtt_state')}")
            cameras = d.get("cameras") or {}
            if len(cameras) > 1:  # one camera is the lines above
                for name, c in cameras.items():
                    why = f" ({c['reason']})" if c.get("reason") else ""
                    lines.append(f"  camera   {name}: {c.get('state')}{why}, fps {c.get('fps')}, frames "
                                 f"{c.get('frames')}, dropped {c.get('dropped')}")
        else:
            when = f"{d['age_s']:.0f} s ago" if d.get("age_s") is not None else "at an unknown time"
            lines.append(f"  last     frames {d.get('frames')}   events {d.get('events')}   fps {d.get('last_fps')}"
                         f"   mqtt {d.get('last_mqtt_state')} (as written {when}, not now)")
        lines.append(f"  file     {d['status_file']}")
    lines.append(f"store {store['root']}")
    if "error" in store:
        lines.append(f"  {store['error']}")
    else:
        for version in reversed(store["versions"]):
            mark = "*" if version == store["current"] else " "
            note = {store["current"]: " (current)", store["previous"]: " (previous)"}.get(version, "")
            lines.append(f"  {mark} {version}{note}")
        if not store["versions"]:
            lines.append("  no versions yet: `faceberry deploy --bundle DIR`")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.state_dir is not None:
        setup = read_setup(None)
        where, device_id = [args.state_dir], None
    else:
        setup = read_setup(args.config)
        where, device_id = setup.state_dirs, setup.device_id
    daemons, problems = [], {}
    for path in status_files(where, device_id):
        status, problem = check_status(path)  # read once: the view, or what is wrong with the file
        if status is not None:
            daemons.append(daemon_view(path, status))
        else:
            problems[str(path)] = problem or "unreadable"
    store = store_view(store_root(args.store, setup))
    if args.json:
        print(json.dumps({"daemons": daemons, "store": store, "unreadable_status_files": problems}, indent=1,
                         sort_keys=True))
    else:
        print(_text(daemons, store, where, problems))
    return EXIT_OK if any(d["running"] for d in daemons) else EXIT_UNAVAILABLE
