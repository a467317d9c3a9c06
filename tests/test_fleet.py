"""Fleet operations: `faceberry fleet status` over a real mosquitto, and deploy/rollback to several hosts.

The state a device publishes (device/outputs/state.py) is checked as pure functions first, then from a real
daemon (`python -m device run` over a folder camera) beside a second device that publishes the same payloads
through a paho client of its own and then drops off the network without a word (the broker's last will says
`offline`): `fleet status` lists both, from `--config` (the password read from mqtt.password_file, as the
daemon reads it) and from --broker/--username/--password-file, and exits 3 while one is offline.

Deploy and rollback to two hosts go through a real rsync and the real `faceberry deploy`/`rollback` on each
"host"; the machine has no sshd, so `ssh` is a shim (written below) that runs the command here with each host's
store in its own directory, and refuses the connection for a host that has none, as ssh does for a Pi that is
switched off. One host succeeds, the other fails; the first is switched and rolled back, the second untouched.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from faceberry.bundle import load_bundle
from faceberry.device.messaging.dispatcher import Decided, FrameDone, StatsReport
from faceberry.device.messaging.topics import Topics
from faceberry.device.ops import fleet
from faceberry.device.ops.store import BundleStore
from faceberry.device.outputs.events import ONLINE, encode
from faceberry.device.outputs.state import DeviceState, library_version, state_payload
from faceberry.errors import UsageError
from tests.plugins.broker import password_file
from tests.plugins.daemon import Daemon, folder_of_photos, mqtt_cfg, write_config
from tests.plugins.files import pi_root, variant
from tests.plugins.processes import ROOT, module, run

STATS = {"cameras": {"door": {"state": "ok", "fps": 9.5, "dropped": 1, "frames": 90, "captured": 91},
                     "garage": {"state": "failed", "reason": "folder is gone", "fps": 0.0, "dropped": 0}}}


def cli(*args: str, **kwargs):
    return module("device", *args, what=f"device {' '.join(args)}", unset=["FACEBERRY_CONFIG"], timeout=180, **kwargs)


def command(argv: list[str], **kwargs):
    """A command line as the README writes it (`python -m device …`): tests/test_readme.py looks for it here."""
    return run(argv, unset=["FACEBERRY_CONFIG"], timeout=180, **kwargs)


def readme_fleet_acl() -> str:
    """The README's ACL block for the user of `fleet status`."""
    match = re.search(r"```text\n(user fleet\n.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert match, "the README has no ```text block starting with `user fleet`"
    return match.group(1)


# --- pure: the payload, the rows, the options ------------------------------------------------------------------

def test_state_payload_carries_bundle_library_cameras_and_the_last_event() -> None:
    published: list[tuple[str, bytes, bool]] = []
    topics = Topics("faceberry", "front")
    lib = {"back-1765084800000000000": 1765084800000000000, "front-1765084900000000000": 1765084900000000000}
    state = DeviceState(topics, lambda t, p, retain=False, qos=1: published.append((t, p, retain)),
                        software="9.9", library=lambda: lib)
    event = {"label": "Ann", "camera": "door", "timestamp": "2026-12-07T05:21:00.000Z"}
    state.frame(FrameDone(1, 1765084860.0, (), (Decided(event, 3, ()),)))
    state.frame(FrameDone(2, 1765084861.0, (), ()))  # a frame without an event keeps the last one
    state.stats(StatsReport(STATS, 9.5, "gallery-v2", 3), now=1765084890.0)
    state.stats(StatsReport(STATS, 9.5, "gallery-v2", 3, final=True))  # after the outbox closed: nothing
    ((topic, payload, retain),) = published
    assert topic == "faceberry/front/state" and retain
    body = json.loads(payload)
    assert body == {
        "schema": 1, "device_id": "front", "software": "9.9", "bundle_id": "gallery-v2", "fps": 9.5,
        "library": {"entries": 2, "newest": "2025-12-07T05:21:40.000Z", "newest_id": "front-1765084900000000000"},
        "cameras": {"door": {"state": "ok", "fps": 9.5, "dropped": 1},
                    "garage": {"state": "failed", "reason": "folder is gone", "fps": 0.0, "dropped": 0}},
        "last_event": {"at": "2026-12-07T05:21:00.000Z", "label": "Ann", "camera": "door"},
        "at": "2025-12-07T05:21:30.000Z",
    }
    assert library_version({}) == {"entries": 0, "newest": None, "newest_id": None}
    assert state_payload(device_id="x", software="1", bundle_id="b", cameras={}, library=None, last_event=None,
                         fps=None, at=0)["library"] is None  # library.share off


def test_rows_table_and_exit_rule_from_retained_messages() -> None:
    devices: dict[str, fleet.Device] = {}
    payload = encode(state_payload(device_id="front", software="1", bundle_id="g-v2", cameras=STATS["cameras"],
                                   library=library_version({"a-1": 10**18}), last_event=None, fps=9.5, at=0))
    for topic, body in (("faceberry/front/status", b"online"), ("faceberry/front/state", payload),
                        ("faceberry/back/status", b"offline"),
                        ("faceberry/back/bundle", b'{"bundle_id": "g-v1", "state": "refused", "error": "x"}'),
                        ("faceberry/odd/state", b"not json"), ("faceberry/library/a-1", b"{}"),
                        ("other/front/status", b"online"), ("faceberry/gone/status", b"")):
        fleet.receive(devices, "faceberry", topic, body)
    assert sorted(devices) == ["back", "front", "odd"]  # a library entry, another prefix, a cleared topic: not devices
    rows = {d: fleet.row(devices[d]) for d in devices}
    assert rows["front"]["online"] and rows["front"]["bundle"] == "g-v2"
    assert rows["front"]["cameras_ok"] == ["door"] and rows["front"]["cameras_not_ok"] == {"garage": "failed"}
    assert not rows["back"]["online"] and rows["back"]["bundle"] == "g-v1" and rows["back"]["bundle_refused"] == "x"
    assert rows["odd"]["unreadable"] == ["state"] and rows["odd"]["status"] is None
    text = fleet.table([rows[d] for d in sorted(rows)])
    assert "1 ok, 1 failed (garage)" in text and "1, 2001-09-09T01:46:40.000Z" in text
    assert fleet.summary(list(rows.values())) == "3 devices: 1 online, 2 offline (back, odd)"


@pytest.mark.parametrize(("text", "expected"), [
    ("broker.lan", ("broker.lan", None)), ("broker.lan:8883", ("broker.lan", 8883)), ("[::1]:1884", ("::1", 1884)),
    ("::1", ("::1", None)), ("broker:0", UsageError), ("broker:x", UsageError), (":1883", UsageError),
    ("[::1", UsageError)])
def test_broker_option(text: str, expected) -> None:
    if expected is UsageError:
        with pytest.raises(UsageError, match="--broker"):
            fleet.parse_broker(text)
    else:
        assert fleet.parse_broker(text) == expected


def test_hosts_from_options_and_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# the doors\npi@front\n\npi@back  # garage side\npi@front\n")
    assert fleet.read_hosts(["pi@garage", "pi@back"], str(hosts)) == ["pi@garage", "pi@back", "pi@front"]
    with pytest.raises(UsageError, match="cannot be read"):
        fleet.read_hosts(None, str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="not a host name"):
        fleet.read_hosts(["pi@front back"], None)


# --- fleet status over a real broker ---------------------------------------------------------------------------

def wait_until(predicate, timeout: float, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
        time.sleep(0.3)


def _vanishing_device(host: str, port: int, device_id: str, password: str, state: bytes) -> paho.Client:
    """A device publishing `online` and its state, retained, with `offline` as its last will, as the daemon's
    MqttPublisher does; closing its socket is a Pi losing power (the broker then sends the will). Keep the
    client referenced until then: collected, it would close the socket."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"faceberry-{device_id}")
    client.username_pw_set("pi", password)
    topics = Topics("faceberry", device_id)
    client.will_set(topics.status, "offline", qos=1, retain=True)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    for topic, payload in ((topics.state, state), (topics.status, ONLINE.encode())):
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()  # no DISCONNECT will ever be sent: the socket just goes away
    return client


@pytest.mark.broker
def test_fleet_status_lists_a_real_daemon_and_a_device_that_dropped_off(
        tmp_path, mosquitto_factory, gallery_bundle, heldout_photos) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    # The Pis log in as `pi`; `fleet status` as `fleet`, allowed only what the README's ACL block allows.
    acl = secrets / "acl"
    acl.write_text(f"{readme_fleet_acl()}\nuser pi\ntopic readwrite #\n", encoding="utf-8")
    acl.chmod(0o644)
    users = password_file(secrets, {"pi": "pi-pw", "fleet": "fleet-pw"})
    broker = mosquitto_factory(anonymous=False, extra_config=f"password_file {users}\nacl_file {acl}\n")
    pw, fleet_pw = secrets / "pi.pw", secrets / "fleet.pw"
    for path, secret in ((pw, "pi-pw"), (fleet_pw, "fleet-pw")):
        path.write_text(secret + "\n")
        path.chmod(0o600)
    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=1, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, broker,
                          {"device": str(camera), "loop": True, "fps": 5}, library={"share": True})
    data = yaml.safe_load(config.read_text())
    data["device_id"] = "front"
    data["mqtt"].update(username="pi", password_file=str(pw))
    config.write_text(yaml.safe_dump(data))

    garage = state_payload(device_id="garage", software="0.1.0", bundle_id="gallery-old", cameras={},
                           library=None, last_event=None, fps=None, at=time.time())
    garage_pi = _vanishing_device(broker.host, broker.port, "garage", "pi-pw", encode(garage))
    daemon = Daemon(config)
    try:
        # Published by the daemon itself, with every stats report: its state with the bundle, the library
        # (on, nothing in it yet) and the camera, and a last event once a face was decided.
        mqtt = mqtt_cfg(broker).model_copy(update={"username": "pi"})
        wait_until(lambda: (lambda f: f is not None and f.status == "online" and f.state
                            and f.state.get("last_event"))(fleet.listen(mqtt, "pi-pw", "faceberry", 0.3).get("front")),
                   90, daemon)
        out = cli("fleet", "status", "--config", str(config), "--json", "--wait", "1")
        assert out.returncode == 0, out.stdout + out.stderr  # both online
        rows = {r["device"]: r for r in json.loads(out.stdout)["devices"]}
        front = rows["front"]
        assert front["online"] and front["bundle"] == load_bundle(gallery_bundle).bundle_id and front["software"]
        assert front["library"] == {"entries": 0, "newest": None, "newest_id": None}
        assert front["cameras_ok"] == ["camera"] and front["cameras_not_ok"] == {}
        assert front["last_event"]["camera"] == "camera" and front["last_event"]["label"]
        assert rows["garage"]["online"] and rows["garage"]["bundle"] == "gallery-old"

        garage_pi.socket().close()  # the garage Pi loses power: the broker publishes its will
        wait_until(lambda: fleet.listen(mqtt, "pi-pw", "faceberry", 0.3)["garage"].status == "offline", 30, daemon)
        argv = [sys.executable, "-m", "device", "fleet", "status", "--broker", f"{broker.host}:{broker.port}",
                "--username", "fleet", "--password-file", str(fleet_pw)]
        out = command(argv)
        assert out.returncode == 3, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split() == ["DEVICE", "ONLINE", "BUNDLE", "LIBRARY", "CAMERAS", "LAST", "EVENT"]
        front_line = next(line for line in lines if line.startswith("front "))
        assert " yes " in front_line and "1 ok" in front_line
        garage_line = next(line for line in lines if line.startswith("garage "))
        assert " NO " in garage_line and "gallery-old" in garage_line
        assert lines[-1] == "2 devices: 1 online, 1 offline (garage)"
    finally:
        daemon.stop()
    # A clean stop says `offline` too.
    assert {d: v.status for d, v in fleet.listen(mqtt, "pi-pw", "faceberry", 0.5).items()} == {
        "front": "offline", "garage": "offline"}

    wrong = secrets / "wrong.pw"
    wrong.write_text("nope\n")
    refused = command([*argv[:-1], str(wrong)])
    assert refused.returncode == 3 and refused.stderr.startswith("error: the broker") and "refused" in refused.stderr
    empty = cli("fleet", "status", "--config", str(config), "--prefix", "elsewhere", "--wait", "0.5")
    assert empty.returncode == 3 and "no device publishes under elsewhere/" in empty.stdout


# --- deploy and rollback to two hosts ----------------------------------------------------------------------------

STORE = "/srv/faceberry-fleet-test/bundles"  # the store's path "on each host"; the shim maps it per host
SHIM = """#!/bin/sh
# ssh [-l USER] HOST COMMAND...: as ssh would, hand COMMAND to a shell "on HOST" -- here, with HOST's
# filesystem standing in as $FLEET_HOSTS/HOST (its store in place of @STORE@). A host with no directory is
# a Pi that is switched off: the connection is refused, as ssh reports it.
if [ "$1" = "-l" ]; then shift 2; fi
host=$1; shift
if [ ! -d "$FLEET_HOSTS/$host" ]; then
  echo "ssh: connect to host $host port 22: Connection refused" >&2
  exit 255
fi
exec sh -c "$(printf '%s' "$*" | sed "s#@STORE@#$FLEET_HOSTS/$host/bundles#g")"
""".replace("@STORE@", STORE)


def test_deploy_and_rollback_to_two_hosts_one_of_them_down(tmp_path, gallery_bundle) -> None:
    hosts = tmp_path / "hosts"
    (hosts / "pi-front").mkdir(parents=True)
    up = pi_root(hosts / "pi-front")  # pi-front/bundles; pi-back has no directory: it is switched off
    v1 = variant(gallery_bundle, tmp_path / "src" / "v1", "fleet-v1")
    v2 = variant(gallery_bundle, tmp_path / "src" / "v2", "fleet-v2")
    store = BundleStore(up)
    store.add(v1)
    store.switch("fleet-v1")
    shim = tmp_path / "ssh"
    shim.write_text(SHIM)
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    listed = tmp_path / "fleet.txt"
    listed.write_text("pi-front\n# the back door\npi-back\n")
    remote = f"env PYTHONPATH={ROOT} {sys.executable} -m device"
    common = ("--store", STORE, "--ssh", str(shim), "--remote-command", remote, "--remote-sudo", "",
              "--parallel", "2")
    env = {"FLEET_HOSTS": str(hosts)}

    out = command([sys.executable, "-m", "device", "deploy", "--bundle", str(v2), "--hosts-file", str(listed), *common],
                  env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "deploying fleet-v2 to 2 hosts, 2 at a time"
    assert any(line.startswith("ok     pi-front: deployed fleet-v2") for line in lines), out.stdout
    assert any(line.startswith("FAILED (exit 3) pi-back: rsync to pi-back failed") and "Connection refused" in line
               for line in lines), out.stdout
    assert out.stderr.strip().splitlines()[-1] == "deploy fleet-v2: 1 of 2 hosts done; failed: pi-back"
    assert os.readlink(up / "current") == "fleet-v2" and os.readlink(up / "previous") == "fleet-v1"
    assert load_bundle(up / "current").bundle_id == "fleet-v2"  # whole and verified
    assert not list(up.glob(".incoming-*"))
    assert not (hosts / "pi-back").exists()  # nothing half-done on the host that failed

    back = command([sys.executable, "-m", "device", "rollback", "--hosts-file", str(listed), *common], env=env)
    assert back.returncode == 1, back.stdout + back.stderr
    assert any(line.startswith("ok     pi-front: rolled back") and "current is fleet-v1" in line
               for line in back.stdout.splitlines()), back.stdout
    assert "FAILED (exit 255) pi-back: ssh: connect to host pi-back port 22: Connection refused" in back.stdout
    assert back.stderr.strip().splitlines()[-1] == "rollback: 1 of 2 hosts done; failed: pi-back"
    assert os.readlink(up / "current") == "fleet-v1"

    # Both hosts up: every host done, exit 0.
    (hosts / "pi-back").mkdir()
    pi_root(hosts / "pi-back")
    BundleStore(hosts / "pi-back" / "bundles").add(v1)
    BundleStore(hosts / "pi-back" / "bundles").switch("fleet-v1")
    again = cli("rollback", "--hosts-file", str(listed), *common, env=env)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "FAILED (exit 2) pi-back: error: " in again.stdout  # nothing to go back to there: bad input
    assert "current is fleet-v2" in again.stdout and os.readlink(up / "current") == "fleet-v2"


def test_deploy_to_many_hosts_refuses_a_bad_bundle_before_copying(tmp_path, gallery_bundle) -> None:
    from tests.plugins.files import corrupt

    bad = corrupt(variant(gallery_bundle, tmp_path / "bad", "fleet-bad"))
    out = cli("deploy", "--bundle", str(bad), "--host", "pi-a", "--host", "pi-b", "--ssh", "false")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "sha256" in out.stderr
    assert "pi-a" not in out.stdout  # no host was tried
    empty = tmp_path / "none.txt"
    empty.write_text("# nobody yet\n")
    refused = cli("deploy", "--bundle", str(bad), "--hosts-file", str(empty))
    assert refused.returncode == 2 and "names no host" in refused.stderr


def test_the_mqtt_doc_shows_the_state_payload_the_daemon_builds() -> None:
    doc = (ROOT / "docs" / "MQTT.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Device state (retained)"):]
    shown = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    built = state_payload(device_id="d", software="1", bundle_id="b", cameras={"door": STATS["cameras"]["garage"]},
                          library=library_version({"a-1": 1}), last_event={"at": "t", "label": "x", "camera": "c"},
                          fps=1.0, at=0)
    assert set(shown) == set(built) and set(shown["library"]) == set(built["library"])
    assert set(shown["last_event"]) == set(built["last_event"])
    assert set(shown["cameras"]["side"]) == set(built["cameras"]["door"])
    assert "`<prefix>/<device>/state`" in doc


def test_home_assistant_library_entity_reads_the_device_state() -> None:
    jinja2 = pytest.importorskip("jinja2")
    from faceberry.device.outputs import homeassistant as ha

    def sensors(**kwargs) -> dict[str, dict]:
        return {c["unique_id"]: c for t, c in ha.discovery("faceberry", "front", ["alice"], **kwargs)
                if "/sensor/" in t}

    assert "faceberry_front_library_entries" not in sensors()  # library.share off: no such entity
    entity = sensors(library=True)["faceberry_front_library_entries"]
    assert entity["state_topic"] == entity["json_attributes_topic"] == Topics("faceberry", "front").state
    assert entity["entity_category"] == "diagnostic" and entity["availability_topic"] == "faceberry/front/status"
    env = jinja2.Environment()
    env.filters["to_json"] = json.dumps

    def render(template: str, payload: dict) -> str:
        return env.from_string(template).render(value_json=payload)

    state = state_payload(device_id="front", software="1", bundle_id="b", cameras={}, fps=None, at=0,
                          library=library_version({"back-1": 10**18, "front-2": 2 * 10**18}), last_event=None)
    assert render(entity["value_template"], state) == "2"
    assert json.loads(render(entity["json_attributes_template"], state))["newest_id"] == "front-2"
    off = {**state, "library": None}
    assert render(entity["value_template"], off) == "None"  # Home Assistant's MQTT sensor: no value
    assert json.loads(render(entity["json_attributes_template"], off)) == {}
