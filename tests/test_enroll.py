"""`python -m device enroll`: add a person to an int8 embedding bundle with the device's own code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.plugins.processes import python


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def test_enroll_adds_a_person_who_is_then_recognised(tiny_embedding: dict, tmp_path: Path) -> None:
    from faceberry.bundle import load_bundle
    from faceberry.classifier import FaceClassifier
    from faceberry.device.recognition.pipeline import FacePipeline
    from faceberry.preprocess import load_image

    bundle_dir = _copy(tiny_embedding["bundle"], tmp_path)
    before = load_bundle(bundle_dir)
    name = tiny_embedding["newcomer"]
    proc = python("-m", "device", "enroll", "--bundle", str(bundle_dir), "--name", name,
                  "--photos", str(tiny_embedding["newcomer_photos"]), what="python -m device enroll", check=True,
                  timeout=900)
    assert f"enrolled {name}" in proc.stdout
    after = load_bundle(bundle_dir)  # checksums verified
    assert after.labels == [*before.labels, name]
    assert after.gallery_labels == [*before.gallery_labels, name]
    assert np.allclose(after.gallery_embeddings[:-1], before.gallery_embeddings)
    assert after.bundle_id != before.bundle_id and after.manifest["parent_bundle_id"] == before.bundle_id
    assert after.accept_threshold == before.accept_threshold
    assert not list(tmp_path.glob(".bundle.enroll*")), "temporary directories left behind"

    # The newcomer's photos that were not enrolled, through detect → align → int8 embedder → gallery.
    pipe = FacePipeline(after)
    best = []
    for path in tiny_embedding["newcomer_probes"]:
        result = pipe.process(load_image(path))
        if result.recognitions:
            best.append(max(result.recognitions, key=lambda r: r.face.width).prediction.best)
    assert len(best) >= 4
    rate = float(np.mean([b == name for b in best]))
    chance = 1.0 / len(after.gallery_labels)
    assert rate > chance, (rate, chance, best)
    assert isinstance(FaceClassifier(after).classify(np.zeros((64, 64, 3), np.uint8)).label, str)


def test_enroll_refuses_photos_without_a_usable_face(tiny_embedding: dict, tmp_path: Path) -> None:
    bundle_dir = _copy(tiny_embedding["bundle"], tmp_path)
    manifest = (bundle_dir / "manifest.json").read_bytes()
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "wall.jpg"), np.full((240, 320, 3), 180, np.uint8))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    proc = python("-m", "device", "enroll", "--bundle", str(bundle_dir), "--name", "Nobody", "--photos",
                    str(photos), what="enroll", check=False)
    assert proc.returncode != 0
    assert "wall.jpg" in proc.stderr and "broken.jpg" in proc.stderr
    assert "error:" in proc.stderr and "usable face" in proc.stderr
    assert (bundle_dir / "manifest.json").read_bytes() == manifest  # untouched


def test_enroll_refuses_a_softmax_bundle_and_duplicates(tiny_embedding: dict, tmp_path: Path) -> None:
    from faceberry.bundle import MANIFEST, write_manifest
    from faceberry.device.recognition.enroll import EnrollError, enroll

    bundle_dir = _copy(tiny_embedding["bundle"], tmp_path)
    with pytest.raises(EnrollError, match="already in"):
        enroll(bundle_dir, tiny_embedding["people"][0], tiny_embedding["newcomer_photos"])
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["classifier"]["kind"] = "softmax"
    del manifest["gallery"]
    write_manifest(bundle_dir, manifest, [f for f in manifest["files"] if f != "gallery.npz"])
    with pytest.raises(EnrollError, match="softmax bundle"):
        enroll(bundle_dir, "Someone", tiny_embedding["newcomer_photos"])


def test_enroll_crash_leaves_the_old_bundle(tiny_embedding: dict, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import faceberry.device.recognition.enroll as enroll_mod
    from faceberry.bundle import load_bundle

    bundle_dir = _copy(tiny_embedding["bundle"], tmp_path)
    before = (bundle_dir / "manifest.json").read_bytes()
    real_rename = enroll_mod.os.rename
    calls = []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(enroll_mod.os, "rename", crash_on_second)
    with pytest.raises(OSError, match="power cut"):
        enroll_mod.enroll(bundle_dir, "Newcomer", tiny_embedding["newcomer_photos"])
    monkeypatch.setattr(enroll_mod.os, "rename", real_rename)
    assert (bundle_dir / "manifest.json").read_bytes() == before
    load_bundle(bundle_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_enroll_into_a_pi_store_writes_a_new_version_the_service_can_read(
        tiny_embedding: dict, tmp_path: Path) -> None:
    """The Pi's layout: /var/lib/faceberry/bundles/<id>/ and `current`; enroll as root, service user reads it."""
    from faceberry.bundle import load_bundle
    from faceberry.device.ops.store import BundleStore
    from faceberry.device.recognition.enroll import enroll
    from tests.plugins.files import OTHER_ID, assert_owned_like_root, pi_root

    root = pi_root(tmp_path)  # as root: owned by 65534:65534, standing in for faceberry:faceberry
    store = BundleStore(root)
    first = store.add(tiny_embedding["bundle"]).name
    store.switch(first)
    config = tmp_path / "config.yaml"
    config.write_text(f"bundle: {root / 'current'}\ndevice_id: enrollcam\nstate_dir: {tmp_path / 'state'}\n")
    name = tiny_embedding["newcomer"]

    # --bundle defaults to the config's `bundle:` (the current link): a new version, not an in-place edit.
    proc = python("-m", "device", "enroll", "--config", str(config), "--name", name,
                  "--photos", str(tiny_embedding["newcomer_photos"]), what="python -m device enroll (store)",
                  check=True, timeout=900)
    new = os.readlink(root / "current")
    assert new != first and "/" not in new  # a relative link to a sibling version
    assert os.readlink(root / "previous") == first
    version = root / new
    assert_owned_like_root(version, root)
    if os.geteuid() == 0:
        assert (root / "current").lstat().st_uid == OTHER_ID
    after = load_bundle(root / "current")
    assert after.bundle_id == new and after.labels[-1] == name
    assert after.manifest["parent_bundle_id"] == first
    assert name not in load_bundle(root / first).labels  # the old version is untouched: rollback has it
    assert f"into a new version {version}" in proc.stdout
    assert "reload: no faceberry daemon is running" in proc.stdout
    assert not list(root.glob(".incoming-*"))

    # The same photos again reproduce the same files on the same day: the same version, nothing switches.
    again = enroll(root / "current", name, tiny_embedding["newcomer_photos"], replace=True)
    assert again["bundle_id"] == new and store.current() == new and store.previous() == first

    # The function the daemon's Home Assistant helper calls: it names the version it wrote and switches to it.
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for photo in sorted(tiny_embedding["newcomer_photos"].iterdir())[:-1]:
        (fewer / photo.name).symlink_to(photo.resolve())
    result = enroll(None, name, fewer, replace=True, store=store, keep=0)
    assert result["bundle_id"] != new
    assert result["path"] == str(root / result["bundle_id"]) and result["store"] == str(root)
    assert store.current() == result["bundle_id"] and store.previous() == new
    assert result["parent_bundle_id"] == new and result["pruned"] == [first]
    assert_owned_like_root(Path(result["path"]), root)
