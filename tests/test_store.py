"""faceberry.device.ops.store: bundle versions under one root with an atomic, relative `current` link, owned for the
service.

Real bundles (the cached gallery bundle of tests/plugins/bundles.py, re-signed under new ids), real files,
real links; ownership is asserted with os.stat (as root the store root is given to another uid/gid first,
so "follows the root's owner" is not trivially true).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from faceberry.bundle import MANIFEST, load_bundle, write_manifest
from faceberry.device.ops.store import STALE_INCOMING_S, BundleStore, StoreError, default_root
from tests.plugins.files import OTHER_ID, assert_owned_like_root, corrupt, pi_root, variant


@pytest.fixture
def sources(tmp_path: Path, gallery_bundle: Path) -> dict[str, Path]:
    return {name: variant(gallery_bundle, tmp_path / "src" / name, name) for name in ("v1", "v2", "v3")}


def test_add_and_switch_make_a_readable_version_and_a_relative_current_link(tmp_path, sources) -> None:
    root = pi_root(tmp_path)
    store = BundleStore(root)
    assert store.current() is None and store.versions() == []
    v1 = store.add(sources["v1"])
    assert v1 == root / "v1" and load_bundle(v1).bundle_id == "v1"
    assert_owned_like_root(v1, root)
    assert store.switch("v1") is None
    assert os.readlink(root / "current") == "v1"  # relative: the store can be moved or chrooted
    assert load_bundle(root / "current").bundle_id == "v1"
    # The source is copied, not moved, and nothing is left half-written.
    assert load_bundle(sources["v1"]).bundle_id == "v1"
    assert not list(root.glob(".incoming-*")) and not list(root.glob("*.tmp-*"))

    store.add(sources["v2"])
    assert store.switch("v2") == "v1"
    assert (store.current(), store.previous()) == ("v2", "v1")
    assert os.readlink(root / "previous") == "v1"
    assert store.switch("v2") == "v2" and store.previous() == "v1"  # already current: history kept
    if os.geteuid() == 0:
        assert (root / "current").lstat().st_uid == OTHER_ID
        # The lock root created opens for the service user's own enroll later.
        assert (root / ".lock").stat().st_uid == OTHER_ID


def test_rollback_goes_back_one_and_a_second_rollback_returns(tmp_path, sources) -> None:
    store = BundleStore(pi_root(tmp_path))
    with pytest.raises(StoreError, match="nothing to roll back"):
        store.rollback()
    for name in ("v1", "v2"):
        store.add(sources[name])
        store.switch(name)
    assert store.rollback() == "v1"
    assert (store.current(), store.previous()) == ("v1", "v2")
    assert store.rollback() == "v2"
    assert load_bundle(store.root / "current").bundle_id == "v2"


def test_a_corrupt_bundle_is_refused_and_current_stays(tmp_path, sources, gallery_bundle) -> None:
    root = pi_root(tmp_path)
    store = BundleStore(root)
    store.add(sources["v1"])
    store.switch("v1")
    bad = corrupt(variant(gallery_bundle, tmp_path / "src" / "bad", "bad"))
    with pytest.raises(StoreError, match=r"refused: .*sha256"):
        store.add(bad)
    # A staged (rsynced) copy that fails is removed, not left for the daemon to find.
    staged = store.incoming("deploy-1")
    shutil.copytree(bad, staged, dirs_exist_ok=True)
    with pytest.raises(StoreError, match="refused"):
        store.add(staged)
    assert not staged.exists()
    assert store.versions() == ["v1"] and store.current() == "v1"
    with pytest.raises(StoreError, match="no version"):
        store.switch("bad")
    assert store.current() == "v1"


def test_same_id_is_reused_and_a_different_bundle_under_it_refused(tmp_path, sources, gallery_bundle) -> None:
    store = BundleStore(pi_root(tmp_path))
    first = store.add(sources["v1"])
    manifest = (first / MANIFEST).read_bytes()
    assert store.add(sources["v1"]) == first and (first / MANIFEST).read_bytes() == manifest
    # History differs only (created, metrics): the same version. A different threshold: another bundle.
    twin = variant(gallery_bundle, tmp_path / "src" / "twin", "v1")
    manifest_twin = json.loads((twin / MANIFEST).read_text())
    manifest_twin["created"], manifest_twin["metrics"] = "2001-01-01T00:00:00Z", {"note": "rebuilt"}
    write_manifest(twin, manifest_twin, list(manifest_twin.pop("files")))
    assert store.add(twin) == first and (first / MANIFEST).read_bytes() == manifest
    impostor = variant(gallery_bundle, tmp_path / "src" / "impostor", "v1", accept=0.123)
    with pytest.raises(StoreError, match="different bundle with the id v1"):
        store.add(impostor)
    assert (first / MANIFEST).read_bytes() == manifest
    assert not list(store.root.glob(".incoming-*"))


def test_staged_incoming_is_moved_and_prune_keeps_current_previous_and_the_newest(tmp_path, gallery_bundle) -> None:
    store = BundleStore(pi_root(tmp_path))
    names = [f"v{i}" for i in range(1, 8)]
    for i, name in enumerate(names):
        staged = store.incoming(f"deploy-{name}")
        shutil.copytree(variant(gallery_bundle, tmp_path / "src" / name, name), staged, dirs_exist_ok=True)
        path = store.add(staged)
        assert not staged.exists() and path.is_dir()
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # deploy order, whatever the clock's resolution
    store.switch("v2")
    store.switch("v1")  # current v1, previous v2: the two oldest
    os.utime(store.root / "v1", (1_000_000, 1_000_000))
    os.utime(store.root / "v2", (1_000_001, 1_000_001))
    stale = store.incoming("crashed")
    os.utime(stale, (stale.stat().st_mtime - STALE_INCOMING_S - 60,) * 2)
    fresh = store.incoming("in-progress")
    removed = store.prune(keep=2)
    assert removed == ["v3", "v4", "v5"]
    assert set(store.versions()) == {"v1", "v2", "v6", "v7"}
    assert not stale.exists() and fresh.exists()
    assert load_bundle(store.root / "current").bundle_id == "v1"


def test_default_root_follows_the_configs_current_link(tmp_path) -> None:
    assert default_root(tmp_path / "bundles" / "current") == tmp_path / "bundles"
    assert default_root(tmp_path / "my-bundle") == Path("/var/lib/faceberry/bundles")
    assert default_root(None) == Path("/var/lib/faceberry/bundles")
    with pytest.raises(StoreError, match="not found"):
        BundleStore(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="plain names"):
        BundleStore(pi_root(tmp_path)).path("../etc")
