"""A clustered broker: three RabbitMQ nodes on loopback (tests/plugins/cluster.py), a real daemon on node 1 and
another on node 2, the sightings log on node 1 and a plain subscriber on node 2. Events of both devices reach
both subscribers, the log keeps each once by event_id, and node 2 going away (the node of one device) loses
nothing: that device's outbox keeps its events and delivers them when the node is back.

The other two record what RabbitMQ 3.10's MQTT plugin does not do that faceberry relies on
(docs/TOPOLOGIES.md): retained messages stay on the node they were published through and never go to a
wildcard subscription (the library's catch-up); MQTT 5 is refused and QoS 2 is delivered at QoS 1.

RabbitMQ is not part of CI (its apt install took 16 s here, this module 35 to 65 s, 17 to 32 of them starting
the cluster): without it these tests skip, naming the install."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest
import yaml

from faceberry.device.outputs.events import iso_utc
from tests.plugins.broker import Subscriber
from tests.plugins.cluster import INSTALL_HINT, RabbitCluster, rabbitmq_server
from tests.plugins.daemon import Daemon, folder_of_photos, write_config

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Three clustered RabbitMQ nodes, shared by this module's tests; each test leaves all three running."""
    if rabbitmq_server() is None:
        pytest.skip(f"RabbitMQ is not installed: {INSTALL_HINT}")
    nodes = RabbitCluster(tmp_path_factory.mktemp("rabbitmq")).start()
    try:
        yield nodes
    finally:
        nodes.stop()


def device_config(root: Path, device: str, node, bundle: Path, photos: Path) -> Path:
    """A daemon `device` on cluster node `node`, its own folder camera and state_dir under `root`."""
    folder_of_photos(photos, root / "camera", per_person=2, broken=False)
    config = write_config(root / "config.yaml", bundle, node, {"device": str(root / "camera"), "loop": True, "fps": 3})
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["device_id"] = device
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config


def event_ids(sub: Subscriber, device: str) -> set[str]:
    return {json.loads(p)["event_id"] for p in sub.on(f"faceberry/{device}/events")}


def rows(db: Path) -> list[tuple[str, str, str]]:
    """(event_id, device_id, the event's timestamp) of every row of the sightings log."""
    try:
        # Read-only: never create the file under the logger.
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            found = list(conn.execute("SELECT event_id, device_id, payload FROM sightings"))
    except sqlite3.OperationalError:  # the logger has not created its file or table yet
        return []
    return [(event, device, json.loads(payload)["timestamp"]) for event, device, payload in found]


def in_log(db: Path, device: str) -> set[str]:
    return {event for event, dev, _ in rows(db) if dev == device}


def duplicates(logger) -> int:
    """The last `duplicates N` of the sightings log's statistics."""
    found = re.findall(r"duplicates (\d+)", logger.log)
    return int(found[-1]) if found else 0


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def published(daemon: Daemon) -> int:
    """How many events the daemon logged: each went to its outbox first, then to the broker."""
    return sum(bool(re.search(r"\bevent: ", line)) for line in list(daemon.log))


def test_a_device_on_each_node_every_event_once_and_a_node_outage_loses_nothing(
        tmp_path, cluster, tiny_bundle, heldout_photos) -> None:
    pytest.importorskip("sqlalchemy",
                        reason="the sightings log needs SQLAlchemy: pip install -r requirements-sightings.txt")
    from tests.plugins.sightings import Logger, publish

    node1, node2, node3 = cluster.nodes
    db = tmp_path / "sightings.sqlite3"
    logger = Logger(node1, str(db), "faceberry-sightings-cluster")
    watcher = Subscriber(node2.host, node2.port, "faceberry/+/events")
    configs = {"door-1": device_config(tmp_path / "door-1", "door-1", node1, tiny_bundle, heldout_photos),
               "door-2": device_config(tmp_path / "door-2", "door-2", node2, tiny_bundle, heldout_photos)}
    daemons: dict[str, Daemon] = {}
    try:
        assert logger.wait_log("subscribed to faceberry/+/events"), logger.log
        daemons = {device: Daemon(config) for device, config in configs.items()}

        # Across the cluster, both ways: each device's events reach the log on node 1 and the subscriber on node 2.
        for device, daemon in daemons.items():
            assert wait_until(lambda d=device: len(in_log(db, d)) >= 3, 180), daemon.text()
            assert watcher.wait_for(lambda m, d=device: len(event_ids(watcher, d)) >= 3, 60), daemon.text()

        # Node 2 goes away: door-2 loses its broker, door-1 and the log go on through node 1.
        node2.stop()
        outage_from = time.time()
        before = published(daemons["door-2"])
        assert wait_until(lambda: published(daemons["door-2"]) >= before + 5, 120), daemons["door-2"].text()
        door1_during = len(in_log(db, "door-1"))
        assert wait_until(lambda: len(in_log(db, "door-1")) >= door1_during + 3, 60), logger.log[-3000:]
        assert all(d.proc.poll() is None for d in daemons.values())
        outage_to = time.time()
        node2.start()

        # Back: door-2's outbox delivers what it kept, and node 2 carries node 1's traffic again.
        heard = len(event_ids(watcher, "door-1"))
        assert watcher.wait_for(lambda m: len(event_ids(watcher, "door-1")) > heard + 2, 120), node2.log_tail()

        # The same event again through another node (what an outbox replay or a lost PUBACK does): one row.
        again = watcher.on("faceberry/door-1/events")[0]
        seen_twice = duplicates(logger)
        publish(node3, [again], topic="faceberry/door-1/events")
        assert wait_until(lambda: duplicates(logger) > seen_twice, 30), logger.log[-2000:]
    finally:
        if not node2.running:
            node2.start()
        watcher.close()
        # Daemon.stop asserts a clean exit (0, no traceback); every daemon is stopped before any is judged.
        failed = []
        for daemon in daemons.values():
            try:
                daemon.stop()
            except AssertionError as exc:
                failed.append(exc)
    try:
        assert not failed, failed
        for device, daemon in daemons.items():
            sent = published(daemon)
            # Every event each daemon logged is in the log on node 1, once: the outage lost none.
            assert wait_until(lambda d=device, n=sent: len(in_log(db, d)) >= n, 120), \
                f"{device}: {len(in_log(db, device))} of {sent} events reached the log\n{logger.log[-3000:]}"
            assert len(in_log(db, device)) == sent, (device, len(in_log(db, device)), sent)
        stored = rows(db)
        assert len(stored) == len({event for event, _, _ in stored})
        # door-2 made some of them while its node was down: its outbox kept them until the node was back.
        kept = [e for e, dev, stamp in stored
                if dev == "door-2" and iso_utc(outage_from) <= stamp <= iso_utc(outage_to)]
        assert len(kept) >= 3, (len(kept), outage_from, outage_to)
    finally:
        assert logger.stop() == 0, logger.log[-3000:]


def test_rabbitmq_keeps_retained_messages_on_their_node_and_sends_none_to_a_wildcard(cluster) -> None:
    """What docs/TOPOLOGIES.md says RabbitMQ's MQTT plugin does not do. Live messages cross the cluster, but a
    retained library entry published through node 1 is there only for a client that subscribes later through
    node 1 to that exact topic: not through node 2 or 3 (Home Assistant reading the devices' retained status on
    another node), and not to `faceberry/library/#`, the wildcard every device subscribes to when it catches up
    on the library (device/messaging/topics.py, `library_filter`)."""
    node1 = cluster.nodes[0]
    topic = f"faceberry/library/cluster-test-{time.time_ns()}"
    live = [Subscriber(n.host, n.port, "faceberry/library/#") for n in cluster.nodes]
    try:
        mqtt_publish.single(topic, b'{"schema": 1}', qos=1, retain=True, hostname=node1.host, port=node1.port)
        for sub in live:
            assert sub.wait_for(lambda m: any(t == topic for t, _, _ in m), 20), "a live message did not cross"
    finally:
        for sub in live:
            sub.close()

    later = {f"{n.name} {topic}": Subscriber(n.host, n.port, topic) for n in cluster.nodes}
    later[f"{node1.name} faceberry/library/#"] = Subscriber(node1.host, node1.port, "faceberry/library/#")
    try:
        first = later[f"{node1.name} {topic}"]
        assert first.wait_for(lambda m: any(r for _, _, r in m), 20), "no retained message even on its own node"
        time.sleep(2)  # a retained message comes right after SUBACK; give the others time to be wrong
        wrong = {what: len(sub.messages) for what, sub in later.items() if sub is not first and sub.messages}
        assert not wrong, (f"RabbitMQ {node1.version()} now sends retained messages to {sorted(wrong)}: "
                           "update docs/TOPOLOGIES.md and this test")
    finally:
        for sub in later.values():
            sub.close()
        mqtt_publish.single(topic, b"", qos=1, retain=True, hostname=node1.host, port=node1.port)


def test_rabbitmq_310_speaks_mqtt_311_and_delivers_qos_2_at_qos_1(cluster) -> None:
    """The daemon's client speaks MQTT 3.1.1 (device/messaging/mqtt.py), which RabbitMQ 3.10 serves; an MQTT 5
    client (Home Assistant set to protocol 5, say) gets no CONNACK. `mqtt.qos: 2` is accepted from a publisher
    and delivered at QoS 1, which the event_id de-duplication covers."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    node = cluster.nodes[0]
    version = node.version() or ""
    if not version.startswith(("3.10.", "3.11.", "3.12.")):
        pytest.skip(f"RabbitMQ {version}: these findings were made on 3.10 (MQTT 5 came in 3.13)")

    answered = threading.Event()
    v5 = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    v5.on_connect = lambda *args: answered.set()
    v5.connect(node.host, node.port, keepalive=5)
    v5.loop_start()
    try:
        assert not answered.wait(5), "RabbitMQ accepted an MQTT 5 client: update docs/TOPOLOGIES.md"
    finally:
        v5.loop_stop()

    topic = f"faceberry/cluster-test/qos2-{time.time_ns()}"
    granted: list[int] = []
    got: list[int] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    subscribed = threading.Event()

    def on_subscribe(client, userdata, mid, reasons, properties) -> None:
        granted.extend(int(r.value) for r in reasons)
        subscribed.set()

    sub.on_subscribe = on_subscribe
    sub.on_message = lambda client, userdata, msg: got.append(msg.qos)
    sub.connect(cluster.nodes[1].host, cluster.nodes[1].port)
    sub.loop_start()
    try:
        sub.subscribe(topic, qos=2)
        assert subscribed.wait(10)
        mqtt_publish.single(topic, b"x", qos=2, hostname=node.host, port=node.port)
        assert wait_until(lambda: got, 10), "a QoS 2 publish was not delivered"
        assert granted == [1] and got == [1], (granted, got)
    finally:
        sub.disconnect()
        sub.loop_stop()
