"""Two real mosquittos bridged the way docs/MQTT.md says (the configuration is read from that page): a real
daemon on the local broker, the sightings log on the central one. Events cross the bridge once per event_id,
and an outage of the central broker loses nothing the daemon published."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from faceberry.device.outputs.events import iso_utc
from tests.plugins.broker import Subscriber

pytest.importorskip("sqlalchemy",
                    reason="the sightings log needs SQLAlchemy: pip install -r requirements-sightings.txt")

from tests.plugins.daemon import DEVICE, folder_of_photos, start_daemon, write_config
from tests.plugins.sightings import Logger, publish, stored_ids, wait_rows

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.broker


def documented_bridge() -> str:
    """The ```conf block of docs/MQTT.md's "A local broker on each site, bridged to a central one"."""
    doc = (ROOT / "docs" / "MQTT.md").read_text(encoding="utf-8")
    section = doc.split("### A local broker on each site, bridged to a central one", 1)[1]
    match = re.search(r"```conf\n(.*?)```", section, re.S)
    assert match, "docs/MQTT.md: the bridge configuration block is missing"
    return match.group(1)


def bridge_config(central, client_id: str) -> str:
    conf = documented_bridge()
    lines = {line.split()[0]: line for line in conf.splitlines() if line and not line.startswith("#")}
    # What a test must change, and only that: where the central broker is, a client id of its own, and
    # retries after a second instead of the documented 5 s (whose backoff would make the test wait a minute).
    for key, value in [("address", f"address {central.host}:{central.port}"),
                       ("remote_clientid", f"remote_clientid {client_id}"),
                       ("restart_timeout", "restart_timeout 1 2")]:
        assert key in lines, f"docs/MQTT.md's bridge configuration has no {key} line"
        conf = conf.replace(lines[key], value)
    for needed in ("topic faceberry/# both 1", "cleansession false", "local_cleansession false"):
        assert needed in conf, f"docs/MQTT.md's bridge configuration lacks `{needed}`"
    return conf


def test_the_documented_bridge_loses_nothing_across_an_outage_of_the_central_broker(
        tmp_path, mosquitto_factory, tiny_bundle, heldout_photos) -> None:
    central = mosquitto_factory(persistent=True)
    local = mosquitto_factory(persistent=True, extra_config=bridge_config(central, "faceberry-bridge-test"))
    db = str(tmp_path / "central" / "sightings.sqlite3")
    logger = Logger(central, db, "faceberry-sightings-central")
    # What the daemon handed to its own (local) broker: the reference the central log must match.
    sent = Subscriber(local.host, local.port, f"faceberry/{DEVICE}/events", session="faceberry-test-local-truth")

    def sent_ids() -> list[str]:
        return [json.loads(p)["event_id"] for p in sent.on(f"faceberry/{DEVICE}/events")]

    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", tiny_bundle, local,
                          {"device": str(tmp_path / "camera"), "loop": True, "fps": 5})
    daemon = None
    try:
        assert logger.wait_log("subscribed to faceberry/+/events"), logger.log
        daemon = start_daemon(config)
        daemon_log: list[str] = []
        reader = threading.Thread(target=lambda: daemon_log.extend(daemon.stderr), daemon=True)
        reader.start()

        # Across the bridge.
        assert sent.wait_for(lambda m: len(m) >= 5, 120), "".join(daemon_log)[-3000:]
        assert len(wait_rows(db, set(sent_ids()[:5]), timeout=60)) >= 5, logger.log

        # The central broker goes away; the daemon goes on publishing to its local broker, which queues.
        central.stop()
        outage_from = time.time()
        before_outage = len(set(sent_ids()))
        assert sent.wait_for(lambda m: len({json.loads(p)["event_id"] for _, p, _ in m}) >= before_outage + 20, 120)
        assert daemon.poll() is None, "".join(daemon_log)[-3000:]
        central.start()
        outage_to = time.time()

        # An event published again on the local broker (what an outbox replay or a bridge retry does).
        replayed = sent.on(f"faceberry/{DEVICE}/events")[0]
        sent_before_replay = len(sent_ids())
        publish(local, [replayed], topic=f"faceberry/{DEVICE}/events")
        assert sent.wait_for(lambda m: len(m) > sent_before_replay, 20)

        # A few more after the outage, then a clean stop.
        after_outage = len(set(sent_ids())) + 5
        assert sent.wait_for(lambda m: len({json.loads(p)["event_id"] for _, p, _ in m}) >= after_outage, 120)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
    try:
        rc = daemon.wait(60)
        reader.join(10)
        published = sum(bool(re.search(r"\bevent: ", line)) for line in daemon_log)
        assert rc == 0, "".join(daemon_log)[-3000:]
        # The daemon logs "event:" after the event went to its outbox; with its own broker up all along, each one
        # reached the local broker, once per event_id.
        assert sent.wait_for(lambda m: len({json.loads(p)["event_id"] for _, p, _ in m}) >= published, 30)
        want = set(sent_ids())
        assert len(want) == published, (len(want), published)
        got = wait_rows(db, want, timeout=90)
        missing = want - set(got)
        assert not missing, f"{len(missing)} of {len(want)} events never reached the central log:\n{logger.log[-3000:]}"
        # Exactly the daemon's events, one row each, although one of them crossed the bridge twice.
        assert set(got) == want and len(got) == len(want)
        # Some of them were published while the central broker was down: the local broker queued them.
        stamps = {json.loads(p)["event_id"]: json.loads(p)["timestamp"] for p in sent.on(f"faceberry/{DEVICE}/events")}
        in_outage = [i for i in got if iso_utc(outage_from) <= stamps[i] <= iso_utc(outage_to)]
        assert len(in_outage) >= 10, (len(in_outage), outage_from, outage_to)
    finally:
        assert logger.stop() == 0, logger.log
        sent.close()
    assert stored_ids(db) == got
    # The replayed event reached the log a second time and was counted, not stored.
    final = re.findall(r"duplicates (\d+)", logger.log)[-1]
    assert int(final) >= 1, logger.log[-2000:]
