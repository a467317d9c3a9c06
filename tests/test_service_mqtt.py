"""The daemon against a real mosquitto: online, events for real faces, offline on SIGTERM, the last will
on SIGKILL, and nothing lost while the broker is away."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from faceberry.bundle import load_bundle
from faceberry.device.capture.camera import IMAGE_SUFFIXES
from faceberry.device.messaging.mqtt import MqttPublisher
from faceberry.device.outputs.events import OFFLINE, ONLINE
from tests.conftest import need_shared
from tests.plugins.broker import Subscriber
from tests.plugins.daemon import (
    Daemon,
    events_of,
    expected_event_labels,
    folder_of_photos,
    mqtt_cfg,
    start_daemon,
    write_config,
)
from tests.plugins.processes import finish

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "testcam"
EVENT_KEYS = {"event_id", "device_id", "camera", "timestamp", "label", "score", "bbox", "track_id", "frames",
              "model", "schema"}

pytestmark = pytest.mark.broker


def stamp(event_json: bytes) -> float:
    text = json.loads(event_json)["timestamp"]
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def seen(state_json: bytes) -> float:
    text = json.loads(state_json)["last_seen"]
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def test_folder_of_real_faces_online_events_offline(tmp_path, mosquitto, subscriber, gallery_bundle, heldout_photos,
                                                     gallery_people) -> None:
    frames = folder_of_photos(heldout_photos, tmp_path / "camera")
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto, {"device": str(tmp_path / "camera")})
    rc, err = finish(start_daemon(config))
    assert rc == 0, err[-3000:]
    assert subscriber.wait_for(lambda m: (f"faceberry/{DEVICE}/status", OFFLINE.encode(), False) in m, 10)

    status = subscriber.on(f"faceberry/{DEVICE}/status")
    assert status[0] == ONLINE.encode() and status[-1] == OFFLINE.encode()
    events = events_of(subscriber)
    bundle_id = load_bundle(gallery_bundle).bundle_id
    for event in events:
        assert set(event) >= EVENT_KEYS
        assert (event["device_id"], event["model"], event["camera"], event["schema"]) == (DEVICE, bundle_id,
                                                                                          "camera", 1)
        assert event["label"] in [*gallery_people, "unknown"]
        x1, y1, x2, y2 = event["bbox"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2
        # A folder camera names the photo that decided, so an event can be traced back to its file.
        assert Path(event["source"]).parent == tmp_path / "camera" and "broken" not in event["source"]
    # The daemon announced exactly what the pipeline recognises, in order: nothing lost, nothing invented.
    readable = [f for f in sorted((tmp_path / "camera").iterdir()) if "broken" not in f.name]
    assert [e["label"] for e in events] == expected_event_labels(gallery_bundle, readable)
    assert len({e["event_id"] for e in events}) == len(events)
    # The bundle knows these people: some of their held-out photos are recognised.
    assert {e["label"] for e in events} & set(gallery_people)
    # Retained last-seen state for each announced label.
    for label in {e["label"] for e in events}:
        state = json.loads(subscriber.on(f"faceberry/{DEVICE}/person/{label}")[-1])
        assert state["label"] == label and state["last_seen"]
    # Snapshots are off by default.
    assert not [t for t, _, _ in subscriber.messages if "/snapshot/" in t]
    # The unreadable image was skipped with a warning and the run went on past it.
    assert "skipping unreadable image" in err and "_broken.jpg" in err
    assert "1 unreadable skipped" in err
    assert len(frames) >= 6 and len(events) >= 2


def test_two_people_in_one_frame_are_two_tracks(tmp_path, mosquitto, subscriber, gallery_bundle) -> None:
    camera = tmp_path / "camera"
    camera.mkdir()
    (camera / "two_people.jpg").symlink_to(need_shared("photos", "scenes", "two_people.jpg"))
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto, {"device": str(camera)},
                          events={"unknown": True, "cooldown": 0})
    rc, err = finish(start_daemon(config))
    assert rc == 0, err[-3000:]
    subscriber.wait_for(lambda m: any(p == OFFLINE.encode() for _, p, _ in m), 10)
    events = events_of(subscriber)
    # Neither person is in the bundle, so both may well be "unknown": the cooldown is per label, which
    # is why it is 0 here. Two faces, two tracks, two events, two separate boxes.
    assert sorted(e["track_id"] for e in events) == [1, 2]
    left, right = sorted(e["bbox"] for e in events)
    assert left[2] < right[0]


def test_snapshots_when_enabled(tmp_path, mosquitto, subscriber, gallery_bundle, heldout_photos) -> None:
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=1, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto, {"device": str(tmp_path / "camera")},
                          events={"snapshots": True})
    rc, err = finish(start_daemon(config))
    assert rc == 0, err[-3000:]
    subscriber.wait_for(lambda m: any(p == OFFLINE.encode() for _, p, _ in m), 10)
    snaps = [(t, p) for t, p, _ in subscriber.messages if "/snapshot/" in t]
    events = events_of(subscriber)
    assert len(snaps) == len(events) > 0
    assert all(p[:3] == b"\xff\xd8\xff" for _, p in snaps)  # JPEG


def test_cooldown_holds_back_repeats_and_discovery_is_published(tmp_path, mosquitto, subscriber, gallery_bundle,
                                                                 heldout_photos, gallery_people) -> None:
    person = sorted(p for p in heldout_photos.iterdir() if p.is_dir())[0]
    camera = tmp_path / "camera"
    camera.mkdir()
    for photo in sorted(person.iterdir())[:3]:
        (camera / photo.name).symlink_to(photo.resolve())
    # Every frame a new track (no box matches at IoU 1.0 across different photos), decided at once:
    # only the cooldown stands between 9 frames and 9 events.
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto, {"device": str(camera), "loop": True},
                          tracking={"iou": 1.0}, events={"cooldown": 3600, "homeassistant": True})
    ha = Subscriber(mosquitto.host, mosquitto.port, "homeassistant/#")
    try:
        rc, err = finish(start_daemon(config, "--max-frames", "9"))
        assert rc == 0, err[-3000:]
        subscriber.wait_for(lambda m: any(p == OFFLINE.encode() for _, p, _ in m), 10)
        labels = [e["label"] for e in events_of(subscriber)]
        assert labels and len(labels) == len(set(labels))  # each label announced once
        stats = re.findall(r"stats: (\d+) frames .*?(\d+) faces, (\d+) events \((\d+) in cooldown\)", err)[-1]
        frames, faces, n_events, suppressed = map(int, stats)
        assert frames == 9 and n_events == len(labels) and suppressed == faces - n_events > 0
        # Home Assistant discovery: one retained "last seen" sensor per person, plus the last-event sensor.
        assert ha.wait_for(lambda m: len(m) >= len(gallery_people) + 1, 10)
        topics = {t for t, _, _ in ha.messages}
        for name in gallery_people:
            assert f"homeassistant/sensor/faceberry_testcam/faceberry_testcam_{name}/config" in topics
        config_payload = json.loads(ha.messages[0][1])
        assert config_payload["availability_topic"] == f"faceberry/{DEVICE}/status"
    finally:
        ha.close()


def test_video_file_through_opencv(tmp_path, mosquitto, subscriber, gallery_bundle) -> None:
    clip = need_shared("video", "short_hamilton_clip.mp4")  # 640×360, one person walking and talking
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                          {"source": "opencv", "device": str(clip)}, tracking={"votes_needed": 5, "max_age": 10},
                          events={"cooldown": 3600})
    rc, err = finish(start_daemon(config, "--max-frames", "40"))
    assert rc == 0, err[-3000:]
    subscriber.wait_for(lambda m: any(p == OFFLINE.encode() for _, p, _ in m), 10)
    events = events_of(subscriber)
    # One person in view: the first event comes after 5 voting frames; the cooldown keeps it to one per label.
    assert events and events[0]["frames"] == 5 and events[0]["previous"] is None
    assert len(events) == len({e["label"] for e in events})
    for event in events:
        x1, y1, x2, y2 = event["bbox"]
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 360
    # A file is not real time: the reader waits for the recogniser instead of dropping frames.
    assert re.search(r"stats: 40 frames \(\d+ captured, 0 dropped", err)


def test_sigterm_stops_cleanly_with_offline(tmp_path, mosquitto, subscriber, gallery_bundle, heldout_photos) -> None:
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                          {"device": str(tmp_path / "camera"), "loop": True})
    proc = start_daemon(config)
    try:
        assert subscriber.wait_for(lambda m: any(t.endswith("/events") for t, _, _ in m), 60), "no event"
    finally:
        proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, timeout=30)
    assert rc == 0, err[-3000:]
    assert subscriber.wait_for(lambda m: m[-1][1] == OFFLINE.encode(), 10)
    assert "Traceback" not in err
    assert "stats:" in err  # final statistics are logged


def test_sigkill_leaves_the_last_will(tmp_path, mosquitto, subscriber, gallery_bundle, heldout_photos) -> None:
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                          {"device": str(tmp_path / "camera"), "loop": True})
    proc = start_daemon(config)
    try:
        assert subscriber.wait_for(lambda m: (f"faceberry/{DEVICE}/status", ONLINE.encode(), False) in m, 60)
        subscriber.messages.clear()
    finally:
        proc.kill()
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # The broker publishes the will as soon as it sees the connection die.
    assert subscriber.wait_for(lambda m: (f"faceberry/{DEVICE}/status", OFFLINE.encode(), False) in m, 15)
    # And it is retained: a subscriber arriving later learns the device is offline.
    late = Subscriber(mosquitto.host, mosquitto.port, f"faceberry/{DEVICE}/status")
    try:
        assert late.wait_for(lambda m: bool(m), 5) and late.messages[-1][1:] == (OFFLINE.encode(), True)
    finally:
        late.close()


def test_daemon_survives_a_broker_restart(tmp_path, mosquitto_factory, gallery_bundle, heldout_photos) -> None:
    broker = mosquitto_factory()
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, broker,
                          {"device": str(tmp_path / "camera"), "loop": True, "fps": 5})
    sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/#")
    proc = start_daemon(config)
    try:
        assert sub.wait_for(lambda m: any(t.endswith("/events") for t, _, _ in m), 60)
        broker.stop()
        time.sleep(2)
        broker.start()
        sub.close()
        restarted = time.time()
        sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/#")
        # The daemon reconnects by itself, says online again (retained, so whether it reconnected before or
        # after this subscriber does not matter), and its new events arrive.
        assert sub.wait_for(lambda m: (f"faceberry/{DEVICE}/status", ONLINE.encode()) in [x[:2] for x in m], 30)
        assert sub.wait_for(lambda m: any(t.endswith("/events") and stamp(p) > restarted for t, p, _ in m), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, timeout=30)
    assert rc == 0, err[-3000:]
    assert "lost the broker" in err and "reconnect 1" in err
    assert all(e["device_id"] == DEVICE for e in events_of(sub))
    sub.close()


def test_daemon_started_before_the_broker_delivers_once_it_is_up(tmp_path, mosquitto_factory, gallery_bundle,
                                                                  heldout_photos) -> None:
    broker = mosquitto_factory(persistent=True)
    sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/#", session="faceberry-test-boot")
    broker.stop()  # the Pi booted faster than the broker
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, broker,
                          {"device": str(tmp_path / "camera"), "loop": True, "fps": 5})
    proc = start_daemon(config)
    try:
        time.sleep(3)
        assert proc.poll() is None  # no broker is no reason to stop
        started = time.time()
        broker.start()
        # Events recognised while the broker was down were queued and arrive now.
        assert sub.wait_for(lambda m: any(t.endswith("/events") and stamp(p) < started for t, p, _ in m), 30)
        proc.send_signal(signal.SIGTERM)
        rc, err = finish(proc, timeout=60)
        assert rc == 0, err[-3000:]
        assert "cannot reach the broker" in err
        assert sub.wait_for(lambda m: (f"faceberry/{DEVICE}/status", OFFLINE.encode()) in [x[:2] for x in m], 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


# --- the publisher alone: counts what is queued, delivered and dropped -----------------------------------


def test_publisher_queues_while_the_broker_is_away_and_loses_nothing(mosquitto_factory, tmp_path) -> None:
    broker = mosquitto_factory(persistent=True)
    sub = Subscriber(broker.host, broker.port, "faceberry/pub/events", session="faceberry-test-sub")
    pub = MqttPublisher(mqtt_cfg(broker, queue_size=50), "pub", outbox=tmp_path / "outbox.sqlite3")
    pub.start()
    try:
        assert pub.wait_connected(10)
        for i in range(5):
            pub.publish("faceberry/pub/events", f"before-{i}")
        assert pub.flush(10)
        broker.stop()
        deadline = time.monotonic() + 10
        while pub.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pub.connected
        for i in range(30):
            assert pub.publish("faceberry/pub/events", f"during-{i}")
        assert pub.pending >= 30
        broker.start()
        assert pub.wait_connected(20)
        for i in range(5):
            pub.publish("faceberry/pub/events", f"after-{i}")
        expected = [f"before-{i}" for i in range(5)] + [f"during-{i}" for i in range(30)] + [
            f"after-{i}" for i in range(5)]
        ok = sub.wait_for(lambda m: {p.decode() for _, p, _ in m} >= set(expected), 30)
        got = [p.decode() for _, p, _ in sub.messages]
        assert ok, f"missing: {sorted(set(expected) - set(got))[:10]}"
        assert pub.dropped == 0 and pub.connects == 2
        # QoS 1 is at-least-once; order within the queued backlog is kept.
        during = [g for g in got if g.startswith("during-")]
        assert sorted(set(during), key=during.index) == [f"during-{i}" for i in range(30)]
    finally:
        pub.stop(timeout=5)
        sub.close()


def test_outbox_bound_drops_the_oldest_counts_them_and_logs_one_summary(mosquitto_factory, tmp_path,
                                                                        caplog) -> None:
    from faceberry.device.config import OutboxConfig

    broker = mosquitto_factory(persistent=True)
    sub = Subscriber(broker.host, broker.port, "faceberry/pub/#", session="faceberry-test-sub2")
    cfg = mqtt_cfg(broker).model_copy(update={"outbox": OutboxConfig(max_messages=10)})
    pub = MqttPublisher(cfg, "pub", outbox=tmp_path / "outbox.sqlite3", summary_interval=3600)
    pub.start()
    try:
        assert pub.wait_connected(10)
        assert pub.flush(5)
        broker.stop()
        deadline = time.monotonic() + 10
        while pub.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="faceberry.device.messaging.mqtt"):
            # Every message is accepted (the disk has it); the bound evicts the oldest.
            assert all(pub.publish("faceberry/pub/events", f"m{i}") for i in range(15))
            assert pub.dropped == 5 and pub.pending == 10
            sub.messages.clear()
            broker.start()
            assert sub.wait_for(lambda m: {p.decode() for _, p, _ in m} >= {f"m{i}" for i in range(5, 15)}, 30)
            # A full outbox never blocks the status: the device says online again after reconnecting.
            assert pub.wait_connected(10) and pub.flush(5)
            assert sub.wait_for(lambda m: ("faceberry/pub/status", ONLINE.encode(), False) in m, 10)
            pub.stop(timeout=5)
        assert not {p.decode() for _, p, _ in sub.messages} & {f"m{i}" for i in range(5)}
        # Not one line per dropped message: a summary (at most one now and one at the stop) that adds up.
        summaries = [r.getMessage() for r in caplog.records if "outbox full" in r.getMessage()]
        assert 1 <= len(summaries) <= 2
        assert sum(int(re.search(r"dropped the (\d+) oldest", s).group(1)) for s in summaries) == 5
    finally:
        pub.stop(timeout=1)
        sub.close()


def test_publisher_status_online_retained_and_offline_on_stop(mosquitto, tmp_path) -> None:
    pub = MqttPublisher(mqtt_cfg(mosquitto), "pubstatus", outbox=tmp_path / "outbox.sqlite3")
    pub.start()
    assert pub.wait_connected(10)
    assert pub.flush(5)
    late = Subscriber(mosquitto.host, mosquitto.port, "faceberry/pubstatus/status")
    try:
        assert late.wait_for(lambda m: bool(m), 5)
        assert late.messages[0][1:] == (ONLINE.encode(), True)  # retained: a newcomer learns we are up
        pub.stop(timeout=5)
        assert late.wait_for(lambda m: m[-1][1] == OFFLINE.encode(), 5)
    finally:
        late.close()


# --- the durable outbox, end to end ------------------------------------------------------------------------

def test_daemon_sigkilled_while_the_broker_is_down_delivers_every_event_after_a_restart(
        tmp_path, mosquitto_factory, gallery_bundle, heldout_photos) -> None:
    broker = mosquitto_factory(persistent=True)
    sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/events", session="faceberry-test-sigkill")
    broker.stop()
    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=2, broken=False)
    expected = expected_event_labels(gallery_bundle, sorted(camera.iterdir()))
    assert len(expected) >= 3
    # Looping, so the daemon is certainly still running (not stopping by itself) when it is killed.
    config = write_config(tmp_path / "config.yaml", gallery_bundle, broker, {"device": str(camera), "loop": True})
    proc = start_daemon(config)
    logged: list[str] = []
    reader = threading.Thread(target=lambda: logged.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        # "event:" is logged after the event went to the outbox: once the first pass is logged, it is stored.
        while sum("event:" in line for line in logged) < len(expected) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(logged)[-3000:]
            time.sleep(0.05)
    finally:
        proc.kill()
    proc.wait(10)
    killed_at = time.time()
    reader.join(5)
    assert proc.returncode == -signal.SIGKILL
    stored = sum("event:" in line for line in logged)
    assert stored >= len(expected), "".join(logged)[-3000:]
    assert "cannot reach the broker" in "".join(logged)

    broker.start()
    rc, err = finish(start_daemon(config, "--max-frames", "1"))
    assert rc == 0, err[-3000:]
    assert "messages left by the last run are sent first" in err
    try:
        assert sub.wait_for(lambda m: len({json.loads(p)["event_id"] for _, p, _ in m
                                           if stamp(p) < killed_at}) >= stored, 30)
        events = [json.loads(p) for _, p, _ in sub.messages]
        ids = [e["event_id"] for e in events]
        unique = [events[ids.index(i)] for i in sorted(set(ids), key=ids.index)]
        before = [e for e in unique if stamp(encode_event(e)) < killed_at]
        # Every event of the killed run, in order, first; then the new run's.
        assert [e["label"] for e in before[:len(expected)]] == expected
        assert unique[:len(before)] == before
        assert [e["timestamp"] for e in before] == sorted(e["timestamp"] for e in before)
    finally:
        sub.close()


def encode_event(event: dict) -> bytes:
    return json.dumps(event).encode()


# --- loud failures: each reason in the log once, with its fix, and in the stats ------------------------------

def tls_cfg(broker, ca, host: str = "localhost", tls: bool = True, **extra):
    from faceberry.device.config import MqttConfig, TlsConfig

    return MqttConfig(host=host, port=broker.port, keepalive=5, reconnect_min_delay=1, reconnect_max_delay=1,
                      tls=TlsConfig(enabled=tls, ca=str(ca) if tls else None), **extra)


def failing(cfg, tmp_path, caplog, attempts: int = 3, password: str | None = None) -> tuple[MqttPublisher, list]:
    """Start a publisher that cannot connect; after `attempts` tries return it and its ERROR/WARNING lines."""
    pub = MqttPublisher(cfg, "loud", password=password, outbox=tmp_path / "o.sqlite3")
    with caplog.at_level(logging.WARNING, logger="faceberry.device.messaging.mqtt"):
        pub.start()
        deadline = time.monotonic() + 30
        while pub._failures.attempts < attempts and time.monotonic() < deadline:
            time.sleep(0.05)
        pub.stop(timeout=0.5)
    lines = [r for r in caplog.records if r.name == "faceberry.device.messaging.mqtt" and r.levelno >= logging.WARNING]
    return pub, lines


@pytest.fixture
def tls_broker(mosquitto_factory, tls_files):
    return mosquitto_factory(extra_config=tls_files.listener_config())


def test_tls_with_the_right_ca_and_name_connects(tls_broker, tls_files, tmp_path) -> None:
    pub = MqttPublisher(tls_cfg(tls_broker, tls_files.ca), "tlsok", outbox=tmp_path / "o.sqlite3")
    pub.start()
    try:
        assert pub.wait_connected(15), pub.last_error
        assert pub.publish("faceberry/tlsok/events", "x") and pub.flush(10)
        assert pub.stats()["state"] == "connected"
    finally:
        pub.stop(timeout=2)


@pytest.mark.parametrize(("case", "expected"), [
    ("wrong-ca", r"not trusted .*set mqtt\.tls\.ca"),
    ("wrong-name", r"not valid for the name '127\.0\.0\.1'.*set mqtt\.host"),
    ("plain-on-tls-port", r"closed the connection before answering.*set mqtt\.tls\.enabled: true"),
])
def test_tls_failures_name_the_reason_and_the_fix_once(case, expected, tls_broker, tls_files, tmp_path,
                                                       caplog) -> None:
    cfg = {"wrong-ca": tls_cfg(tls_broker, tls_files.other_ca),
           "wrong-name": tls_cfg(tls_broker, tls_files.ca, host="127.0.0.1"),
           "plain-on-tls-port": tls_cfg(tls_broker, None, host="127.0.0.1", tls=False)}[case]
    pub, lines = failing(cfg, tmp_path, caplog)
    assert pub._failures.attempts >= 3 or pub.connects == 0
    matching = [r for r in lines if re.search(expected, r.getMessage())]
    # Said at once, as an ERROR, and not again at every retry.
    assert len(matching) == 1, [r.getMessage() for r in lines]
    assert matching[0].levelno == logging.ERROR
    assert pub.connects == 0 and re.search(expected, pub.stats()["error"])
    assert pub.stats()["state"] == "error"


def test_a_wrong_password_and_a_refused_user_are_errors_with_the_fix(mosquitto_factory, tmp_path, caplog) -> None:
    from tests.plugins.broker import password_file

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    broker = mosquitto_factory(anonymous=False, extra_config=f"password_file {password_file(secrets, 'door', 'right')}")
    pub, lines = failing(tls_cfg(broker, None, host="127.0.0.1", tls=False, username="door"), tmp_path, caplog,
                         password="wrong")
    refused = [r for r in lines if "refused the login" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert "mqtt.password_file" in refused[0].getMessage() and pub.connects == 0
    assert "refused the login" in pub.stats()["error"]

    caplog.clear()
    anon_dir = tmp_path / "anon"
    anon_dir.mkdir()
    pub, lines = failing(tls_cfg(broker, None, host="127.0.0.1", tls=False), anon_dir, caplog)
    assert [r.getMessage() for r in lines if "does not authorise anonymous clients" in r.getMessage()], \
        [r.getMessage() for r in lines]

    # The right password connects: the failures were about the password, not the broker.
    ok = MqttPublisher(tls_cfg(broker, None, host="127.0.0.1", tls=False, username="door"), "auth", password="right",
                       outbox=tmp_path / "ok.sqlite3")
    ok.start()
    try:
        assert ok.wait_connected(10)
    finally:
        ok.stop(timeout=2)


def test_a_dead_paho_thread_stops_the_daemon_with_an_error(tmp_path, mosquitto, gallery_bundle, heldout_photos) -> None:
    from faceberry.device.app import build
    from faceberry.device.config import load_config
    from faceberry.device.messaging.mqtt import MqttError

    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=1, broken=False)
    cfg = load_config(write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                                   {"device": str(tmp_path / "camera"), "loop": True}))
    pub = MqttPublisher(cfg.mqtt, DEVICE, outbox=tmp_path / "o.sqlite3")

    def broken_hook() -> None:  # a bug in a callback, raised in paho's network thread
        raise KeyError("boom")

    pub.on_connect(broken_hook)
    service = build(cfg, publisher=pub)
    with pytest.raises(MqttError, match="the MQTT client stopped: KeyError"):
        service.run()
    assert pub.fatal is not None


# --- a live camera that goes away and comes back ---------------------------------------------------------------

def test_a_live_stream_that_dies_and_comes_back_resumes_in_the_same_process(tmp_path, mosquitto, subscriber,
                                                                             gallery_bundle, heldout_photos) -> None:
    import cv2

    from tests.mjpeg_server import MjpegCamera

    person = sorted(p for p in heldout_photos.iterdir() if p.is_dir())[0]
    photo = sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[0]
    stream = MjpegCamera(cv2.imread(str(photo)), fps=5).start()
    # One face standing still: one event, then its retained person state refreshed with every frame
    # (cooldown 0); a refresh stamped after the stream's return shows the same process publishing again.
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                          {"source": "opencv", "device": stream.url, "reopen_max_s": 2}, events={"cooldown": 0})
    daemon = Daemon(config)
    try:
        assert subscriber.wait_for(lambda m: any(t.endswith("/events") for t, _, _ in m), 60), daemon.text()
        stream.stop()
        # Out for longer than the old daemon lived without frames (it exited after about 5 s).
        deadline = time.monotonic() + 30
        while not any("lost:" in line for line in daemon.log) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)
        assert daemon.proc.poll() is None, daemon.text()
        stream.start()
        back = time.time()
        assert subscriber.wait_for(lambda m: any("/person/" in t and seen(p) > back for t, p, _ in m), 60), \
            daemon.text()
        assert daemon.proc.poll() is None
    finally:
        try:
            err = daemon.stop()
        finally:
            stream.stop()
    assert len(re.findall(r"camera \S+ lost: ", err)) == 1, err[-3000:]
    outage = re.findall(r"camera \S+ is back after ([\d.]+) s out", err)
    assert len(outage) == 1 and float(outage[0]) > 0
    # The stats line says it too: one outage, and for how long.
    stats = re.findall(r"camera ok outages=(\d+) outage_s=([\d.]+)", err)
    assert stats and int(stats[-1][0]) == 1 and float(stats[-1][1]) == pytest.approx(float(outage[0]), abs=0.2)


def test_a_folder_deleted_under_the_daemon_ends_with_one_error_and_a_non_zero_code(
        tmp_path, mosquitto, subscriber, gallery_bundle, heldout_photos) -> None:
    import shutil

    camera = tmp_path / "camera"
    folder_of_photos(heldout_photos, camera, per_person=2, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto, {"device": str(camera), "loop": True})
    proc = start_daemon(config)
    try:
        assert subscriber.wait_for(lambda m: any(t.endswith("/events") for t, _, _ in m), 60)
        shutil.rmtree(camera)
    except BaseException:
        proc.kill()
        raise
    rc, err = finish(proc, timeout=60)
    assert rc != 0  # before: rc 0, so systemd never restarted it
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disappeared" in errors[0], err[-3000:]
    assert "Traceback" not in err
    # It still said goodbye properly.
    assert subscriber.wait_for(lambda m: (f"faceberry/{DEVICE}/status", OFFLINE.encode(), False) in m, 10)


def test_a_live_stream_absent_at_start_is_waited_for_and_the_same_process_publishes(
        tmp_path, mosquitto, subscriber, gallery_bundle, heldout_photos) -> None:
    import cv2

    from tests.mjpeg_server import MjpegCamera
    from tests.plugins.processes import free_port

    person = sorted(p for p in heldout_photos.iterdir() if p.is_dir())[0]
    photo = sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[0]
    stream = MjpegCamera(cv2.imread(str(photo)), fps=5, port=free_port())  # nothing listens there yet
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                          {"source": "opencv", "device": stream.url, "reopen_max_s": 1}, events={"cooldown": 0})
    daemon = Daemon(config)
    try:
        # Up without a camera: online on the broker, the outage in the stats line, no exit.
        assert subscriber.wait_for(lambda m: (f"faceberry/{DEVICE}/status", ONLINE.encode(), True) in m
                                   or (f"faceberry/{DEVICE}/status", ONLINE.encode(), False) in m, 60), \
            daemon.text()
        deadline = time.monotonic() + 30
        while not any("camera out outages=1" in line for line in daemon.log) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any("camera out outages=1" in line for line in daemon.log), daemon.text()
        assert daemon.proc.poll() is None, daemon.text()
        stream.start()
        assert subscriber.wait_for(lambda m: any(t.endswith("/events") for t, _, _ in m), 60), daemon.text()
        assert daemon.proc.poll() is None
    finally:
        try:
            err = daemon.stop()
        finally:
            stream.stop()
    assert len(re.findall(r"camera \S+ is not available at start: ", err)) == 1, err[-3000:]
    assert len(re.findall(r"camera \S+ is back after [\d.]+ s out", err)) == 1, err[-3000:]
    assert "error:" not in err


def test_a_missing_video_file_still_fails_at_once(tmp_path, mosquitto, gallery_bundle) -> None:
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                          {"source": "opencv", "device": str(tmp_path / "gone.mp4")})
    rc, err = finish(start_daemon(config), timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 3 and len(errors) == 1 and "video file not found" in errors[0], err[-3000:]


def test_refused_credentials_lasting_fatal_after_s_exit_2_with_one_line(tmp_path, mosquitto_factory, gallery_bundle,
                                                                          heldout_photos) -> None:
    from tests.plugins.broker import password_file

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    broker = mosquitto_factory(anonymous=False, extra_config=f"password_file {password_file(secrets, 'door', 'right')}")
    wrong = tmp_path / "mqtt_password"
    wrong.write_text("wrong\n")
    wrong.chmod(0o600)
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=1, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, broker, {"device": str(tmp_path / "camera"),
                                                                          "loop": True},
                          mqtt={"username": "door", "password_file": str(wrong), "fatal_after_s": 2})
    rc, err = finish(start_daemon(config), timeout=90)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err[-3000:]  # RestartPreventExitStatus=2: systemd shows it failed instead of looping
    assert len(errors) == 1 and "refused the login" in errors[0] and "mqtt.fatal_after_s" in errors[0], err[-3000:]
    assert "Traceback" not in err


def test_a_broker_that_is_away_never_ends_the_daemon(tmp_path, mosquitto_factory, gallery_bundle,
                                                     heldout_photos) -> None:
    broker = mosquitto_factory()
    broker.stop()
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=1, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, broker, {"device": str(tmp_path / "camera"),
                                                                          "loop": True},
                          mqtt={"fatal_after_s": 1})
    daemon = Daemon(config)
    try:
        # Several stats lines (stats_interval 1) with the broker refusing, well past fatal_after_s.
        deadline = time.monotonic() + 60
        while sum("mqtt state=error" in line for line in daemon.log) < 4 and time.monotonic() < deadline:
            assert daemon.proc.poll() is None, daemon.text()
            time.sleep(0.1)
        assert sum("mqtt state=error" in line for line in daemon.log) >= 4, daemon.text()
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()  # exit code 0


def test_a_camera_out_longer_than_max_outage_s_exits_3_with_one_line(tmp_path, mosquitto, gallery_bundle) -> None:
    from tests.plugins.processes import free_port

    url = f"http://127.0.0.1:{free_port()}/stream.mjpg"  # never served
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto,
                          {"source": "opencv", "device": url, "reopen_max_s": 1, "max_outage_s": 2})
    rc, err = finish(start_daemon(config), timeout=90)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # 3: unavailable, so systemd restarts it (Restart=on-failure), and the new process waits again.
    assert rc == 3 and len(errors) == 1 and "camera.max_outage_s 2" in errors[0], err[-3000:]
    assert "Traceback" not in err
