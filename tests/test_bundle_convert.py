"""Bundles written by convert are what faceberry.bundle.load_bundle expects, and any damage to one is
caught at load time with the file named."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from faceberry.bundle import MANIFEST, MANIFEST_SHA256, BundleError, load_bundle, write_manifest

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


def _manifest_sha256(bundle: Path) -> str:
    digest, name = (bundle / MANIFEST_SHA256).read_text(encoding="ascii").split()
    assert name == MANIFEST
    return digest


def test_convert_covers_the_manifest_with_its_own_checksum(tiny_bundle: Path) -> None:
    assert _manifest_sha256(tiny_bundle) == hashlib.sha256((tiny_bundle / MANIFEST).read_bytes()).hexdigest()


def test_an_edited_manifest_is_refused_with_the_fix(bundle_copy: Path) -> None:
    path = bundle_copy / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["thresholds"]["accept"] = 0.01  # in range: only the checksum can tell it was edited
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert "manifest.json was edited or damaged; copy the bundle again / rebuild with python -m convert" in message
    assert "\n" not in message


def test_a_bundle_without_a_manifest_checksum_loads_with_a_warning(
    bundle_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (bundle_copy / MANIFEST_SHA256).unlink()  # as bundles made before it existed
    with caplog.at_level(logging.WARNING, logger="faceberry.bundle"):
        bundle = load_bundle(bundle_copy)
    assert bundle.accept_threshold > 0
    assert [r for r in caplog.records if MANIFEST_SHA256 in r.getMessage() and "older" in r.getMessage()]


@pytest.mark.parametrize(("path", "value", "words"), [
    (("labels", "count"), -1, "labels.count is -1"),
    (("preprocessing", "input_size"), 0, "input_size is 0"),
    (("preprocessing", "input_size"), 100000, "input_size is 100000"),
    (("preprocessing", "scale"), float("nan"), "scale is nan"),
    (("thresholds", "accept"), 0, "accept is 0"),
    (("thresholds", "target_far"), 1, "target_far is 1"),
    (("bundle_id",), 7, "bundle_id is 7, must be a valid string"),
    (("files",), [], "files is [], list, not an object"),
])
def test_out_of_range_fields_are_refused_even_when_the_checksum_matches(
    bundle_copy: Path, path: tuple[str, ...], value: Any, words: str
) -> None:
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    files = list(manifest["files"])
    holder = manifest
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    # write_manifest re-signs it, so the value itself must be judged (and "files" is put back): a hand edit
    # of the files list is tried apart.
    if path == ("files",):
        (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
        (bundle_copy / MANIFEST_SHA256).unlink()
    else:
        write_manifest(bundle_copy, manifest, files)
    with pytest.raises(BundleError, match=re.escape(words)):
        load_bundle(bundle_copy)


def test_enroll_writes_the_manifest_checksum(
    tiny_bundle: Path, tiny_bundle_people: list[str], heldout_photos: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    from faceberry.device.recognition.enroll import enroll
    from tests.plugins.bundles import embedding_base

    labels = [x for x in (tiny_bundle / "labels.txt").read_text().splitlines() if x.strip()]
    bundle_dir = embedding_base(tiny_bundle, tmp_path / "bundle", labels)
    (bundle_dir / MANIFEST_SHA256).unlink()  # a bundle from before the checksum: enroll gives it one
    enroll(bundle_dir, "New Person", heldout_photos / tiny_bundle_people[0], min_photos=2)
    assert _manifest_sha256(bundle_dir) == hashlib.sha256((bundle_dir / MANIFEST).read_bytes()).hexdigest()
    caplog.clear()  # enroll's own load of the old bundle warned, rightly
    with caplog.at_level(logging.WARNING, logger="faceberry.bundle"):
        bundle = load_bundle(bundle_dir)
    assert not [r for r in caplog.records if MANIFEST_SHA256 in r.getMessage()]
    assert bundle.labels[-1] == "New Person" and bundle.manifest["labels"]["count"] == len(bundle.labels)
