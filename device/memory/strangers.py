"""Stranger memory: unknown faces clustered on the device, so events tell a new stranger from a regular.

Incremental: each unknown face's embedding joins the cluster whose centroid is nearest by cosine if that
cosine reaches `threshold` (the bundle's accept threshold: what is close enough to be "the same person"
for a known person is close enough for a stranger), else it starts a new cluster with a fresh random
`stranger_id` ("s-" + 8 hex digits). A centroid is the normalised sum of its members' embeddings.
Bounded: at most `max_clusters` (the least recently seen go first) and none unseen for `retention`
seconds. Persisted in `<state_dir>/strangers-<device_id>.npz` (centroids, ids, counts, times: no images).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from faceberry.contract import UNKNOWN, l2_normalize
from faceberry.device.messaging.dispatcher import FrameDone, Reloaded
from faceberry.device.outputs.events import iso_utc
from faceberry.statefile import DamagedFileError, RateLimitedLog, describe_error, set_aside, write_atomic

log = logging.getLogger(__name__)


@dataclass
class Stranger:
    stranger_id: str
    total: np.ndarray  # sum of the members' unit embeddings
    count: int
    first_seen: float
    last_seen: float

    @property
    def centroid(self) -> np.ndarray:
        return l2_normalize(self.total)


KEYS = ("ids", "totals", "counts", "first", "last")


def read_strangers(path: Path) -> dict[str, Stranger]:
    """The clusters in a stranger memory file; DamagedFileError naming what is wrong, OSError if unreadable."""
    try:
        # Our own file object: np.load given a path leaves it open when the content is refused.
        with open(path, "rb") as fh:
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DamagedFileError("a single array, not the stranger memory's .npz")
            with data:
                missing = [k for k in KEYS if k not in data.files]
                if missing:
                    raise DamagedFileError(f"no {', '.join(missing)} in it")
                ids, totals, counts, first, last = (data[k] for k in KEYS)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DamagedFileError(f"not a whole .npz file ({describe_error(exc)})") from exc
    except (OSError, DamagedFileError):
        raise
    except Exception as exc:
        # numpy's reader meets a damaged header with whatever its parser raises (ValueError, a pickle
        # refused, tokenize's TokenError, SyntaxError, MemoryError for an absurd shape): all mean damaged.
        raise DamagedFileError(f"unreadable arrays ({describe_error(exc)})") from exc
    n = len(ids) if ids.ndim == 1 else -1
    if n < 0 or ids.dtype.kind not in "US" or totals.ndim != 2 or len(totals) != n or any(
            a.shape != (n,) for a in (counts, first, last)):
        raise DamagedFileError(f"arrays of the wrong shapes (ids {ids.shape}, totals {totals.shape}, counts "
                               f"{counts.shape}, first {first.shape}, last {last.shape})")
    if totals.dtype.kind != "f" or counts.dtype.kind not in "iu" or first.dtype.kind not in "fiu" or \
            last.dtype.kind not in "fiu":
        raise DamagedFileError("arrays of the wrong types")
    if n and (not np.all(np.isfinite(totals)) or not np.all(np.isfinite(first)) or not np.all(np.isfinite(last))):
        raise DamagedFileError("NaN or infinite values")
    if n and (np.any(counts < 1) or len(set(ids.tolist())) != n or not totals.shape[1]):
        raise DamagedFileError("counts below 1, repeated ids or empty embeddings")
    return {str(sid): Stranger(str(sid), np.asarray(total, np.float32), int(count), float(f), float(la))
            for sid, total, count, f, la in zip(ids, totals, counts, first, last, strict=True)}


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


class StrangerMemory:
    def __init__(self, path: Path | None, threshold: float, max_clusters: int = 200, retention: float = 30 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.threshold = float(threshold)
        self.max_clusters = int(max_clusters)
        self.retention = float(retention)
        self.clock = clock
        self.clusters: dict[str, Stranger] = {}
        # The frame loop observes faces while the command runner's thread forgets strangers.
        self.lock = threading.RLock()
        self._failures = RateLimitedLog(log)
        if path is not None and (path.exists() or path.is_symlink()):
            self._load(path)
        self._prune()

    def _load(self, path: Path) -> None:
        lost = "the strangers it remembered are forgotten (their next visits get new stranger ids)"
        try:
            self.clusters = read_strangers(path)
        except OSError as exc:
            if isinstance(exc, IsADirectoryError):
                set_aside(path, "a directory, not a file", lost)
            else:
                # Unreadable (rights, an I/O error) is not damage: leave the file for a person to fix.
                log.warning("cannot read the stranger memory %s (%s); the daemon goes on without it", path,
                            describe_error(exc))
            self.clusters = {}
        except DamagedFileError as exc:
            set_aside(path, describe_error(exc), lost)
            self.clusters = {}

    @_locked
    def save(self) -> None:
        if self.path is None:
            return
        items = list(self.clusters.values())
        dim = len(items[0].total) if items else 0

        def write(fh: IO[bytes]) -> None:
            np.savez(fh, ids=np.array([s.stranger_id for s in items], dtype=str),
                     totals=np.array([s.total for s in items], np.float32).reshape(len(items), dim),
                     counts=np.array([s.count for s in items], np.int64),
                     first=np.array([s.first_seen for s in items], np.float64),
                     last=np.array([s.last_seen for s in items], np.float64))

        try:
            write_atomic(self.path, write)
        except OSError as exc:
            # At every unknown face while the disk is full: one line per kind, not one per face.
            self._failures.fail("save", f"cannot save the stranger memory {self.path}: {describe_error(exc)}; it "
                                "holds in memory until the daemon stops; check the free space in state_dir")
        else:
            self._failures.ok("save", f"the stranger memory {self.path} is saved again")

    def _prune(self) -> None:
        now = self.clock()
        for sid in [s.stranger_id for s in self.clusters.values() if now - s.last_seen > self.retention]:
            del self.clusters[sid]
        while len(self.clusters) > self.max_clusters:
            oldest = min(self.clusters.values(), key=lambda s: s.last_seen)
            del self.clusters[oldest.stranger_id]

    @_locked
    def nearest(self, embedding: np.ndarray) -> tuple[Stranger | None, float]:
        if not self.clusters:
            return None, -1.0
        probe = l2_normalize(np.asarray(embedding, np.float32).reshape(-1))
        items = list(self.clusters.values())
        if any(len(s.total) != len(probe) for s in items):  # another embedder (a new bundle): start afresh
            self.clusters = {}
            return None, -1.0
        sims = np.stack([s.centroid for s in items]) @ probe
        i = int(np.argmax(sims))
        return items[i], float(sims[i])

    @_locked
    def observe(self, embedding: np.ndarray, at: float | None = None) -> tuple[Stranger, bool]:
        """Add one unknown face; returns (its cluster, whether the cluster is new)."""
        at = self.clock() if at is None else at
        probe = l2_normalize(np.asarray(embedding, np.float32).reshape(-1))
        if not np.all(np.isfinite(probe)):
            # A NaN would join no cluster and poison the one it starts: this face is a stranger for now only.
            self._failures.fail("nan", "a face's embedding is not finite (NaN or infinite): it is not remembered "
                                "among the strangers; if this repeats, check the bundle")
            return Stranger(f"s-{uuid.uuid4().hex[:8]}", probe, 1, at, at), True
        best, sim = self.nearest(probe)
        if best is not None and sim >= self.threshold:
            best.total = best.total + probe
            best.count += 1
            best.last_seen = at
            cluster, new = best, False
        else:
            cluster = Stranger(f"s-{uuid.uuid4().hex[:8]}", probe.copy(), 1, at, at)
            self.clusters[cluster.stranger_id] = cluster
            new = True
        self._prune()
        self.save()
        return cluster, new

    @_locked
    def forget(self, stranger_id: str | None = None) -> int:
        """Forget one stranger (or all); returns how many were forgotten."""
        if stranger_id is None:
            n = len(self.clusters)
            self.clusters = {}
        else:
            n = int(self.clusters.pop(stranger_id, None) is not None)
        self.save()
        return n

    def __len__(self) -> int:
        return len(self.clusters)


class StrangerNames:
    """The dispatcher's subscriber that gives an unknown event its stranger fields, before the events output
    publishes it: the mean embedding of the track's last samples joins (or starts) a cluster."""

    def __init__(self, memory: StrangerMemory) -> None:
        self.memory = memory

    def frame(self, msg: FrameDone) -> None:
        for decided in msg.decided:
            if decided.event["label"] != UNKNOWN:
                continue
            vectors = [s.vector for s in decided.samples if s.vector is not None]
            if not vectors:
                continue
            cluster, new = self.memory.observe(np.mean(np.stack(vectors), axis=0))
            decided.event.update(stranger_id=cluster.stranger_id, stranger_count=cluster.count,
                                 stranger_first_seen=iso_utc(cluster.first_seen), stranger_new=new)

    def reloaded(self, msg: Reloaded) -> None:
        if msg.result.ok:  # enroll recalibrates the threshold; clusters follow it
            self.memory.threshold = msg.threshold
