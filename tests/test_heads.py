"""One head per classifier kind (faceberry.heads), the typed manifest that chooses it, and the typed files
of a training run and a backbone (faceberry.train.run_files)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from faceberry.bundle import MANIFEST, BundleError, load_bundle, write_manifest
from faceberry.heads import GALLERY, HEADS, SOFTMAX, EmbeddingSection, SoftmaxSection
from faceberry.train import run_files
from tests.conftest import ROOT

# --- the kind is decided in one place ---------------------------------------------------------------------------


def test_no_classifier_kind_branch_outside_the_head_registry() -> None:
    """Every `kind ==` in device/, convert/ and train/ is in faceberry/heads.py (other notions were renamed)."""
    found = [f"{path.relative_to(ROOT)}:{n}" for folder in ("device", "convert", "train")
             for path in sorted((ROOT / folder).rglob("*.py")) if path.name != "heads.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bkind\s*[!=]=", line) and ".dtype.kind" not in line]
    assert found == []


def test_each_section_names_its_head_and_the_registry_holds_every_kind() -> None:
    assert SoftmaxSection(file="c.tflite", kind="softmax").head is SOFTMAX
    assert EmbeddingSection(file="c.tflite", kind="embedding").head is GALLERY
    assert set(HEADS) == {"softmax", "embedding"} and all(HEADS[k].kind == k for k in HEADS)


# --- the manifest, typed ------------------------------------------------------------------------------------------


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = list(manifest["files"])
    change(manifest)
    write_manifest(bundle, manifest, files)  # re-signed: the value itself is judged


@pytest.mark.shared
def test_a_softmax_bundle_has_an_empty_gallery_not_an_error(tiny_bundle: Path) -> None:
    from faceberry.classifier import FaceClassifier

    bundle = load_bundle(tiny_bundle)
    assert bundle.head is SOFTMAX and bundle.kind == "softmax"
    clf = FaceClassifier(bundle, num_threads=1)
    assert clf.gallery.shape == (0, len(bundle.labels)) and len(clf.gallery_labels) == 0
    assert clf.views == "face" and not clf.second_look


@pytest.mark.shared
@pytest.mark.parametrize(("change", "words"), [
    (lambda m: m.update(extra_key=1), "unknown key 'extra_key'"),
    (lambda m: m["classifier"].update(kind="gallery"), "classifier kind 'gallery' is not one of ('softmax', "
                                                        "'embedding')"),
    (lambda m: m["classifier"].update(colour="red"), "unknown key 'classifier.colour'"),
    (lambda m: m["classifier"].update(quantization="int4"), "classifier.quantization is 'int4', must be 'int8', "
                                                             "'float16' or 'float32'"),
    (lambda m: m["thresholds"].update(accept=True), "thresholds.accept is True, must be a valid number"),
    (lambda m: m["preprocessing"].update(alignment="x"), "preprocessing.alignment is 'x', not known to this version"),
    (lambda m: m.update(gallery={"file": "labels.txt"}), "gallery is only for embedding bundles, not softmax"),
    (lambda m: m["classifier"].update(kind="embedding"), "gallery is missing (every embedding bundle has one)"),
    (lambda m: m["labels"].pop("file"), "manifest has no 'labels.file'"),
])
def test_a_manifest_problem_names_the_file_and_the_key(bundle_copy: Path, change, words: str) -> None:
    _edit(bundle_copy, change)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert message.startswith(f"{bundle_copy / MANIFEST}: ") and words in message and "\n" not in message
    assert "rebuild the bundle" in message or "upgrade faceberry" in message


@pytest.mark.shared
def test_a_manifest_from_before_a_field_existed_still_loads(bundle_copy: Path) -> None:
    def older(m: dict) -> None:
        m["classifier"].pop("quantization")
        m["labels"].pop("count")
        m["thresholds"] = {"accept": m["thresholds"]["accept"]}
        m["detector"].pop("expected_sha256")
        for key in ("metrics", "source", "created"):
            m.pop(key, None)

    _edit(bundle_copy, older)
    bundle = load_bundle(bundle_copy)
    assert bundle.spec.classifier.quantization == "int8" and bundle.spec.thresholds.target_far == 0.05


# --- the run's and the backbone's files ---------------------------------------------------------------------------

RUN_CONFIG = {
    "kind": "embedding",
    "preprocessing": {"input_size": 150, "color_order": "RGB", "scale": 1.0, "offset": 0.0,
                      "alignment": "dlib-chip-v1"},
    "labels": ["Ann", "Bob"],
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_an_older_run_config_without_later_fields_reads(tmp_path: Path) -> None:
    config = run_files.read(_write(tmp_path / "config.json", RUN_CONFIG), run_files.RunConfig)
    assert config.gallery is None and config.cohort is None and config.args == {}
    assert config.preprocessing.preprocessing().input_size == 150
    report = run_files.read(_write(tmp_path / "report.json", {"threshold": {"accept": 0.5, "basis": "x"}}),
                            run_files.RunReport)
    assert report.threshold.target_far == 0.05 and report.threshold.model_dump(exclude_unset=True) == {
        "accept": 0.5, "basis": "x"}


@pytest.mark.parametrize(("data", "words"), [
    ({**RUN_CONFIG, "colour": 1}, "unknown key 'colour'"),
    ({**RUN_CONFIG, "kind": "gallery"}, "kind is 'gallery', must be 'softmax' or 'embedding'"),
    ({**RUN_CONFIG, "gallery": {"file": "g.npz", "view": "face"}}, "unknown key 'gallery.view'"),
    ({k: v for k, v in RUN_CONFIG.items() if k != "labels"}, "has no 'labels'"),
    ({**RUN_CONFIG, "preprocessing": {**RUN_CONFIG["preprocessing"], "scale": 0}}, "preprocessing.scale is 0"),
])
def test_a_run_config_problem_names_the_file_and_the_key(tmp_path: Path, data: dict, words: str) -> None:
    path = _write(tmp_path / "config.json", data)
    with pytest.raises(run_files.RunFileError) as info:
        run_files.read(path, run_files.RunConfig)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "; train again" in message


def test_convert_refuses_a_run_whose_report_has_no_threshold(tmp_path: Path) -> None:
    from faceberry.convert.build import ConvertError, load_run

    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.keras", "labels.txt", "crops.npz"):
        (run / name).write_bytes(b"")
    _write(run / "config.json", RUN_CONFIG)
    _write(run / "report.json", {"kind": "embedding"})
    with pytest.raises(ConvertError, match=re.escape(f"{run / 'report.json'}: it has no 'threshold'; train again")):
        load_run(run)


def test_a_backbone_config_is_typed_and_older_ones_read(tmp_path: Path) -> None:
    from faceberry.train.backbone import BackboneError, read_backbone_config

    root = tmp_path / "backbone"
    root.mkdir()
    (root / "embedder.keras").write_bytes(b"")
    distilled = {"kind": "backbone", "file": "embedder.keras", "embedding_dim": 128, "normalised_output": False,
                 "preprocessing": RUN_CONFIG["preprocessing"], "input_size": 150, "alpha": 1.0,
                 "teacher": {"id": "dlib", "mean": [0.0] * 3}}
    _write(root / "config.json", distilled)
    config = read_backbone_config(root)
    assert config.arch == "mobilenetv2"  # distilled backbones from before `arch` was written
    _write(root / "config.json", {**distilled, "archh": "dlib-resnet-v1"})
    with pytest.raises(BackboneError, match=re.escape("unknown key 'archh'")):
        read_backbone_config(root)


def test_train_writes_only_what_its_readers_accept(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="colour"):
        run_files.write_checked(tmp_path / "config.json", {**RUN_CONFIG, "colour": 1}, run_files.RunConfig)
    assert not (tmp_path / "config.json").exists()
    run_files.write_checked(tmp_path / "config.json", RUN_CONFIG, run_files.RunConfig)
    assert json.loads((tmp_path / "config.json").read_text()) == RUN_CONFIG
    assert np.isfinite(run_files.read(tmp_path / "config.json", run_files.RunConfig).preprocessing.scale)
