"""Bundles written by convert are what device.bundle.load_bundle expects, and any damage to one is
caught at load time with the file named."""

from __future__ import annotations

import json
import shutil

import pytest

from device.bundle import BundleError, load_bundle

pytestmark = pytest.mark.shared


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_convert_manifest_is_complete(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for key in ("schema", "bundle_id", "created", "classifier", "detector", "labels", "preprocessing",
                "thresholds", "files", "metrics"):
        assert key in manifest, key
    assert manifest["labels"]["count"] == len((tiny_bundle / "labels.txt").read_text().split())
    assert manifest["created"].endswith("Z")
    bundle = load_bundle(tiny_bundle)
    assert bundle.bundle_id == manifest["bundle_id"]


@pytest.mark.parametrize("name", ["classifier.tflite", "labels.txt", "face_detection_short_range.tflite"])
def test_a_changed_file_is_refused_by_name(bundle_copy, name):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=name.replace(".", r"\.") + ".*sha256"):
        load_bundle(bundle_copy)


def test_a_missing_file_is_refused_by_name(bundle_copy):
    (bundle_copy / "classifier.tflite").unlink()
    with pytest.raises(BundleError, match=r"classifier\.tflite is missing"):
        load_bundle(bundle_copy)
