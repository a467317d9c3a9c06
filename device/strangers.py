"""Stranger memory: unknown faces clustered on the device, so events tell a new stranger from a regular.

Incremental: each unknown face's embedding joins the cluster whose centroid is nearest by cosine if that
cosine reaches `threshold` (the bundle's accept threshold: what is close enough to be "the same person"
for a known person is close enough for a stranger), else it starts a new cluster with a fresh random
`stranger_id` ("s-" + 8 hex digits). A centroid is the normalised sum of its members' embeddings.
Bounded: at most `max_clusters` (the least recently seen go first) and none unseen for `retention`
seconds. Persisted in `<state_dir>/strangers-<device_id>.npz` (centroids, ids, counts, times: no images).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.contract import l2_normalize

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


class StrangerMemory:
    def __init__(self, path: Path | None, threshold: float, max_clusters: int = 200, retention: float = 30 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.threshold = float(threshold)
        self.max_clusters = int(max_clusters)
        self.retention = float(retention)
        self.clock = clock
        self.clusters: dict[str, Stranger] = {}
        if path is not None and path.is_file():
            self._load(path)
        self._prune()

    def _load(self, path: Path) -> None:
        try:
            with np.load(path) as data:
                for sid, total, count, first, last in zip(data["ids"], data["totals"], data["counts"], data["first"],
                                                          data["last"], strict=True):
                    self.clusters[str(sid)] = Stranger(str(sid), np.asarray(total, np.float32), int(count),
                                                       float(first), float(last))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring the unreadable stranger memory %s: %s", path, exc)
            self.clusters = {}

    def save(self) -> None:
        if self.path is None:
            return
        items = list(self.clusters.values())
        dim = len(items[0].total) if items else 0
        tmp = self.path.with_name(f".{self.path.name}.tmp.npz")
        try:
            np.savez(tmp, ids=np.array([s.stranger_id for s in items], dtype=str),
                     totals=np.array([s.total for s in items], np.float32).reshape(len(items), dim),
                     counts=np.array([s.count for s in items], np.int64),
                     first=np.array([s.first_seen for s in items], np.float64),
                     last=np.array([s.last_seen for s in items], np.float64))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot save the stranger memory %s: %s", self.path, exc)

    def _prune(self) -> None:
        now = self.clock()
        for sid in [s.stranger_id for s in self.clusters.values() if now - s.last_seen > self.retention]:
            del self.clusters[sid]
        while len(self.clusters) > self.max_clusters:
            oldest = min(self.clusters.values(), key=lambda s: s.last_seen)
            del self.clusters[oldest.stranger_id]

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

    def observe(self, embedding: np.ndarray, at: float | None = None) -> tuple[Stranger, bool]:
        """Add one unknown face; returns (its cluster, whether the cluster is new)."""
        at = self.clock() if at is None else at
        probe = l2_normalize(np.asarray(embedding, np.float32).reshape(-1))
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
