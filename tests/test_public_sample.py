"""The whole path on faces a fresh clone has without ../shared (tests/public_faces.py): train with the
dlib backbone, convert to int8, eval, enroll a stranger, and the daemon over a folder camera publishing to
a real mosquitto. These run for every user; the ../shared tests measure much more on many people."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from tests.plugins.broker import Subscriber
from tests.plugins.daemon import DEVICE, expected_event_labels, start_daemon, write_config
from tests.plugins.processes import finish, python
from tests.public_faces import KNOWN, STRANGER


def evaluate(bundle: Path, photos: Path, out: Path) -> dict:
    python("-m", "device", "eval", "--bundle", str(bundle), "--photos", str(photos), "--quiet",
             "--json", str(out), what="python -m device eval", check=True)
    return json.loads(out.read_text(encoding="utf-8"))


def test_the_known_face_is_named_and_the_stranger_is_not(public_sample: dict, tmp_path: Path) -> None:
    manifest = json.loads((public_sample["bundle"] / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["classifier"]["kind"], manifest["classifier"]["quantization"]) == ("embedding", "int8"), manifest
    report = evaluate(public_sample["bundle"], public_sample["probes"], tmp_path / "eval.json")
    assert report["per_person"][KNOWN]["right"] == report["per_person"][KNOWN]["probes"] == 4, report["per_person"]
    # Eileen Collins is not in the bundle: every probe of her is a stranger, and none may be named.
    assert report["counts"]["stranger_probes"] == 4 and report["counts"]["false_accepts"] == 0, report["counts"]
    assert {p["predicted"] for p in report["probes"] if p["folder"] == STRANGER} == {"unknown"}


def test_enrolling_the_stranger_names_her_and_keeps_the_known_face(public_sample: dict,
                                                                    tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(public_sample["bundle"], bundle)
    python("-m", "device", "enroll", "--bundle", str(bundle), "--name", STRANGER,
             "--photos", str(public_sample["gallery"] / STRANGER), what="python -m device enroll", check=True)
    labels = (bundle / "labels.txt").read_text(encoding="utf-8").split()
    assert STRANGER in labels and KNOWN in labels
    report = evaluate(bundle, public_sample["probes"], tmp_path / "eval.json")
    assert report["per_person"][STRANGER]["right"] >= 3, report["per_person"]
    assert report["per_person"][KNOWN]["right"] == 4 and report["counts"]["wrong"] == 0, report["counts"]


@pytest.mark.broker
def test_the_daemon_announces_the_public_faces_over_mqtt(public_sample: dict, tmp_path: Path,
                                                         mosquitto) -> None:
    camera = tmp_path / "camera"
    camera.mkdir()
    frames = []
    for person in (KNOWN, STRANGER):
        for photo in sorted((public_sample["probes"] / person).glob("*.jpg")):
            frames.append(camera / f"{person}_{photo.name}")
            frames[-1].symlink_to(photo)
    frames.sort()
    config = write_config(tmp_path / "config.yaml", public_sample["bundle"], mosquitto, {"device": str(camera)})
    sub = Subscriber(mosquitto.host, mosquitto.port, f"faceberry/{DEVICE}/events")
    try:
        rc, err = finish(start_daemon(config))
        assert rc == 0, err[-3000:]
        expected = expected_event_labels(public_sample["bundle"], frames)
        assert sub.wait_for(lambda m: len(m) >= len(expected), 15), (expected, sub.messages)
        events = [json.loads(p) for p in sub.on(f"faceberry/{DEVICE}/events")]
    finally:
        sub.close()
    # By file name Eileen Collins' four probes come first, then Grace Hopper's; views of one photo sit where
    # the last one was, so the tracker may keep one track across several: the labels, in order, are
    # `unknown` until Grace Hopper's first frame, then hers.
    assert [label for label, _ in itertools.groupby(expected)] == ["unknown", KNOWN], expected
    assert [e["label"] for e in events] == expected
    assert {e["label"] for e in events} == {KNOWN, "unknown"}
    bundle_id = json.loads((public_sample["bundle"] / "manifest.json").read_text(encoding="utf-8"))["bundle_id"]
    assert {e["model"] for e in events} == {bundle_id}
