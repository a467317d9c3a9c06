"""`faceberry fleet status`: every device on a broker, one row each, from the retained topics they publish.

Every daemon keeps, retained on its broker (docs/MQTT.md):

    <prefix>/<device_id>/status   online | offline (offline is also its last will: a Pi that lost power says so)
    <prefix>/<device_id>/state    bundle, library, cameras, last event (device/outputs/state.py)
    <prefix>/<device_id>/bundle   the bundle serving (older releases have this and no state)

so a subscriber to `<prefix>/+/status` and `<prefix>/+/state` gets the whole fleet within a moment of
subscribing, with no device asked anything. This listens for --wait seconds after the broker acknowledged
the subscription (retained messages come at once; MQTT 3.1.1 has no "that was all" marker) and prints:

    DEVICE  ONLINE  BUNDLE         LIBRARY        CAMERAS        LAST EVENT
    back    yes     gallery-2a91…  3, 05:20:00Z   2 ok           2026-12-07T05:21:00.000Z Ann (door)
    garage  NO      gallery-2a91…  2, 05:18:00Z   0 ok, 1 out    -

Exit 0 when every device is online, 3 (unavailable) when one is offline or none answered.

The broker settings come from --config (its `mqtt:` section and topic prefix, the password from
mqtt.password_file as the daemon reads it) and/or --broker/--username/--password-file/--tls/--cafile, the
latter winning. A password is never taken on the command line (`ps` shows every argument to every user).

The same module runs a command on many hosts at once for `deploy` and `rollback` (`on_hosts`): a bounded pool of
threads, one result line per host as each finishes, then a summary; exit 1 if any host failed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faceberry.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, UnavailableError, UsageError

HELP = "every device on a broker: online, bundle, library, cameras and last event, from their retained topics"
DEFAULT_PREFIX = "faceberry"
DEFAULT_WAIT_S = 2.0
# The topics of a device this reads, by their last level.
KINDS = ("status", "state", "bundle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default=None, metavar="HOST[:PORT]",
                        help="the broker every device publishes to (default: --config's mqtt.host and port, else "
                        "localhost:1883; 8883 with --tls)")
    parser.add_argument("--config", default=None,
                        help="a device's config file: its mqtt section (host, port, username, password_file, tls) "
                        "and events.topic_prefix are used; the options below override them")
    parser.add_argument("--prefix", default=None,
                        help=f"the devices' topic prefix (default: --config's events.topic_prefix, else "
                        f"{DEFAULT_PREFIX})")
    parser.add_argument("--username", default=None, help="the broker user, if it asks for one")
    parser.add_argument("--password-file", default=None,
                        help="a file whose first line is that user's password (never the password itself)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (the system's CAs unless --cafile)")
    parser.add_argument("--cafile", default=None, help="the CA certificate of the broker (implies --tls)")
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT_S,
                        help="seconds to listen for the retained topics after subscribing "
                        f"(default {DEFAULT_WAIT_S:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 < args.wait <= 600:
        parser.error(f"--wait {args.wait:g}: give seconds between 0 and 600, e.g. --wait 2")


# --- the broker settings --------------------------------------------------------------------------------------

def parse_broker(text: str) -> tuple[str, int | None]:
    """HOST, HOST:PORT, [IPv6] or [IPv6]:PORT → (host, port or None); UsageError naming the problem."""
    text = text.strip()
    host, port = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"--broker {text!r}: an IPv6 address needs its closing ']', e.g. [::1]:1883")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise UsageError(f"--broker {text!r}: expected [ADDRESS]:PORT, e.g. [::1]:1883")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise UsageError(f"--broker {text!r}: no host name; give HOST or HOST:PORT, e.g. broker.lan:1883")
    if port == "":
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--broker {text!r}: the port must be a number from 1 to 65535, e.g. {host}:1883")
    return host, int(port)


def broker_settings(args: argparse.Namespace) -> tuple[Any, str | None, str]:
    """(MqttConfig, password, topic prefix) from --config and the options."""
    from faceberry.device.config import MqttConfig, TlsConfig, load_config, read_secret

    if args.config:
        cfg = load_config(args.config)
        mqtt, password, prefix = cfg.mqtt, cfg.mqtt_password, cfg.events.topic_prefix
    else:
        mqtt, password, prefix = MqttConfig(), None, DEFAULT_PREFIX
    changes: dict[str, Any] = {}
    if args.tls or args.cafile:
        changes["tls"] = TlsConfig(enabled=True, ca=args.cafile or mqtt.tls.ca)
    tls = changes.get("tls", mqtt.tls).enabled
    if args.broker:
        host, port = parse_broker(args.broker)
        changes["host"], changes["port"] = host, port or (8883 if tls else 1883)
    elif tls and not args.config:
        changes["port"] = 8883
    if args.username:
        changes["username"] = args.username
    if args.password_file:
        text, _ = read_secret(Path(args.password_file), "--password-file")
        lines = text.splitlines()
        password = lines[0] if lines and lines[0] else None
    if args.prefix:
        prefix = args.prefix.strip("/")
        if not prefix or "+" in prefix or "#" in prefix:
            raise UsageError(f"--prefix {args.prefix!r} is empty or holds an MQTT wildcard; give the devices' "
                             f"events.topic_prefix, e.g. {DEFAULT_PREFIX}")
    return mqtt.model_copy(update=changes), password, prefix


# --- listening ------------------------------------------------------------------------------------------------

@dataclass
class Device:
    """What one device's retained topics said (None: not published, or unreadable)."""

    device_id: str
    status: str | None = None
    state: dict[str, Any] | None = None
    bundle: dict[str, Any] | None = None
    unreadable: list[str] = field(default_factory=list)


def receive(devices: dict[str, Device], prefix: str, topic: str, payload: bytes) -> None:
    """File one retained message under its device; what is not one of ours is left out."""
    levels = topic.split("/")
    base = prefix.strip("/").split("/")
    if len(levels) != len(base) + 2 or levels[: len(base)] != base or levels[-1] not in KINDS:
        return
    device_id, topic = levels[-2], levels[-1]
    if not payload:  # a cleared retained topic
        return
    device = devices.setdefault(device_id, Device(device_id))
    if topic == "status":
        device.status = payload.decode("utf-8", "replace").strip()
        return
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        value = None
    if not isinstance(value, dict):
        device.unreadable.append(topic)
        return
    setattr(device, topic, value)


def listen(mqtt: Any, password: str | None, prefix: str, wait: float) -> dict[str, Device]:
    """Subscribe to every device's retained topics, listen `wait` seconds after the subscription is
    acknowledged, and return what came; UnavailableError with the reason and the fix if the broker cannot
    be used."""
    from faceberry.device.messaging.mqtt import explain_connect_error, explain_refusal, make_client

    devices: dict[str, Device] = {}
    lock = threading.Lock()
    connected, subscribed = threading.Event(), threading.Event()
    problem: list[str] = []
    client = make_client(mqtt, f"faceberry-fleet-{os.getpid()}-{secrets.token_hex(3)}", password)

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            problem.append(explain_refusal(reason, mqtt)[1])
            connected.set()
            return
        connected.set()
        c.subscribe([(f"{prefix}/+/{kind}", 1) for kind in KINDS])

    def on_subscribe(c: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            problem.append(f"the broker {mqtt.host}:{mqtt.port} refused the subscription to {prefix}/+/status "
                           "(its ACL): give a user allowed to read the devices' topics")
        subscribed.set()

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        with lock:
            receive(devices, prefix, msg.topic, msg.payload)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(mqtt.host, int(mqtt.port), keepalive=int(mqtt.keepalive))
    except OSError as exc:
        raise UnavailableError(explain_connect_error(exc, mqtt)[1]) from None
    client.loop_start()
    try:
        if not connected.wait(10):
            raise UnavailableError(f"no answer from the broker {mqtt.host}:{mqtt.port} within 10 s; check the "
                                   "host, the port and (for a TLS listener) --tls")
        if not problem and not subscribed.wait(10):
            problem.append(f"the broker {mqtt.host}:{mqtt.port} did not acknowledge the subscription within 10 s")
        if problem:
            raise UnavailableError(problem[0])
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return dict(devices)


# --- the view --------------------------------------------------------------------------------------------------

def row(device: Device) -> dict[str, Any]:
    """One device's row, as --json prints it."""
    state = device.state or {}
    cameras = state.get("cameras") if isinstance(state.get("cameras"), dict) else {}
    ok = sorted(name for name, c in cameras.items() if isinstance(c, dict) and c.get("state") == "ok")
    bad = {name: c.get("state") if isinstance(c, dict) else None for name, c in cameras.items() if name not in ok}
    bundle = state.get("bundle_id") or (device.bundle or {}).get("bundle_id")
    return {
        "device": device.device_id, "online": device.status == "online", "status": device.status,
        "bundle": bundle, "bundle_refused": (device.bundle or {}).get("error")
        if (device.bundle or {}).get("state") == "refused" else None,
        "software": state.get("software"), "library": state.get("library"),
        "cameras_ok": ok, "cameras_not_ok": bad, "last_event": state.get("last_event"),
        "state_at": state.get("at"), "unreadable": device.unreadable,
    }


def _library(lib: Any) -> str:
    if not isinstance(lib, dict):
        return "-"
    newest = lib.get("newest")
    return f"{lib.get('entries', 0)}, {newest}" if newest else str(lib.get("entries", 0))


def _cameras(r: dict[str, Any]) -> str:
    if not r["cameras_ok"] and not r["cameras_not_ok"]:
        return "-"
    counts: dict[str, int] = {}
    for state in r["cameras_not_ok"].values():
        counts[str(state)] = counts.get(str(state), 0) + 1
    parts = [f"{len(r['cameras_ok'])} ok", *(f"{n} {state}" for state, n in sorted(counts.items()))]
    names = f" ({', '.join(sorted(r['cameras_not_ok']))})" if r["cameras_not_ok"] else ""
    return ", ".join(parts) + names


def _event(e: Any) -> str:
    if not isinstance(e, dict):
        return "-"
    where = f" ({e['camera']})" if e.get("camera") else ""
    return f"{e.get('at')} {e.get('label')}{where}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("DEVICE", "ONLINE", "BUNDLE", "LIBRARY", "CAMERAS", "LAST EVENT")
    body = [(r["device"], "yes" if r["online"] else ("NO" if r["status"] else "NO (no status)"),
             (r["bundle"] or "-") + (" (last deploy refused)" if r["bundle_refused"] else ""),
             _library(r["library"]), _cameras(r), _event(r["last_event"])) for r in rows]
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]
    lines = ("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in (head, *body))
    return "\n".join(lines)


def summary(rows: Sequence[dict[str, Any]]) -> str:
    offline = [r["device"] for r in rows if not r["online"]]
    line = f"{len(rows)} device{'s' if len(rows) != 1 else ''}: {len(rows) - len(offline)} online"
    return line + (f", {len(offline)} offline ({', '.join(offline)})" if offline else "")


def run(args: argparse.Namespace) -> int:
    mqtt, password, prefix = broker_settings(args)
    devices = listen(mqtt, password, prefix, args.wait)
    rows = [row(devices[d]) for d in sorted(devices)]
    if args.json:
        print(json.dumps({"broker": f"{mqtt.host}:{mqtt.port}", "prefix": prefix, "devices": rows},
                         indent=1, sort_keys=True))
    elif not rows:
        print(f"no device publishes under {prefix}/ on {mqtt.host}:{mqtt.port} (waited {args.wait:g} s): check "
              "--prefix (the devices' events.topic_prefix) and that they use this broker")
    else:
        print(table(rows))
        print(summary(rows))
    return EXIT_OK if rows and all(r["online"] for r in rows) else EXIT_UNAVAILABLE


# --- many hosts at once: deploy and rollback ------------------------------------------------------------------

@dataclass(frozen=True)
class HostResult:
    host: str
    code: int  # the host's exit code: 0 done
    message: str  # its last words: what it did, or why not


def read_hosts(hosts: Iterable[str] | None, hosts_file: str | None) -> list[str]:
    """--host, repeated, and the lines of --hosts-file (blank lines and # comments skipped), in order and
    each once; UsageError where a file cannot be read or a name is not USER@HOST-like."""
    found = [h.strip() for h in hosts or () if h.strip()]
    if hosts_file:
        try:
            text = Path(hosts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"--hosts-file {hosts_file}: cannot be read ({reason}); give a file with one "
                             "USER@HOST per line") from None
        found += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    out = list(dict.fromkeys(h for h in found if h))
    for host in out:
        if any(c.isspace() for c in host) or host.startswith("-"):
            raise UsageError(f"host {host!r}: not a host name; give USER@HOST (one per --host, or per line of "
                             "--hosts-file)")
    return out


def on_hosts(hosts: Sequence[str], one: Callable[[str], HostResult], *, workers: int, what: str) -> int:
    """Run `one(host)` for every host, at most `workers` at a time; print each host's line as it finishes
    and a summary. Returns 0 when every host succeeded, else 1 (each host's own exit code is on its line)."""
    results: list[HostResult] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(hosts))), thread_name_prefix="host") as pool:
        futures = {pool.submit(one, host): host for host in hosts}
        for future in as_completed(futures):
            host = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # one host's bug or bad input must not hide the other hosts' results
                result = HostResult(host, 1, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
            results.append(result)
            mark = "ok    " if result.code == 0 else f"FAILED (exit {result.code})"
            print(f"{mark} {host}: {result.message}", flush=True)
    failed = [r for r in results if r.code != 0]
    line = f"{what}: {len(results) - len(failed)} of {len(results)} host{'s' if len(results) != 1 else ''} done"
    if failed:
        line += f"; failed: {', '.join(sorted(r.host for r in failed))}"
    print(line, file=sys.stderr if failed else sys.stdout, flush=True)
    return EXIT_FAILURE if failed else EXIT_OK
