"""One face library for every device (device/messaging/library.py): the entry's encoding and verification as pure
functions; the conflict rule on real bundles, entries delivered in both orders; forget and corrections over a
real mosquitto; two mosquittos bridged with an outage of the bridge; then real daemons on a real mosquitto — a
face named through device A's command topic is named by device B's next frames without a restart, a device C
started later catches up from the retained entries, and a tampered entry is refused with one log line and
nothing applied."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
import yaml

from faceberry.device.messaging.library import (
    LibraryError,
    checksum,
    decode_entry,
    encode_entry,
)
from faceberry.device.messaging.topics import Topics
from tests.plugins.daemon import Daemon, blank, ha_config, link, newcomer_unknown, predictions
from tests.plugins.files import resigned

EMBEDDER = "ab" * 32


def _emb(n: int = 2, dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, dim)).astype(np.float32)


def test_an_entry_decodes_to_what_was_encoded() -> None:
    emb = _emb()
    entry_id, payload = encode_entry("Zoë", emb, EMBEDDER, "front-door", version=42)
    assert entry_id == "front-door-42"
    entry = decode_entry(payload)
    assert (entry.id, entry.label, entry.embedder, entry.origin, entry.version) == (
        "front-door-42", "Zoë", EMBEDDER, "front-door", 42)
    assert np.array_equal(entry.embeddings, emb)
    body = json.loads(payload)
    assert body["schema"] == 1 and body["dim"] == 8 and body["count"] == 2
    assert body["checksum"] == checksum(body)


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda p: p.replace(b'"Ann"', b'"Eve"'), "checksum mismatch"),
    (lambda p: resigned(p, schema=2), "schema 2"),
    (lambda p: resigned(p, count=3), "do not hold count 3"),
    (lambda p: resigned(p, embeddings="not base64!"), "malformed"),
    (lambda p: resigned(p, op="rename"), "op 'rename'"),
    (lambda p: resigned(p, subject=3), "subject is not a string"),
    (lambda p: resigned(p, embeddings=base64.b64encode(np.full(16, np.nan, "<f4").tobytes()).decode()), "NaN"),
    (lambda p: b"{not json", "not JSON"),
    (lambda p: b"[]", "not a JSON object"),
])
def test_a_bad_entry_is_refused_naming_the_problem(mutate, why) -> None:
    _, payload = encode_entry("Ann", _emb(), EMBEDDER, "a", version=1)
    with pytest.raises(LibraryError, match=why):
        decode_entry(mutate(payload))


def test_the_library_topic_is_shared_not_the_devices() -> None:
    topics = Topics("faceberry", "front-door")
    assert topics.library("front-door-42") == "faceberry/library/front-door-42"
    assert topics.library_filter == "faceberry/library/#"


def _library(tmp_path: Path, published: list, embedder: str | None = EMBEDDER):
    import threading

    from faceberry.device.messaging.dispatcher import ReloadRequests
    from faceberry.device.messaging.library import Library

    def no_enrolment(label: str, embeddings: np.ndarray) -> dict:
        raise AssertionError(f"{label} must not be enrolled")

    return Library(Topics("faceberry", "door-a"), lambda *a, **k: published.append((a, k)),
                   state=tmp_path / "library-door-a.json", enroll=no_enrolment, reloads=ReloadRequests(),
                   embedder=lambda: embedder, enroll_lock=threading.Lock())


def test_a_shared_entry_is_retained_and_its_echo_is_not_applied_even_after_a_restart(tmp_path) -> None:
    published: list = []
    entry_id = _library(tmp_path, published).share("Ann", _emb(), EMBEDDER)
    (topic, payload), options = published[0]
    assert topic == f"faceberry/library/{entry_id}" and options == {"retain": True, "qos": 1}
    assert decode_entry(payload).label == "Ann"
    # The echo from the broker, to this process and to the next one (same state_dir): nothing enrolled.
    assert _library(tmp_path, []).apply(topic, payload) is False
    restarted = _library(tmp_path, [])
    restarted.receive(topic, payload)
    restarted.drain()
    assert restarted.stats == {"library_applied": 0, "library_refused": 0}


def test_an_entry_of_another_embedder_is_ignored_with_one_line_and_not_recorded(tmp_path, caplog) -> None:
    entry_id, payload = encode_entry("Ann", _emb(), "cd" * 32, "door-b", version=7)
    lib = _library(tmp_path, [])
    topic = f"faceberry/library/{entry_id}"
    assert lib.apply(topic, payload) is False and lib.apply(topic, payload) is False
    said = [r.getMessage() for r in caplog.records if "embedder" in r.getMessage()]
    assert len(said) == 1 and "deploy the same bundle" in said[0], said
    # Not recorded as applied: served the right bundle later, the device enrols it.
    assert entry_id not in _library(tmp_path, []).state


def test_an_entry_on_another_entrys_topic_is_refused(tmp_path, caplog) -> None:
    _, payload = encode_entry("Ann", _emb(), EMBEDDER, "door-b", version=7)
    lib = _library(tmp_path, [])
    assert lib.apply("faceberry/library/door-b-8", payload) is False
    assert lib.stats["library_refused"] == 1
    assert any("is not its topic's" in r.getMessage() for r in caplog.records)


# --- real daemons -------------------------------------------------------------------------------------------------


def _camera(root: Path, photo: Path) -> Path:
    """One face, then empty frames: each loop of the folder is a new track, decided again."""
    camera = root / "camera"
    camera.mkdir(parents=True)
    link(photo, camera / "a_face.jpg")
    for i in range(3):
        blank(camera / f"b_empty_{i:02d}.jpg")
    return camera


def _device(tmp_path: Path, name: str, tiny: dict, broker, photo: Path, commands: bool = False) -> Path:
    """A device of its own: its own folder camera, its own copy of the same bundle, its own state_dir."""
    root = tmp_path / name
    root.mkdir()
    bundle = root / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    config = ha_config(root, bundle, broker, _camera(root, photo), homeassistant={"commands": commands},
                       library={"share": True})
    data = yaml.safe_load(config.read_text())
    data["device_id"] = name
    data["camera"]["fps"] = 3  # three daemons on a shared CPU
    config.write_text(yaml.safe_dump(data))
    return config


def _labels(d: Daemon, start: int = 0) -> list[str]:
    return [e["label"] for e in d.json_on(f"faceberry/{d.device}/events", start)]


@pytest.mark.broker
def test_a_face_named_on_one_device_is_named_on_every_device(tmp_path, mosquitto_factory, tiny) -> None:
    broker = mosquitto_factory()
    name = tiny["newcomer"]
    photo, _ = newcomer_unknown(tiny)

    # A tampered entry, retained before any device starts: made with the bundle's own embedder, then altered.
    manifest = json.loads((Path(tiny["bundle"]) / "manifest.json").read_text())
    embedder = manifest["files"][manifest["classifier"]["file"]]
    dim = int(np.load(Path(tiny["bundle"]) / manifest["gallery"]["file"])["embeddings"].shape[1])
    entry_id, payload = encode_entry("Mallory", _emb(2, dim), embedder, "elsewhere", version=1)
    tampered = payload.replace(b'"Mallory"', b'"Mallorz"')
    tampered_topic = f"faceberry/library/{entry_id}"
    mqtt_publish.single(tampered_topic, tampered, qos=1, retain=True, hostname=broker.host, port=broker.port)

    a = Daemon(_device(tmp_path, "door-a", tiny, broker, photo, commands=True), broker)
    b = Daemon(_device(tmp_path, "door-b", tiny, broker, photo), broker)
    c = None
    try:
        for d in (a, b):
            d.wait(lambda m, d=d: any(t == f"faceberry/{d.device}/events" for t, _, _ in m), 120)
            assert _labels(d)[0] == "unknown", d.text()

        mark_b = len(b.sub.messages)
        result = a.result_after(a.send(json.dumps({"command": "name_last_unknown", "name": name})))
        assert result["ok"] is True, (result, a.text())
        assert result["library_entry"].startswith("door-a-")
        library_topic = f"faceberry/library/{result['library_entry']}"
        # Retained on the broker, for every device, now and later.
        b.wait(lambda m: any(t == library_topic for t, _, _ in m), 30)

        # B's next frames name the newcomer, without a restart.
        b.wait(lambda m: name in _labels(b, mark_b), 180)
        assert b.proc.poll() is None
        # C, started after the naming, catches up from the retained entry.
        c = Daemon(_device(tmp_path, "door-c", tiny, broker, photo), broker)
        c.wait(lambda m: name in _labels(c), 180)

        # Forgotten through A's command topic: out of every device's bundle, without a restart.
        forgot = a.result_after(a.send(json.dumps({"command": "forget", "name": name})))
        assert forgot["ok"] is True and forgot["library_entry"].startswith("door-a-"), (forgot, a.text())
        for d in (b, c):
            d.wait(lambda m, d=d: name not in (tmp_path / d.device / "bundle" / "labels.txt").read_text().split(),
                   120)
    finally:
        errs = {d.device: d.stop() for d in (a, b, c) if d is not None}
    # Each daemon refused the tampered entry in one line and applied nothing from it.
    for device, err in errs.items():
        assert err.count(f"library entry on {tampered_topic} refused: checksum mismatch") == 1, (device, err[-3000:])
        bundle_labels = (tmp_path / device / "bundle" / "labels.txt").read_text().split()
        assert "Mallory" not in bundle_labels and "Mallorz" not in bundle_labels
    assert f"library: enrolled {name} from door-a" in errs["door-b"]
    assert f"library: enrolled {name} from door-a" in errs["door-c"]
    for device in ("door-b", "door-c"):
        assert f"library: forgot {name} from door-a" in errs[device], errs[device][-3000:]
    # A's own entry came back to it and was not applied again; each device has it recorded in its state_dir.
    assert "library: enrolled" not in errs["door-a"]
    for device in errs:
        applied = json.loads((tmp_path / device / "state" / f"library-{device}.json").read_text())["applied"]
        assert result["library_entry"] in applied and entry_id not in applied


# --- the rule: deterministic whatever the order ---------------------------------------------------------------------


def _random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_forget_and_correct_entries_decode_and_a_forget_carries_no_embeddings() -> None:
    _, payload = encode_entry("Ann", None, None, "door-a", version=5, op="forget")
    body = json.loads(payload)
    assert body["op"] == "forget" and not {"embeddings", "dim", "count", "embedder"} & set(body)
    entry = decode_entry(payload)
    assert (entry.op, entry.label, entry.embeddings, entry.key) == ("forget", "Ann", None, (5, "door-a"))
    _, payload = encode_entry("Ann", _emb(), EMBEDDER, "door-a", version=6, op="correct", subject="ev-1")
    entry = decode_entry(payload)
    assert (entry.op, entry.subject, entry.embeddings.shape) == ("correct", "ev-1", (2, 8))


def test_the_rule_is_last_writer_by_version_then_origin_per_label_and_per_subject() -> None:
    from faceberry.device.messaging.library import Part, Person, resolve

    one, two = np.ones((1, 2), np.float32), np.full((1, 2), 2, np.float32)
    people = {
        # Forgotten at 30: the enrolment at 20 and the bundle's own entry are void, the one at 40 lives.
        "Ann": Person(one, [Part("b-40", (40, "b"), None, two), Part("a-20", (20, "a"), None, one)], (30, "a")),
        # Named "Bob" at 50 on a, then the same stranger "Rob" at 50 on b: same version, origin b > a wins.
        "Bob": Person(None, [Part("a-50", (50, "a"), "s-1", one)]),
        "Rob": Person(None, [Part("b-50", (50, "b"), "s-1", two)]),
        # Forgotten after its last enrolment: not a person.
        "Cid": Person(None, [Part("a-60", (60, "a"), None, one)], (61, "b")),
    }
    out = resolve(people)
    assert np.array_equal(out["Ann"], two) and out["Bob"] is None and np.array_equal(out["Rob"], two)
    assert out["Cid"] is None


def _serving(bundle: Path) -> dict[str, np.ndarray]:
    from faceberry.bundle import load_bundle

    b = load_bundle(bundle)
    rows = np.asarray(b.gallery_embeddings, np.float32)
    return {str(label): rows[i] for i, label in enumerate(b.gallery_labels)}


def _bundle_library(bundle: Path, topics: Topics, publish, embedder: str, reloads=None, negatives=None):
    """A Library on a real bundle (real enrol, unenrol, recalibration); without `reloads`, nobody serves reloads
    (no frame loop)."""
    import threading

    from faceberry.bundle import load_bundle
    from faceberry.device.messaging.dispatcher import ReloadRequests
    from faceberry.device.messaging.library import Library
    from faceberry.device.recognition.enroll import enroll, unenroll

    def gallery(label: str):
        b = load_bundle(bundle, verify=False)
        keep = [i for i, lbl in enumerate(b.gallery_labels) if lbl == label]
        return np.asarray(b.gallery_embeddings, np.float32)[keep] if keep else None

    if reloads is None:
        reloads = ReloadRequests()
        reloads.close()  # waits answer at once: there is no frame loop here
    return Library(topics, publish, state=bundle.parent / f"library-{topics.device_id}.json",
                   enroll=lambda label, e: enroll(bundle, label, Path(), embeddings=e, merge=False),
                   unenroll=lambda label: unenroll(bundle, label), gallery=gallery, reloads=reloads,
                   embedder=lambda: embedder, enroll_lock=threading.Lock(), negatives=negatives)


def _embedder_and_dim(bundle: Path) -> tuple[str, int]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return (manifest["files"][manifest["classifier"]["file"]],
            int(np.load(bundle / manifest["gallery"]["file"])["embeddings"].shape[1]))


def test_conflicting_entries_end_the_same_on_every_device_in_whatever_order_they_arrive(tmp_path, tiny) -> None:
    embedder, dim = _embedder_and_dim(Path(tiny["bundle"]))
    rng = np.random.default_rng(23)
    known = tiny["people"][0]
    entries = [
        # Two devices name one stranger differently: b's name is the later one.
        encode_entry("Ann", _random_unit(rng, 2, dim), embedder, "door-a", version=10, subject="s-0000aaaa"),
        encode_entry("Anne", _random_unit(rng, 2, dim), embedder, "door-b", version=20, subject="s-0000aaaa"),
        # One device enrols Cid, another forgets Cid later: forgotten.
        encode_entry("Cid", _random_unit(rng, 1, dim), embedder, "door-a", version=30),
        encode_entry("Cid", None, None, "door-b", version=40, op="forget"),
        # One device forgets Dee, another (its clock later) enrols Dee: enrolled.
        encode_entry("Dee", None, None, "door-a", version=45, op="forget"),
        encode_entry("Dee", _random_unit(rng, 2, dim), embedder, "door-b", version=50),
        # A person of the deployed bundle, forgotten: gone, on a device started later too.
        encode_entry(known, None, None, "door-b", version=60, op="forget"),
    ]
    served = []
    for name, order in (("in-order", entries), ("reversed", entries[::-1])):
        (tmp_path / name).mkdir()
        bundle = tmp_path / name / "bundle"
        shutil.copytree(tiny["bundle"], bundle)
        published: list = []
        lib = _bundle_library(bundle, Topics("faceberry", f"door-{name}"),
                              lambda topic, payload, out=published, **k: out.append((topic, payload, k)), embedder)
        for entry_id, payload in order:
            lib.apply(f"faceberry/library/{entry_id}", payload)
        assert lib.stats["library_refused"] == 0
        # The enrolment the forget voids is cleared from the broker by whoever voids it, in either order.
        assert published == [("faceberry/library/door-a-30", b"", {"retain": True, "qos": 1})], (name, published)
        served.append((_serving(bundle), json.loads((bundle / "manifest.json").read_text())["thresholds"]["accept"]))
    (first, threshold_a), (second, threshold_b) = served
    assert sorted(first) == sorted(second)
    assert {"Anne", "Dee"} <= set(first) and not {"Ann", "Cid", known} & set(first)
    for label in first:
        assert np.array_equal(first[label], second[label]), label
    assert threshold_a == threshold_b



def test_a_person_is_forgotten_from_a_pi_store_as_a_new_version(tmp_path, tiny) -> None:
    """unenroll (a forget, here or from the library) writes a new version as enroll does: rollback has the old."""
    from faceberry.bundle import load_bundle
    from faceberry.device.ops.store import BundleStore
    from faceberry.device.recognition.enroll import EnrollError, unenroll
    from tests.plugins.files import pi_root

    store = BundleStore(pi_root(tmp_path))
    first = store.add(tiny["bundle"]).name
    store.switch(first)
    person = tiny["people"][0]
    result = unenroll(store.root / "current", person)
    after = load_bundle(store.root / "current")
    assert result["bundle_id"] == store.current() != first and store.previous() == first
    assert person not in after.labels and person not in list(after.gallery_labels)
    assert sorted(after.labels) == sorted(p for p in tiny["people"] if p != person)
    assert person in load_bundle(store.root / first).labels  # the old version is untouched
    with pytest.raises(EnrollError, match=r"is not enrolled .*nothing to forget"):
        unenroll(store.root / "current", person)

# --- forget and corrections over a real broker ----------------------------------------------------------------------


class _Node:
    """One device's library on a real broker, without a daemon: a real bundle (real enrol and unenrol), a real
    paho client, and a frame loop stand-in that serves reloads by loading the bundle as the daemon does."""

    def __init__(self, root: Path, name: str, broker, bundle: Path) -> None:
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from faceberry.device.memory.corrections import Negatives
        from faceberry.device.messaging.dispatcher import ReloadRequests

        root.mkdir(parents=True)
        self.bundle = root / "bundle"
        shutil.copytree(bundle, self.bundle)
        self.name = name
        self.reloaded: list[list[str]] = []  # the labels of each bundle loaded
        self.negatives = Negatives(root / "negatives.json")
        embedder, _ = _embedder_and_dim(self.bundle)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"lib-test-{name}", clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        self.reloads = ReloadRequests()
        self.lib = _bundle_library(self.bundle, Topics("faceberry", name),
                                   lambda t, p, retain=False, qos=0: self.client.publish(t, p, qos=qos, retain=retain),
                                   embedder, self.reloads, self.negatives)
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._serve, daemon=True)
        self._loop.start()
        self.lib.start()
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe("faceberry/library/#", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, msg: self.lib.receive(msg.topic, bytes(msg.payload), msg.retain)
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _serve(self) -> None:
        from faceberry.bundle import load_bundle
        from faceberry.device.messaging.dispatcher import ReloadResult

        def reload() -> ReloadResult:
            b = load_bundle(self.bundle)
            self.reloaded.append([str(x) for x in b.gallery_labels])
            return ReloadResult(True, b.bundle_id, str(self.bundle))

        while not self._stop.wait(0.05):
            self.reloads.serve(reload)

    def wait(self, predicate, timeout: float = 60) -> bool:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.1)
        return predicate()

    def serves(self, label: str) -> bool:
        return bool(self.reloaded) and label in self.reloaded[-1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.lib.stop()
        self._stop.set()
        self.reloads.close()


@pytest.fixture
def nodes(tmp_path: Path, mosquitto_factory) -> Iterator[Callable[..., _Node]]:
    """`nodes(device_id, broker, bundle)`: a `_Node` in tmp_path/<device_id>; every one is closed after the test
    (before its brokers stop)."""
    made: list[_Node] = []

    def node(device_id: str, broker, bundle: Path) -> _Node:
        made.append(_Node(tmp_path / device_id, device_id, broker, bundle))
        return made[-1]

    yield node
    for each in made:
        each.close()


def _newcomer(tiny: dict) -> tuple[str, list[np.ndarray], Path]:
    """The newcomer's name, the embedding of a photo of theirs the bundle takes for a stranger (the daemon's
    pipeline: what a command names), and that photo."""
    photo, vector = newcomer_unknown(tiny)
    return tiny["newcomer"], [vector], photo


def _enrol_here(node: _Node, name: str, vectors: list[np.ndarray], subject: str | None = None) -> str:
    """What the command runner does on the origin: enrol into its own bundle, reload, then share."""
    from faceberry.device.recognition.enroll import enroll

    summary = enroll(node.bundle, name, Path(), embeddings=np.stack(vectors), merge=False)
    node.reloads.wait(node.reloads.request(), 60)
    return node.lib.share(name, summary["embeddings"], summary["embedder"], subject)


@pytest.mark.broker
def test_a_person_forgotten_on_one_device_is_forgotten_on_every_device_and_stays_forgotten(
        tmp_path, mosquitto_factory, nodes, tiny) -> None:
    from faceberry.device.recognition.enroll import unenroll

    broker = mosquitto_factory()
    name, vectors, _ = _newcomer(tiny)
    a = nodes("door-a", broker, tiny["bundle"])
    b = nodes("door-b", broker, tiny["bundle"])
    enrol_id = _enrol_here(a, name, vectors)
    assert b.wait(lambda: b.serves(name)), b.reloaded
    # A forgets them (the `forget` command with `name`): out of A's bundle, then shared.
    unenroll(a.bundle, name)
    forget_id = a.lib.forget(name)
    assert b.wait(lambda: b.reloaded and not b.serves(name)), b.reloaded
    # On the broker: the tombstone stays, the enrolment (their embeddings) is cleared (A publishes the clear
    # just after the tombstone: it may still be on its way).
    retained = _retained(broker, lambda r: f"faceberry/library/{enrol_id}" not in r)
    assert f"faceberry/library/{forget_id}" in retained and f"faceberry/library/{enrol_id}" not in retained
    # A device started later, with the person in the bundle it was deployed with: not resurrected.
    seeded = tmp_path / "seeded"
    shutil.copytree(b.bundle, seeded)
    from faceberry.device.recognition.enroll import enroll
    enroll(seeded, name, Path(), embeddings=np.stack(vectors))
    late = nodes("door-late", broker, seeded)
    assert late.wait(lambda: forget_id in late.lib.state), late.lib.state.ids
    assert name not in _serving(late.bundle)
    # And B, restarted (same state_dir), applies nothing again.
    assert forget_id in b.lib.state and enrol_id in b.lib.state


def _retained(broker, until=lambda retained: True, timeout: float = 20) -> set[str]:
    """The library topics the broker holds a retained entry on, once `until(them)` holds (or after `timeout`)."""
    import time

    from tests.plugins.broker import Subscriber

    end = time.monotonic() + timeout
    while True:
        sub = Subscriber(broker.host, broker.port, "faceberry/library/#")
        sub.wait_for(lambda m: False, 0.5)  # retained messages come at once on loopback
        sub.close()
        retained = {t for t, p, retain in sub.messages if retain and p}
        if until(retained) or time.monotonic() > end:
            return retained


@pytest.mark.broker
def test_a_correction_on_one_device_is_a_negative_on_every_device_and_its_undo_undoes_it_everywhere(
        mosquitto_factory, nodes, tiny) -> None:
    broker = mosquitto_factory()
    _, vectors, _ = _newcomer(tiny)
    a = nodes("door-a", broker, tiny["bundle"])
    b = nodes("door-b", broker, tiny["bundle"])
    person = tiny["people"][0]
    # What `wrong` does on A: the negative stored there, then shared.
    correction = a.negatives.add(person, vectors[0], "ev-1")
    entry_id = a.lib.share_correction(person, vectors[0], a.lib.embedder(), "ev-1")
    a.negatives.tag(correction, entry_id)
    assert b.wait(lambda: b.negatives.for_label(person) is not None)
    assert np.allclose(b.negatives.for_label(person), vectors[0][None], atol=1e-6)
    assert b.negatives.records[0]["event_id"] == "ev-1" and entry_id in b.lib.state
    assert len(a.negatives) == 1  # its own entry came back and was not stored twice

    # `undo` on B (the correction came from A): undone on A too, and on a device started later.
    rec = b.negatives.undo()
    assert rec is not None and rec["library"] == entry_id
    undo_id = b.lib.uncorrect(rec["label"], rec["library"])
    assert a.wait(lambda: len(a.negatives) == 0), a.negatives.records
    cleared = f"faceberry/library/{entry_id}"
    assert cleared not in _retained(broker, lambda r: cleared not in r)
    late = nodes("door-late", broker, tiny["bundle"])
    assert late.wait(lambda: undo_id in late.lib.state)
    assert len(late.negatives) == 0


def test_an_undone_correction_is_not_stored_whichever_comes_first(tmp_path) -> None:
    import threading

    from faceberry.device.memory.corrections import Negatives
    from faceberry.device.messaging.dispatcher import ReloadRequests
    from faceberry.device.messaging.library import Library

    correct = encode_entry("Ann", _emb(1), EMBEDDER, "door-a", version=1, op="correct", subject="ev-1")
    undo = encode_entry("Ann", None, None, "door-b", version=2, op="uncorrect", subject=correct[0])
    for name, order in (("in-order", [correct, undo]), ("reversed", [undo, correct])):
        negatives = Negatives(tmp_path / f"negatives-{name}.json")
        lib = Library(Topics("faceberry", "door-c"), lambda *a, **k: None, state=tmp_path / f"library-{name}.json",
                      enroll=lambda *a: {}, reloads=ReloadRequests(), embedder=lambda: EMBEDDER,
                      enroll_lock=threading.Lock(), negatives=negatives)
        for entry_id, payload in order:
            lib.apply(f"faceberry/library/{entry_id}", payload)
        assert len(negatives) == 0, (name, negatives.records)


# --- across a bridge --------------------------------------------------------------------------------------------


def _bridge_config(central, client_id: str) -> str:
    """docs/MQTT.md's bridge configuration (the one tests/test_bridge.py runs), pointed at `central`, retrying
    after a second instead of the documented 5 s."""
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "MQTT.md").read_text(encoding="utf-8")
    section = doc.split("### A local broker on each site, bridged to a central one", 1)[1]
    conf = re.search(r"```conf\n(.*?)```", section, re.S).group(1)
    assert "topic faceberry/# both 1" in conf, "docs/MQTT.md's bridge no longer carries faceberry/# both ways"
    lines = {line.split()[0]: line for line in conf.splitlines() if line and not line.startswith("#")}
    for key, value in [("address", f"address {central.host}:{central.port}"),
                       ("remote_clientid", f"remote_clientid {client_id}"),
                       ("restart_timeout", "restart_timeout 1 2")]:
        conf = conf.replace(lines[key], value)
    return conf


@pytest.mark.broker
def test_the_library_crosses_a_bridge_and_an_outage_of_it_loses_nothing(mosquitto_factory, nodes, tiny) -> None:
    central = mosquitto_factory(persistent=True)
    local = mosquitto_factory(persistent=True, extra_config=_bridge_config(central, "faceberry-bridge-library"))
    name, vectors, photo = _newcomer(tiny)
    a = nodes("site-a-door", local, tiny["bundle"])
    b = nodes("centre-door", central, tiny["bundle"])
    # Named on A (its local broker), across the bridge: B's bundle names the face.
    assert predictions(b.bundle, [photo])[0][0] == "unknown"
    _enrol_here(a, name, vectors)
    assert b.wait(lambda: b.serves(name)), (b.reloaded, b.lib.stats)
    assert predictions(b.bundle, [photo])[0][0] == name

    # The central broker (and so the bridge) goes away; A names someone else meanwhile.
    central.stop()
    _, dim = _embedder_and_dim(a.bundle)
    other = _enrol_here(a, "Zed", list(_random_unit(np.random.default_rng(5), 2, dim)))
    assert not b.serves("Zed")
    central.start()
    # The local broker kept it for the bridge: it arrives once the bridge is back.
    assert b.wait(lambda: b.serves("Zed"), 60), (b.reloaded, b.lib.stats)
    assert other in b.lib.state and b.lib.stats["library_refused"] == 0
