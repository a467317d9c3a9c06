"""The versions store on the Pi: every bundle a directory of its own, and a `current` link the daemon reads.

Layout (the systemd unit, install.sh and `faceberry deploy|rollback|enroll|status` rely on it exactly):

    <root>/                       /var/lib/faceberry/bundles by default
        <bundle_id>/              one version per manifest bundle_id, never changed once written
        current -> <bundle_id>    RELATIVE link; the config's `bundle:` is <root>/current
        previous -> <bundle_id>   what `current` pointed to before the last switch: `rollback` goes there
        .incoming-<tag>/          a version being written (or rsynced by `deploy --host`)
        .lock                     held while the store changes, so two commands cannot interleave

History is the `previous` link: a switch moves the old `current` to `previous`, so rollback swaps the two
and a second rollback returns to where the first began. Links are switched atomically (a new link
`current.tmp-<pid>` renamed over the old one), so the daemon always resolves either the old version or
the new one.

A version is written into `.incoming-<tag>/`, given the root's owner and group (when run as root) with
modes 0750/0640, fsynced, verified with faceberry.bundle.load_bundle (every checksum and range), and only
then renamed to `<bundle_id>/`: the service user `faceberry` can read it whoever wrote it, and a crash
leaves at most an incoming directory that the next prune removes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from faceberry.bundle import MANIFEST, BundleError, load_bundle
from faceberry.device.config import DEFAULT_STATE_DIR
from faceberry.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_ROOT = DEFAULT_STATE_DIR / "bundles"
CURRENT = "current"
PREVIOUS = "previous"
INCOMING_PREFIX = ".incoming-"
LOCK = ".lock"
KEEP = 5  # versions kept besides whatever current and previous point to
DIR_MODE = 0o750
FILE_MODE = 0o640
# An incoming directory untouched this long was left by a crash (or an abandoned rsync), not one in progress.
STALE_INCOMING_S = 3600.0


class StoreError(UsageError):
    """A store that is missing, unwritable or inconsistent; the message names the fix."""


def store_for_bundle(bundle: str | Path) -> Path | None:
    """The store root when `bundle` is a store's `current` link (the config's `bundle:` on the Pi), else None."""
    path = Path(bundle)
    return path.parent if path.name == CURRENT else None


def default_root(bundle: str | Path | None) -> Path:
    """--store's default: the parent of a config's `<root>/current`, else /var/lib/faceberry/bundles."""
    return (store_for_bundle(bundle) if bundle is not None else None) or DEFAULT_ROOT


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleStore:
    """The versions under one root; see the module docstring for the layout."""

    def __init__(self, root: str | Path, create: bool = False) -> None:
        self.root = Path(root)
        if create and not self.root.exists():
            try:
                self.root.mkdir(mode=DIR_MODE, parents=True)
            except OSError as exc:
                raise StoreError(f"cannot create the bundle store {self.root} ({exc.strerror or exc}); run as a "
                                 "user who may (sudo), or pass --store") from None
        if not self.root.is_dir():
            raise StoreError(f"bundle store {self.root} not found; install faceberry (install.sh creates it), or "
                             "pass --store with the directory that holds the versions and `current`")

    # --- reading -------------------------------------------------------------------------------------------

    def path(self, bundle_id: str) -> Path:
        if not bundle_id or bundle_id in (".", "..", CURRENT, PREVIOUS) or Path(bundle_id).name != bundle_id \
                or bundle_id.startswith("."):
            raise StoreError(f"{bundle_id!r} cannot name a version in {self.root}; rebuild the bundle with "
                             "`python -m convert` (bundle ids are plain names)")
        return self.root / bundle_id

    def versions(self) -> list[str]:
        """Bundle ids in the store, least recently deployed first (the order prune removes them in)."""
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or entry.name in (CURRENT, PREVIOUS) or entry.is_symlink():
                continue
            if entry.is_dir() and (entry / MANIFEST).is_file():
                found.append((entry.stat().st_mtime, entry.name))
        return [name for _, name in sorted(found)]

    def _link(self, name: str) -> str | None:
        link = self.root / name
        if not link.is_symlink():
            if link.exists():
                raise StoreError(f"{link} is not a link to a version; move it away and deploy again")
            return None
        target = os.readlink(link)
        return Path(target).name

    def current(self) -> str | None:
        """The bundle id `current` points to (None in an empty store)."""
        return self._link(CURRENT)

    def previous(self) -> str | None:
        return self._link(PREVIOUS)

    # --- writing -------------------------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock: enroll, deploy and rollback change it one at a time."""
        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot write to the bundle store {self.root} ({exc.strerror or exc}); run as root "
                             "(sudo) or as the user owning it") from None
        try:
            if os.geteuid() == 0:
                # Created by root, it must still open for the service user's own enroll later.
                os.fchown(fd, *self._owner())
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def incoming(self, tag: str | None = None) -> Path:
        """A fresh, empty `.incoming-<tag>` directory (tag: this process's pid by default)."""
        path = self.root / f"{INCOMING_PREFIX}{tag or os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir(mode=DIR_MODE)
        except OSError as exc:
            raise StoreError(f"cannot write to the bundle store {self.root} ({exc.strerror or exc}); run as root "
                             "(sudo) or as the user owning it") from None
        return path

    def is_staged(self, path: Path) -> bool:
        """`path` is one of this store's incoming directories (moved into place by add, removed if refused)."""
        return path.parent.resolve() == self.root.resolve() and path.name.startswith(INCOMING_PREFIX)

    def _owner(self) -> tuple[int, int]:
        st = self.root.stat()
        return st.st_uid, st.st_gid

    def _adopt(self, top: Path) -> None:
        """Give `top` and everything in it the root's owner and group and the modes the service can read."""
        uid, gid = self._owner()
        as_root = os.geteuid() == 0
        warned = False
        for path in (top, *sorted(top.rglob("*"))):
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise StoreError(f"{path} is a link; a version holds plain files only: copy the bundle with its "
                                 "files (cp -L, rsync -L)")
            os.chmod(path, DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE)
            if (st.st_uid, st.st_gid) == (uid, gid):
                continue
            try:
                # Not root: only the group can change, to one this user belongs to.
                os.chown(path, uid if as_root else -1, gid)
            except PermissionError:
                if not warned:
                    log.warning("cannot give %s the store's group (gid %d): run as root (sudo) so the service "
                                "user can read it", path, gid)
                    warned = True

    def _fsync_tree(self, top: Path) -> None:
        for path in sorted(top.rglob("*")):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        for path in (top, *(p for p in top.rglob("*") if p.is_dir())):
            _fsync_dir(path)

    def add(self, src: str | Path) -> Path:
        """Add the bundle in `src` as a version; returns its directory. Refuses (StoreError) a bad bundle.

        `src` inside the store as an `.incoming-*` directory (what enroll builds, what deploy --host
        rsyncs) is moved into place; any other directory is copied and left as it was. A version
        already in the store under the same id with the same manifest is reused.
        """
        src = Path(src)
        staged = self.is_staged(src)
        try:
            load_bundle(src)  # refuse before copying anything
        except BundleError as exc:
            if staged:
                shutil.rmtree(src, ignore_errors=True)
            raise StoreError(f"refused: {exc}") from None
        with self.locked():
            if staged:
                tmp = src
            else:
                tmp = self.incoming()
                try:
                    shutil.copytree(src, tmp, dirs_exist_ok=True)  # links followed: a version is self-contained
                except OSError as exc:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise StoreError(f"cannot copy {src} into {self.root} ({exc}); check the free space and "
                                     "permissions") from None
            try:
                self._adopt(tmp)
                self._fsync_tree(tmp)
                bundle = load_bundle(tmp)  # what was written, not what was meant to be
                dest = self.path(bundle.bundle_id)
                if dest.exists():
                    if _same_manifest(dest, tmp):
                        shutil.rmtree(tmp)
                        log.info("version %s is already in %s: reused", bundle.bundle_id, self.root)
                        os.utime(dest)
                        return dest
                    raise StoreError(f"{dest} already holds a different bundle with the id {bundle.bundle_id}; "
                                     "rebuild the new bundle (convert gives it a new id) or remove that version")
                os.rename(tmp, dest)
                os.utime(dest)  # the deploy time orders versions for prune
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("added version %s to %s", bundle.bundle_id, self.root)
        return dest

    def _set_link(self, name: str, bundle_id: str) -> None:
        tmp = self.root / f"{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(bundle_id)  # relative: the store can be moved or seen from a chroot
        uid, gid = self._owner()
        if os.geteuid() == 0:
            os.lchown(tmp, uid, gid)
        os.replace(tmp, self.root / name)

    def switch(self, bundle_id: str) -> str | None:
        """Point `current` at `bundle_id` (and `previous` at what it pointed to); returns what it pointed to."""
        dest = self.path(bundle_id)
        with self.locked():
            if not (dest / MANIFEST).is_file():
                raise StoreError(f"no version {bundle_id} in {self.root} (have: {', '.join(self.versions()) or 'none'})"
                                 "; deploy it first")
            old = self.current()
            if old == bundle_id:
                return old  # already current: `previous` keeps its meaning
            if old is not None:
                self._set_link(PREVIOUS, old)
            self._set_link(CURRENT, bundle_id)
            os.utime(dest)
            _fsync_dir(self.root)
        log.info("current is %s (was %s) in %s", bundle_id, old, self.root)
        return old

    def rollback(self) -> str:
        """Switch back to `previous`; returns the bundle id now current. A second rollback undoes the first."""
        target = self.previous()
        if target is None:
            raise StoreError(f"nothing to roll back to in {self.root}: no earlier version was current; deploy one "
                             "with `faceberry deploy --bundle DIR`")
        if not (self.root / target / MANIFEST).is_file():
            raise StoreError(f"the previous version {target} is gone from {self.root}; deploy the version you "
                             "want with `faceberry deploy --bundle DIR`")
        self.switch(target)
        return target

    def prune(self, keep: int = KEEP) -> list[str]:
        """Remove all but the `keep` most recently deployed versions (current and previous always stay).

        Also removes incoming directories left by a crash. Returns the bundle ids removed.
        """
        removed = []
        with self.locked():
            pinned = {self.current(), self.previous()}
            others = [v for v in self.versions() if v not in pinned]
            for bundle_id in others[:max(len(others) - keep, 0)]:
                shutil.rmtree(self.root / bundle_id)
                removed.append(bundle_id)
            for entry in self.root.glob(f"{INCOMING_PREFIX}*"):
                if time.time() - entry.lstat().st_mtime > STALE_INCOMING_S:
                    shutil.rmtree(entry, ignore_errors=True)
        if removed:
            log.info("pruned %s from %s", ", ".join(removed), self.root)
        return removed


# Manifest keys that record a version's history, not what it decides: a re-enrolment that reproduces the
# same files and thresholds on the same day gets the same bundle_id, and is the same version.
_HISTORY_KEYS = ("created", "enrolled", "parent_bundle_id", "metrics")


def _same_manifest(a: Path, b: Path) -> bool:
    """The same version: both manifests (verified by load_bundle, and checksumming every file) agree on
    everything but their history."""
    def decisive(root: Path) -> dict:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        return {k: v for k, v in manifest.items() if k not in _HISTORY_KEYS}

    return decisive(a) == decisive(b)
