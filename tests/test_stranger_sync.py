"""Stranger identities shared by every device (device/messaging/stranger_sync.py, device/memory/strangers.py): the
entry's encoding and verification; the merge rule applied the same whatever order entries arrive in; expiry and
forget clearing the shared entry; then two real daemons on a real mosquitto: a stranger seen by device A, then by
device B, has one stranger_id on both."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from faceberry.device.memory.strangers import SharedStranger, StrangerMemory
from faceberry.device.messaging.stranger_sync import (
    StrangerEntryError,
    StrangerSync,
    decode_entry,
    encode_alias,
    encode_stranger,
)
from faceberry.device.messaging.topics import Topics
from tests.plugins.daemon import MARGIN, Daemon, blank, ha_config, link, predictions
from tests.plugins.files import resigned

EMBEDDER = "ab" * 32
T0 = 1_796_600_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def unit(*v: float) -> np.ndarray:
    x = np.array(v, np.float32)
    return x / np.linalg.norm(x)


class Device:
    """One device's stranger memory and its sync, publishing into a list instead of a broker."""

    def __init__(self, name: str, clock: Clock, tmp_path: Path | None = None, retention: float = 30 * 86400.0,
                 embedder: str = EMBEDDER) -> None:
        self.name = name
        self.published: list[tuple[str, bytes]] = []
        self.forgotten: list[str] = []  # what the daemon's recent faces store is told to forget
        path = tmp_path / f"strangers-{name}.npz" if tmp_path is not None else None
        self.memory = StrangerMemory(path, threshold=0.8, retention=retention, clock=clock)
        self.sync = StrangerSync(Topics("faceberry", name), self._publish, self.memory, lambda: embedder,
                                 forgotten=self.forgotten.append).attach()

    def _publish(self, topic: str, payload: bytes | str, retain: bool = False, qos: int | None = None) -> bool:
        assert retain and qos == 1, (topic, retain, qos)
        self.published.append((topic, payload if isinstance(payload, bytes) else payload.encode()))
        return True

    def deliver(self, messages: list[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            self.sync.receive(topic, payload)
        self.sync.drain()

    @property
    def ids(self) -> set[str]:
        return set(self.memory.clusters)


# --- the entry ----------------------------------------------------------------------------------------------------


def test_an_entry_decodes_to_what_was_encoded() -> None:
    clock = Clock()
    d = Device("door-a", clock)
    s, _ = d.memory.observe(unit(1, 2, 3))
    entry = decode_entry(encode_stranger(s, EMBEDDER, "door-a"), now=T0)
    assert (entry.stranger.stranger_id, entry.stranger.count, entry.stranger.first_seen, entry.embedder,
            entry.origin) == (s.stranger_id, 1, T0, EMBEDDER, "door-a")
    assert np.allclose(entry.stranger.centroid, unit(1, 2, 3)) and entry.stranger.alias_of is None
    alias = decode_entry(encode_alias("s-0000000b", "s-0000000a", "door-b"))
    assert (alias.stranger.stranger_id, alias.stranger.alias_of, alias.embedder) == ("s-0000000b", "s-0000000a", None)
    # What is on the broker: the centroid, never a face.
    body = json.loads(encode_stranger(s, EMBEDDER, "door-a"))
    assert set(body) == {"schema", "op", "id", "dim", "centroid", "count", "first_seen", "last_seen", "embedder",
                         "origin", "at", "checksum"}


def _payload() -> bytes:
    d = Device("door-a", Clock())
    return encode_stranger(d.memory.observe(unit(1, 0, 0))[0], EMBEDDER, "door-a")


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda p: p.replace(b'"door-a"', b'"door-x"'), "checksum mismatch"),
    (lambda p: resigned(p, schema=2), "schema 2"),
    (lambda p: resigned(p, dim=4), "does not hold dim 4"),
    (lambda p: resigned(p, centroid="not base64!"), "malformed"),
    (lambda p: resigned(p, op="forget"), "op 'forget'"),
    (lambda p: resigned(p, id="s-../../x"), "not a stranger id"),
    (lambda p: resigned(p, count=0), "count 0"),
    (lambda p: resigned(p, centroid=base64.b64encode(np.zeros(3, "<f4").tobytes()).decode()), "is zero"),
    (lambda p: resigned(p, centroid=base64.b64encode(np.full(3, np.nan, "<f4").tobytes()).decode()), "NaN"),
    (lambda p: resigned(p, first_seen=T0 + 10, last_seen=T0), "not finite times in order"),
    (lambda p: resigned(p, last_seen=T0 + 9 * 86400), "ahead of this device's clock"),
    (lambda p: resigned(p, op="alias", alias_of=json.loads(p)["id"]), "alias of itself"),
    (lambda p: b"x" * 70000, "more than"),
    (lambda p: b"{not json", "not JSON"),
])
def test_a_bad_entry_is_refused_naming_the_problem(mutate, why) -> None:
    with pytest.raises(StrangerEntryError, match=why):
        decode_entry(mutate(_payload()), now=T0)


def test_a_refused_or_misplaced_entry_changes_nothing_and_is_logged_once(caplog) -> None:
    d = Device("door-b", Clock())
    payload = _payload()
    sid = json.loads(payload)["id"]
    d.deliver([(f"faceberry/strangers/{sid}", payload.replace(b'"door-a"', b'"door-x"'))] * 3)
    d.deliver([("faceberry/strangers/s-00000000", payload), (f"faceberry/strangers/{sid}/deeper", payload)])
    assert not d.ids and d.sync.stats["strangers_refused"] == 5
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 3 and "checksum mismatch" in lines[0] and "is not its topic's" in lines[1], lines
    # Another embedder: ignored (not refused for good), one line.
    other = Device("door-c", Clock(), embedder="cd" * 32)
    other.deliver([(f"faceberry/strangers/{sid}", payload)] * 2)
    assert not other.ids and sum("deploy the same bundle" in r.getMessage() for r in caplog.records) == 1


def test_sharing_strangers_without_a_stranger_memory_is_a_one_line_config_error(tmp_path) -> None:
    from faceberry.device.config import ConfigError, load_config

    path = tmp_path / "faceberry.yaml"
    path.write_text("bundle: /b\nlibrary: {strangers: true}\n")
    with pytest.raises(ConfigError, match=r"library\.strangers: true needs memory\.strangers: true") as info:
        load_config(path, env={})
    assert "\n" not in str(info.value)
    path.write_text("bundle: /b\nlibrary: {strangers: true}\nmemory: {strangers: true}\n")
    assert load_config(path, env={}).library.strangers is True


# --- the fleet, without a broker ----------------------------------------------------------------------------------


def test_a_new_stranger_is_shared_and_adopted_under_its_id() -> None:
    clock = Clock()
    a, b = Device("door-a", clock), Device("door-b", clock)
    s, new = a.memory.observe(unit(1, 0, 0))
    assert new and a.published == [(f"faceberry/strangers/{s.stranger_id}", a.published[0][1])]
    b.deliver(a.published)
    assert b.ids == {s.stranger_id} and b.sync.stats["strangers_adopted"] == 1
    clock.now += 5
    seen, new = b.memory.observe(unit(0.97, 0.1, 0))
    assert seen.stranger_id == s.stranger_id and not new and seen.count == 2 and seen.first_seen == T0
    # Seen again within the share interval: not published again; after it, published with the later last_seen.
    assert not b.published
    clock.now += b.memory.share_interval
    b.memory.observe(unit(0.97, 0.1, 0))
    a.deliver(b.published)
    assert a.memory.clusters[s.stranger_id].last_seen == clock.now
    # The echo of a device's own entry changes nothing.
    a.deliver(a.published)
    assert a.ids == {s.stranger_id} and a.memory.clusters[s.stranger_id].count == 3


def _two_sightings(tmp_path: Path | None = None, same_time: bool = False):
    """Devices A and B each see the same stranger before hearing of the other: two ids for one person."""
    clock_a, clock_b = Clock(T0), Clock(T0 if same_time else T0 + 1)
    a, b = Device("door-a", clock_a, tmp_path), Device("door-b", clock_b, tmp_path)
    sa, _ = a.memory.observe(unit(1, 0.05, 0))
    sb, _ = b.memory.observe(unit(1, 0, 0.05))
    assert sa.stranger_id != sb.stranger_id
    return a, b, sa.stranger_id, sb.stranger_id


@pytest.mark.parametrize("a_first", [True, False])
def test_two_ids_for_one_stranger_merge_to_the_earliest_whatever_the_arrival_order(tmp_path, a_first) -> None:
    a, b, id_a, id_b = _two_sightings(tmp_path)
    entries = a.published + b.published if a_first else b.published + a.published
    # Each device hears of the other's stranger; a third hears of both, in this order.
    c = Device("door-c", Clock(T0 + 2), tmp_path)
    a.deliver(b.published)
    b.deliver(a.published)
    c.deliver(entries)
    for d in (a, b, c):
        assert d.ids == {id_a}, d.name  # A's first_seen is earlier: A's id wins
        assert d.memory.resolve(id_b) == id_a and d.memory.clusters[id_a].first_seen == T0
    # The loser's topic now says so: a device that hears of B's stranger and the alias, in either order, follows.
    aliases = [(t, p) for t, p in a.published + b.published if json.loads(p)["op"] == "alias"]
    assert aliases and all(t == f"faceberry/strangers/{id_b}" for t, _ in aliases)
    for order in (b.published[:1] + aliases[:1], aliases[:1] + b.published[:1]):
        late = Device("door-d", Clock(T0 + 3))
        late.deliver(order)
        assert late.ids == {id_a} and late.memory.resolve(id_b) == id_a, order
        late.deliver(a.published[:1])
        assert late.ids == {id_a} and late.memory.clusters[id_a].first_seen == T0
    # A device that missed the merge shares the loser again, over the alias on the broker: it is said again.
    a.published.clear()
    a.deliver(b.published[:1])
    assert a.published and all(json.loads(p)["op"] == "alias" and json.loads(p)["alias_of"] == id_a
                               for _, p in a.published)
    # A face of the stranger seen next on any device gets the winner's id; also after a restart.
    assert b.memory.observe(unit(1, 0.02, 0.02))[0].stranger_id == id_a
    assert StrangerMemory(tmp_path / "strangers-door-b.npz", 0.8, clock=Clock(T0 + 4)).resolve(id_b) == id_a


def test_damaged_aliases_set_the_memory_file_aside(tmp_path, caplog) -> None:
    path = tmp_path / "strangers-x.npz"
    with open(path, "wb") as fh:
        np.savez(fh, ids=np.array(["s-0000000a"]), totals=np.eye(1, 3, dtype=np.float32), counts=np.array([1]),
                 first=np.array([T0]), last=np.array([T0]), alias_from=np.array(["s-0000000b", "s-0000000c"]),
                 alias_to=np.array(["s-0000000a"]))
    with caplog.at_level("WARNING"):
        mem = StrangerMemory(path, 0.8, clock=Clock())
    assert len(mem) == 0 and not mem.aliases and not path.exists()
    assert any("alias arrays" in r.getMessage() for r in caplog.records)


def test_equal_first_seen_the_smaller_id_wins_in_either_order() -> None:
    def shared(sid: str) -> SharedStranger:
        return SharedStranger(sid, unit(1, 0, 0), 1, T0, T0)

    for order in itertools.permutations(["s-0000000b", "s-0000000a", "s-0000000c"]):
        d = Device("door-x", Clock(T0 + 1))
        for sid in order:
            d.memory.adopt(shared(sid))
        assert d.ids == {"s-0000000a"}, order
        assert {d.memory.resolve(s) for s in order} == {"s-0000000a"}


def test_two_different_strangers_are_not_merged() -> None:
    clock = Clock()
    a, b = Device("door-a", clock), Device("door-b", clock)
    sa, _ = a.memory.observe(unit(1, 0, 0))
    sb, _ = b.memory.observe(unit(0, 1, 0))
    a.deliver(b.published)
    b.deliver(a.published)
    assert a.ids == b.ids == {sa.stranger_id, sb.stranger_id}


def test_expiry_and_forget_clear_the_shared_entry_on_every_device() -> None:
    clock = Clock()
    a, b = Device("door-a", clock, retention=100), Device("door-b", clock, retention=100)
    old, _ = a.memory.observe(unit(1, 0, 0))
    kept, _ = a.memory.observe(unit(0, 1, 0))
    b.deliver(a.published)
    assert b.ids == {old.stranger_id, kept.stranger_id}
    # B sees `kept` again; `old` goes unseen for longer than the retention.
    clock.now += 60
    b.memory.observe(unit(0, 1, 0))
    a.deliver(b.published[-1:])
    clock.now += 60
    a.published.clear()
    a.memory.observe(unit(0, 0, 1))  # any face: the memory prunes
    cleared = [t for t, p in a.published if not p]
    assert cleared == [f"faceberry/strangers/{old.stranger_id}"]
    assert kept.stranger_id in a.ids  # seen on B within the retention: kept on A too
    b.deliver([(t, p) for t, p in a.published if not p])
    assert old.stranger_id not in b.ids and kept.stranger_id in b.ids
    # A stale retained entry (its devices were off when it expired) is not adopted, and cleared.
    late = Device("door-c", clock, retention=100)
    late.deliver([(f"faceberry/strangers/{old.stranger_id}", encode_stranger(old, EMBEDDER, "door-a"))])
    assert not late.ids and late.published == [(f"faceberry/strangers/{old.stranger_id}", b"")]
    # Forget on B: cleared, so forgotten on A as well.
    assert b.memory.forget(kept.stranger_id) == 1
    a.deliver(b.published[-1:])
    assert kept.stranger_id not in a.ids and a.forgotten == [kept.stranger_id]


# --- real daemons -------------------------------------------------------------------------------------------------


def _pick(tiny: dict) -> tuple[Path, Path, float]:
    """Two photos of the newcomer (a stranger to the bundle), within a threshold of each other, and the threshold
    (the calibrated one, or moved by at most 0.03 where the suite's toy embedder leaves no such pair)."""
    from faceberry.bundle import load_bundle

    calibrated = load_bundle(Path(tiny["bundle"])).accept_threshold
    photos = sorted(Path(tiny["newcomer_photos"]).iterdir()) + [Path(p) for p in tiny["newcomer_probes"]]
    for threshold in (calibrated, *(calibrated + d for d in (-0.01, 0.01, -0.02, 0.02, -0.03, 0.03))):
        seen = [(p, vec) for p, (label, _, vec) in zip(photos, predictions(Path(tiny["bundle"]), photos, threshold),
                                                      strict=True) if label == "unknown"]
        for (p1, v1), (p2, v2) in itertools.combinations(seen, 2):
            if float(v1 @ v2) >= threshold + MARGIN:
                return p1, p2, threshold
    pytest.fail("no two unknown photos of the newcomer are within the accept threshold of each other")


def _device(tmp_path: Path, name: str, tiny: dict, broker, photo: Path, threshold: float) -> Path:
    root = tmp_path / name
    camera = root / "camera"
    camera.mkdir(parents=True)
    link(photo, camera / "a_face.jpg")
    blank(camera / "b_empty.jpg")
    bundle = root / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    config = ha_config(root, bundle, broker, camera, memory={"strangers": True}, library={"strangers": True},
                       recognition={"threshold": threshold})
    data = yaml.safe_load(config.read_text())
    data["device_id"] = name
    data["camera"]["fps"] = 3  # two daemons on a shared CPU
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.mark.broker
def test_a_stranger_seen_by_one_device_then_another_has_one_id_on_both(tmp_path, mosquitto_factory, tiny) -> None:
    broker = mosquitto_factory()
    p1, p2, threshold = _pick(tiny)
    a = Daemon(_device(tmp_path, "door-a", tiny, broker, p1, threshold), broker)
    b = None
    try:
        events_a = "faceberry/door-a/events"
        a.wait(lambda m: any(t == events_a for t, _, _ in m), 120)
        first = a.json_on(events_a)[0]
        sid = first["stranger_id"]
        assert first["label"] == "unknown" and first["stranger_new"] is True, first
        # Retained for every device, now and later.
        a.wait(lambda m: any(t == f"faceberry/strangers/{sid}" and p for t, p, _ in m), 30)
        # B, started later with another photo of the same person, reports A's id.
        b = Daemon(_device(tmp_path, "door-b", tiny, broker, p2, threshold), broker)
        events_b = "faceberry/door-b/events"
        b.wait(lambda m: any(t == events_b for t, _, _ in m), 120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b.json_on(events_b)[-1]["stranger_id"] != sid:
            time.sleep(0.5)
        seen_b = b.json_on(events_b)
        # (Had B's first frame come before A's entry, B's first event would carry an id of its own, merged into
        # A's, the earlier, as soon as the entry came: B's later events carry A's id either way.)
        assert seen_b[-1]["stranger_id"] == sid and not seen_b[-1]["stranger_new"], (sid, seen_b, b.text())
        mark = len(a.sub.messages)
        a.wait(lambda m: len([t for t, _, _ in m[mark:] if t == events_a]) >= 2, 60)
        assert {e["stranger_id"] for e in a.json_on(events_a)} == {sid}
    finally:
        errs = {d.device: d.stop() for d in (a, b) if d is not None}
    for device, err in errs.items():
        assert "refused" not in err, (device, err[-3000:])
