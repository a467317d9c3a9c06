"""Reload without restart: SIGHUP loads the bundle `current` points to, over the same MQTT session.

A running daemon (a real mosquitto, a looping folder of real photos) is switched between bundle versions
in a temporary versions store laid out like the Pi's (bundles/<id>/ and a relative `current` link):
a good version takes over the next events without a second broker connection; a corrupt one is refused,
the old one keeps serving, and the retained bundle topic and the log say why.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
from pathlib import Path

import pytest

from faceberry.bundle import MANIFEST, load_bundle, write_manifest
from tests.plugins.broker import Subscriber, client_connections
from tests.plugins.daemon import folder_of_photos, start_daemon, switch_current, write_config
from tests.plugins.processes import finish

DEVICE = "reloadcam"
pytestmark = pytest.mark.broker


def make_version(store: Path, source: Path, bundle_id: str) -> Path:
    """A copy of `source` under store/bundles/<bundle_id>, its manifest (and checksum) naming that id."""
    dest = store / "bundles" / bundle_id
    shutil.copytree(source, dest)
    manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    files = list(manifest.pop("files"))
    manifest["bundle_id"] = bundle_id
    write_manifest(dest, manifest, files)
    assert load_bundle(dest).bundle_id == bundle_id
    return dest


def test_sighup_switches_bundles_over_one_connection_and_refuses_a_corrupt_one(
        tmp_path, mosquitto_factory, gallery_bundle, heldout_photos) -> None:
    broker = mosquitto_factory()
    store = tmp_path / "store"
    v1 = make_version(store, gallery_bundle, "test-v1")
    make_version(store, gallery_bundle, "test-v2")
    broken = make_version(store, gallery_bundle, "test-broken")
    classifier = json.loads((broken / MANIFEST).read_text())["classifier"]["file"]
    with open(broken / classifier, "ab") as handle:  # a damaged copy: its checksum no longer matches
        handle.write(b"\0" * 16)
    switch_current(store, v1.name)

    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", store / "bundles" / "current", broker,
                          {"device": str(camera), "loop": True, "fps": 10})
    config.write_text(config.read_text().replace("device_id: testcam", f"device_id: {DEVICE}"))
    sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/#")
    events_topic, bundle_topic = f"faceberry/{DEVICE}/events", f"faceberry/{DEVICE}/bundle"

    def bundle_states() -> list[dict]:
        return [json.loads(p) for p in sub.on(bundle_topic)]

    def events_after(index: int) -> list[dict]:
        """Events received after the index-th message (the broker keeps one session's order)."""
        return [json.loads(p) for t, p, _ in list(sub.messages)[index:] if t == events_topic]

    proc = start_daemon(config)
    logged: list[str] = []
    reader = threading.Thread(target=lambda: logged.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        assert sub.wait_for(lambda m: any(t == events_topic for t, _, _ in m), 60), "".join(logged)[-3000:]
        assert bundle_states()[0]["state"] == "loaded" and bundle_states()[0]["bundle_id"] == "test-v1"
        assert {e["model"] for e in events_after(0)} == {"test-v1"}

        # A good new version: the next events carry its id.
        switch_current(store, "test-v2")
        proc.send_signal(signal.SIGHUP)
        assert sub.wait_for(lambda m: any(json.loads(p).get("bundle_id") == "test-v2" for t, p, _ in m
                                          if t == bundle_topic), 30), "".join(logged)[-3000:]
        mark = next(i for i, (t, p, _) in enumerate(sub.messages)
                    if t == bundle_topic and json.loads(p)["bundle_id"] == "test-v2")
        assert bundle_states()[-1]["state"] == "loaded" and bundle_states()[-1]["error"] is None
        assert sub.wait_for(lambda m: len(events_after(mark)) >= 2, 60), "".join(logged)[-3000:]
        assert {e["model"] for e in events_after(mark)} == {"test-v2"}

        # A corrupt version: refused, the bundle topic says why, and test-v2 goes on serving.
        switch_current(store, "test-broken")
        proc.send_signal(signal.SIGHUP)
        assert sub.wait_for(lambda m: any(json.loads(p)["state"] == "refused" for t, p, _ in m
                                          if t == bundle_topic), 30), "".join(logged)[-3000:]
        refused = bundle_states()[-1]
        assert refused["bundle_id"] == "test-v2" and refused["path"] == str(broken.resolve())
        assert re.search(r"checksum|sha256", refused["error"]), refused
        mark = len(sub.messages)
        assert sub.wait_for(lambda m: len(events_after(mark)) >= 2, 60), "".join(logged)[-3000:]
        assert {e["model"] for e in events_after(mark)} == {"test-v2"}
        assert proc.poll() is None
        # The status file `faceberry status` reads was rewritten after the reload.
        status = json.loads((tmp_path / "state" / f"status-{DEVICE}.json").read_text())
        assert (status["bundle_id"], status["pid"], status["running"]) == ("test-v2", proc.pid, True)
        assert status["last_reload"]["ok"] is False and "sha256" in status["last_reload"]["error"]
        assert status["mqtt_state"] == "connected" and status["frames"] > 0 and status["updated_at"].endswith("Z")
        assert status["bundle"] == {"id": "test-v2", "reloads": 1, "refused": 1}
    finally:
        proc.send_signal(signal.SIGTERM)
    rc, _ = finish(proc, timeout=30)
    reader.join(5)
    err = "".join(logged)
    sub.close()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    assert json.loads((tmp_path / "state" / f"status-{DEVICE}.json").read_text())["running"] is False
    assert not list((tmp_path / "state").glob(".*.tmp"))
    # One log line per reload: what was loaded, and what was refused with why and the fix.
    reloaded = re.findall(r"INFO faceberry\.device\.[a-z_.]+: reloaded: bundle test-v2 \(was test-v1\)", err)
    assert len(reloaded) == 1, err[-3000:]
    refusals = [line for line in err.splitlines() if "reload refused" in line]
    assert len(refusals) == 1 and " ERROR " in refusals[0] and "still serving test-v2" in refusals[0]
    assert "test-broken" in refusals[0] and "reload again" in refusals[0]
    # The same MQTT session throughout: the broker saw our daemon connect once.
    connections = client_connections(broker, f"faceberry-{DEVICE}")
    assert len(connections) == 1, connections
    # The retained state a newcomer reads is the latest.
    late = Subscriber(broker.host, broker.port, bundle_topic)
    try:
        assert late.wait_for(lambda m: bool(m), 5)
        assert json.loads(late.messages[-1][1])["state"] == "refused" and late.messages[-1][2]
    finally:
        late.close()
