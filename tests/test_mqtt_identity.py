"""Who the daemon is on the broker, and when it gives up: a client id unique per install (two Pis with one
device_id both stay connected), a takeover loop detected and named once, and refused credentials or
certificates that last `mqtt.fatal_after_s` ending the daemon with exit 2. Against a real mosquitto."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

import faceberry.device.messaging.mqtt as mqtt
from faceberry.device.config import MqttConfig, TlsConfig
from faceberry.device.messaging.mqtt import (
    MqttConfigError,
    MqttPublisher,
    default_client_id,
    install_id,
    short_client_id,
)

pytestmark = pytest.mark.broker


def cfg_for(broker, **extra) -> MqttConfig:
    return MqttConfig(**{"host": broker.host, "port": broker.port, "keepalive": 5, "reconnect_min_delay": 1,
                         "reconnect_max_delay": 1, **extra})


# --- the install id ------------------------------------------------------------------------------------------

def test_the_install_id_is_derived_from_the_machine_id_without_revealing_it(tmp_path: Path) -> None:
    a, b = tmp_path / "a-machine-id", tmp_path / "b-machine-id"
    a.write_text("0123456789abcdef0123456789abcdef\n")
    b.write_text("fedcba9876543210fedcba9876543210\n")
    first = install_id(tmp_path / "state", machine_id_files=(a,))
    assert re.fullmatch(r"[0-9a-f]{8}", first)
    assert first == install_id(tmp_path / "elsewhere", machine_id_files=(a,))  # the machine, not the directory
    assert first != install_id(tmp_path / "state", machine_id_files=(b,))
    assert first not in a.read_text() and not (tmp_path / "state").exists()  # nothing written beside it
    # The first readable, non-empty file wins; an empty one (a golden image not yet booted) is skipped.
    empty = tmp_path / "empty"
    empty.write_text("")
    assert install_id(tmp_path / "state", machine_id_files=(tmp_path / "missing", empty, a)) == first


def test_without_a_machine_id_a_random_install_id_is_kept_in_the_state_dir(tmp_path: Path, caplog) -> None:
    state = tmp_path / "state"
    first = install_id(state, machine_id_files=())
    assert (state / "install-id").read_text().strip() == first
    assert install_id(state, machine_id_files=()) == first  # a restart keeps it
    other = install_id(tmp_path / "other", machine_id_files=())
    assert other != first  # another install, another id
    (state / "install-id").write_text("garbage!\n")
    with caplog.at_level(logging.WARNING, logger="faceberry.device.messaging.mqtt"):
        renewed = install_id(state, machine_id_files=())
    assert re.fullmatch(r"[0-9a-f]{8}", renewed) and (state / "install-id").read_text().strip() == renewed
    assert any("does not hold an install id" in r.getMessage() for r in caplog.records)


def test_client_ids_default_per_install_and_a_short_one_fits_mqtt_311() -> None:
    assert default_client_id("front-door", "0a1b2c3d") == "faceberry-front-door-0a1b2c3d"
    short = short_client_id("front-door.main_" + "x" * 60, "0a1b2c3d")
    assert len(short) <= 23 and short.isalnum() and short.startswith("fbfrontdoor") and short.endswith("0a1b2c3d")


def test_the_outbox_and_client_id_stay_the_same_across_restarts(tmp_path: Path, monkeypatch, mosquitto) -> None:
    monkeypatch.setattr(mqtt, "MACHINE_ID_FILES", ())
    ids, paths = [], []
    for _ in range(2):
        pub = MqttPublisher(cfg_for(mosquitto), "same", outbox=tmp_path / "state" / "outbox-same.sqlite3")
        ids.append(pub.client_id)
        paths.append(pub.outbox.path)
        pub.outbox.close()
    assert ids[0] == ids[1] and ids[0].startswith("faceberry-same-") and paths[0] == paths[1]


# --- two clients, one device_id or one client id ---------------------------------------------------------------

def run_pair(cfgs: list[MqttConfig], tmp_path: Path, device_id: str, until, timeout: float) -> list[MqttPublisher]:
    pubs = [MqttPublisher(cfg, device_id, outbox=tmp_path / f"pi{i}" / "outbox.sqlite3") for i, cfg in enumerate(cfgs)]
    for pub in pubs:
        pub.start()
    deadline = time.monotonic() + timeout
    while not until(pubs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pubs


def test_two_pis_with_the_same_device_id_both_stay_connected(tmp_path: Path, monkeypatch, mosquitto_factory,
                                                              caplog) -> None:
    # Two installs without a machine id: each gets its own random install id in its own state dir.
    monkeypatch.setattr(mqtt, "MACHINE_ID_FILES", ())
    broker = mosquitto_factory()
    with caplog.at_level(logging.INFO, logger="faceberry.device.messaging.mqtt"):
        pubs = run_pair([cfg_for(broker), cfg_for(broker)], tmp_path, "front-door",
                        lambda ps: all(p.connected for p in ps), 15)
        try:
            assert all(p.connected for p in pubs)
            # Long enough for a takeover loop to show itself (it knocks a client off within a second).
            time.sleep(5)
            assert all(p.connected for p in pubs)
            assert [p.connects for p in pubs] == [1, 1]
            assert pubs[0].client_id != pubs[1].client_id
            assert all(p.client_id.startswith("faceberry-front-door-") for p in pubs)
            assert not any("client_id_conflict" in p.stats() for p in pubs)
        finally:
            for pub in pubs:
                pub.stop(timeout=2)
    assert not [r for r in caplog.records if "lost the broker" in r.getMessage()]


def test_two_clients_with_one_client_id_get_one_takeover_warning_with_the_fix(tmp_path: Path, mosquitto_factory,
                                                                             caplog) -> None:
    broker = mosquitto_factory()
    cfg = cfg_for(broker, client_id="copied-to-two-pis")
    with caplog.at_level(logging.INFO, logger="faceberry.device.messaging.mqtt"):
        pubs = run_pair([cfg, cfg], tmp_path, "front-door", lambda ps: all(p.takeover for p in ps), 60)
        try:
            assert all(p.takeover for p in pubs), [p.stats() for p in pubs]
            # Keep the loop going a few more rounds: still one warning per client, not one per round.
            connects = sum(p.connects for p in pubs)
            deadline = time.monotonic() + 30
            while sum(p.connects for p in pubs) < connects + 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sum(p.connects for p in pubs) >= connects + 4
            stats = [p.stats() for p in pubs]
        finally:
            for pub in pubs:
                pub.stop(timeout=1)
    warnings = [r for r in caplog.records if "another client probably uses the client id" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.ERROR for r in warnings)
    assert "'copied-to-two-pis'" in warnings[0].getMessage()
    assert "give each device its own device_id (or mqtt.client_id)" in warnings[0].getMessage()
    assert all("copied-to-two-pis" in s["client_id_conflict"] for s in stats)
    assert [p.takeovers for p in pubs] == [1, 1]
    # The per-disconnect warning is not repeated at every round of the loop either.
    lost = [r for r in caplog.records if "lost the broker" in r.getMessage()]
    assert len(lost) <= 2 * mqtt.TAKEOVER_COUNT


# --- permanent failures end the daemon, an absent broker does not --------------------------------------------

def wait_fatal(pub: MqttPublisher, timeout: float) -> MqttConfigError | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        error = pub.fatal_error()
        if error is not None:
            return error  # type: ignore[return-value]
        time.sleep(0.05)
    return None


def test_a_certificate_that_never_verifies_becomes_fatal_after_fatal_after_s(tls_files, mosquitto_factory,
                                                                             tmp_path: Path) -> None:
    broker = mosquitto_factory(extra_config=tls_files.listener_config())
    cfg = cfg_for(broker, host="localhost", fatal_after_s=1,
                  tls=TlsConfig(enabled=True, ca=str(tls_files.other_ca)))
    pub = MqttPublisher(cfg, "tlsfatal", outbox=tmp_path / "o.sqlite3")
    pub.start()
    try:
        error = wait_fatal(pub, 30)
    finally:
        pub.stop(timeout=0.5)
    assert isinstance(error, MqttConfigError) and error.exit_code == 2
    assert "not trusted" in str(error) and "mqtt.fatal_after_s" in str(error) and "\n" not in str(error)


def test_an_absent_broker_is_never_fatal(tmp_path: Path, mosquitto_factory) -> None:
    broker = mosquitto_factory()
    broker.stop()
    pub = MqttPublisher(cfg_for(broker, fatal_after_s=0.5), "away", outbox=tmp_path / "o.sqlite3")
    pub.start()
    try:
        deadline = time.monotonic() + 30
        while pub._failures.attempts < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub._failures.attempts >= 4 and pub.fatal_error() is None
        assert pub.stats()["state"] == "error" and "connection refused" in pub.stats()["error"]
    finally:
        pub.stop(timeout=0.5)


def test_a_rejected_client_id_suggests_one_a_strict_broker_takes() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from faceberry.device.messaging.mqtt import explain_refusal

    # What paho reports for an MQTT 3.1.1 CONNACK "identifier rejected" (return code 2).
    reason = ReasonCode(PacketTypes.CONNACK, "Client identifier not valid")
    cfg = MqttConfig(host="broker.lan")
    key, line = explain_refusal(reason, cfg, short_client_id("front-door", "0a1b2c3d"))
    assert key == "client-id" and "e.g. mqtt.client_id: fbfrontdoor0a1b2c3d" in line and "23" in line
    assert "client-id" in mqtt.PERMANENT_FAILURES  # a setting: it ends the daemon after mqtt.fatal_after_s
