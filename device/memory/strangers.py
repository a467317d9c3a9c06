"""Stranger memory: unknown faces clustered on the device, so events tell a new stranger from a regular.

Incremental: each unknown face's embedding joins the cluster whose centroid is nearest by cosine if that
cosine reaches `threshold` (the bundle's accept threshold: what is close enough to be "the same person"
for a known person is close enough for a stranger), else it starts a new cluster with a fresh random
`stranger_id` ("s-" + 8 hex digits). A centroid is the normalised sum of its members' embeddings.
Bounded: at most `max_clusters` (the least recently seen go first) and none unseen for `retention`
seconds. Persisted in `<state_dir>/strangers-<device_id>.npz` (centroids, ids, counts, times: no images).

Shared with the other devices (`library.strangers`, device/messaging/stranger_sync.py): a `Sharing` attached
as `memory.sharing` is told of every new stranger (and, at most every `share_interval`, of a known one seen
again, so every device's last_seen follows the fleet's), of every merge and of every stranger expired or
forgotten. Strangers shared by other devices join through `adopt`, under the merge rule below, so a stranger
keeps one `stranger_id` on every camera of every device.

The merge rule, the same on every device whatever the order entries arrive in: a shared stranger whose
centroid is within `threshold` of a stranger already here is the same person; of the two, the one with the
earlier first_seen keeps its id (equal first_seen: the smaller id) and the other id becomes its alias. Aliases
are shared too, so a device that saw only one side (or disagreed by a hair on the cosine) follows the merge.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from faceberry.contract import UNKNOWN, l2_normalize
from faceberry.device.memory.locked import locked
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
    # The last_seen last published or received (None: not shared yet); not persisted: a restart shares again.
    shared_at: float | None = None

    @property
    def centroid(self) -> np.ndarray:
        return l2_normalize(self.total)


@dataclass(frozen=True)
class SharedStranger:
    """A stranger as another device shares it (device/messaging/stranger_sync.py decodes and verifies it)."""

    stranger_id: str
    centroid: np.ndarray | None  # unit (dim,) float32; None for an alias
    count: int
    first_seen: float
    last_seen: float
    alias_of: str | None = None  # this id is now that stranger's


class Sharing(Protocol):
    """Where the memory's changes go to the other devices (device/messaging/stranger_sync.py). Called with
    the memory's lock held: only publish, never call the memory back."""

    def share(self, stranger: Stranger) -> None: ...

    def alias(self, loser: str, winner: str) -> None: ...

    def remove(self, stranger_ids: list[str]) -> None: ...


KEYS = ("ids", "totals", "counts", "first", "last")
ALIAS_KEYS = ("alias_from", "alias_to")  # optional: files written before sharing have none
# How often a stranger seen again is shared again, at most: its last_seen elsewhere lags by no more.
SHARE_INTERVAL_S = 3600.0


def read_strangers(path: Path) -> dict[str, Stranger]:
    """The clusters in a stranger memory file; DamagedFileError naming what is wrong, OSError if unreadable."""
    return read_memory(path)[0]


def read_memory(path: Path) -> tuple[dict[str, Stranger], dict[str, str]]:
    """The clusters and the aliases (id -> the id it is now) in a stranger memory file; DamagedFileError
    naming what is wrong, OSError if unreadable."""
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
                alias_from, alias_to = (data[k] if k in data.files else np.array([], str) for k in ALIAS_KEYS)
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
    if alias_from.ndim != 1 or alias_from.shape != alias_to.shape or (
            len(alias_from) and (alias_from.dtype.kind not in "US" or alias_to.dtype.kind not in "US")):
        raise DamagedFileError(f"alias arrays of the wrong shapes or types ({alias_from.shape}, {alias_to.shape})")
    clusters = {str(sid): Stranger(str(sid), np.asarray(total, np.float32), int(count), float(f), float(la))
                for sid, total, count, f, la in zip(ids, totals, counts, first, last, strict=True)}
    return clusters, {str(a): str(b) for a, b in zip(alias_from, alias_to, strict=True)}


class StrangerMemory:
    def __init__(self, path: Path | None, threshold: float, max_clusters: int = 200, retention: float = 30 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.threshold = float(threshold)
        self.max_clusters = int(max_clusters)
        self.retention = float(retention)
        self.clock = clock
        self.clusters: dict[str, Stranger] = {}
        # Ids merged into another stranger (device/messaging/stranger_sync.py): old id -> the id it is now.
        self.aliases: dict[str, str] = {}
        # Shared strangers' last_seen elsewhere lags by at most this: a tenth of the retention, at most an hour.
        self.share_interval = min(SHARE_INTERVAL_S, self.retention / 10)
        self.sharing: Sharing | None = None
        # The frame loop observes faces while the command runner's thread forgets strangers.
        self.lock = threading.RLock()
        self._failures = RateLimitedLog(log)
        if path is not None and (path.exists() or path.is_symlink()):
            self._load(path)
        self._prune()

    def _load(self, path: Path) -> None:
        lost = "the strangers it remembered are forgotten (their next visits get new stranger ids)"
        try:
            self.clusters, self.aliases = read_memory(path)
        except OSError as exc:
            if isinstance(exc, IsADirectoryError):
                set_aside(path, "a directory, not a file", lost)
            else:
                # Unreadable (rights, an I/O error) is not damage: leave the file for a person to fix.
                log.warning("cannot read the stranger memory %s (%s); the daemon goes on without it", path,
                            describe_error(exc))
            self.clusters, self.aliases = {}, {}
        except DamagedFileError as exc:
            set_aside(path, describe_error(exc), lost)
            self.clusters, self.aliases = {}, {}

    @locked
    def save(self) -> None:
        if self.path is None:
            return
        items = list(self.clusters.values())
        dim = len(items[0].total) if items else 0
        aliases = list(self.aliases.items())

        def write(fh: IO[bytes]) -> None:
            np.savez(fh, ids=np.array([s.stranger_id for s in items], dtype=str),
                     totals=np.array([s.total for s in items], np.float32).reshape(len(items), dim),
                     counts=np.array([s.count for s in items], np.int64),
                     first=np.array([s.first_seen for s in items], np.float64),
                     last=np.array([s.last_seen for s in items], np.float64),
                     alias_from=np.array([a for a, _ in aliases], dtype=str),
                     alias_to=np.array([b for _, b in aliases], dtype=str))

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
        expired = [s.stranger_id for s in self.clusters.values() if now - s.last_seen > self.retention]
        for sid in expired:
            del self.clusters[sid]
        # Capacity is this device's own limit, not the fleet's: an evicted stranger stays shared.
        while len(self.clusters) > self.max_clusters:
            oldest = min(self.clusters.values(), key=lambda s: s.last_seen)
            del self.clusters[oldest.stranger_id]
        gone = self._drop_aliases_of(set(expired))
        # Aliases of strangers no longer here and never coming back: bounded like the clusters.
        while len(self.aliases) > 4 * self.max_clusters:
            del self.aliases[next(iter(self.aliases))]
        if expired and self.sharing is not None:
            # Retention is the fleet's: every device expires the same strangers about the same time (their
            # last_seen is shared), and clearing the retained entry keeps a device started later from them.
            self.sharing.remove(expired + gone)

    def _drop_aliases_of(self, ids: set[str]) -> list[str]:
        gone = [a for a, b in self.aliases.items() if b in ids]
        for a in gone:
            del self.aliases[a]
        return gone

    def resolve(self, stranger_id: str) -> str:
        """The id `stranger_id` is known by now (itself, unless it was merged into another stranger)."""
        seen = {stranger_id}
        while stranger_id in self.aliases:
            stranger_id = self.aliases[stranger_id]
            if stranger_id in seen:  # a cycle (impossible under the rule, but entries come from outside)
                break
            seen.add(stranger_id)
        return stranger_id

    @locked
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

    @locked
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
        if self.sharing is not None and (cluster.shared_at is None or at - cluster.shared_at >= self.share_interval):
            cluster.shared_at = at
            self.sharing.share(cluster)
        self.save()
        return cluster, new

    @locked
    def adopt(self, shared: SharedStranger) -> str | None:
        """Take in a stranger (or an alias) another device shared; returns the id it is known by here now
        (None: not taken: expired, or made with embeddings of another size)."""
        before = self._fingerprint()
        if shared.alias_of is not None:
            known = self._adopt_alias(shared.stranger_id, shared.alias_of)
        else:
            known = self._adopt_stranger(shared)
        if self._fingerprint() != before:  # a start brings every retained entry, most of them known: no rewrite
            self.save()
        return known

    def _fingerprint(self) -> tuple[Any, ...]:
        return (tuple((s.stranger_id, s.count, s.first_seen, s.last_seen) for s in self.clusters.values()),
                tuple(self.aliases.items()))

    def _adopt_stranger(self, shared: SharedStranger) -> str | None:
        assert shared.centroid is not None
        centroid = l2_normalize(np.asarray(shared.centroid, np.float32).reshape(-1))
        if self.clusters and len(next(iter(self.clusters.values())).total) != len(centroid):
            return None  # not comparable with ours (the sync checks the embedder first: a damaged peer)
        sid = self.resolve(shared.stranger_id)
        here = self.clusters.get(sid)
        if here is not None:
            # Known here (our own echo, a later sighting elsewhere, or an alias of ours): the times follow the
            # fleet's; the embeddings follow whichever side has seen more of the stranger.
            here.first_seen = min(here.first_seen, shared.first_seen)
            here.last_seen = max(here.last_seen, shared.last_seen)
            here.shared_at = max(here.shared_at or shared.last_seen, shared.last_seen)
            if sid == shared.stranger_id and shared.count > here.count:
                here.total, here.count = centroid * shared.count, shared.count
            elif sid != shared.stranger_id and self.sharing is not None:
                # A device that has not heard of the merge shared the loser again, over its alias entry on the
                # broker: say it again, for that device and for those started later.
                self.sharing.alias(shared.stranger_id, sid)
            self._prune()
            return sid if sid in self.clusters else None
        if self.clock() - shared.last_seen > self.retention:
            # A retained entry nobody cleared (its devices were off when it expired): clear it now.
            if self.sharing is not None:
                self.sharing.remove([shared.stranger_id])
            return None
        # Under the id it is known by: an alias that came before the winner's own entry names the stranger
        # already (the winner's entry, when it comes, brings the earlier first_seen).
        incoming = Stranger(sid, centroid * shared.count, shared.count, shared.first_seen, shared.last_seen,
                            shared_at=shared.last_seen)
        best, sim = self.nearest(centroid)
        if best is not None and sim >= self.threshold:
            known = self._merge(best, incoming).stranger_id
        else:
            self.clusters[sid] = incoming
            known = sid
        self._prune()
        return known if known in self.clusters else None

    def _merge(self, a: Stranger, b: Stranger) -> Stranger:
        """The merge rule: the earlier first_seen keeps its id (then the smaller id); the other is its alias."""
        winner, loser = sorted((a, b), key=lambda s: (s.first_seen, s.stranger_id))
        merged = Stranger(winner.stranger_id, a.total + b.total, a.count + b.count, winner.first_seen,
                          max(a.last_seen, b.last_seen), shared_at=winner.shared_at)
        self.clusters.pop(loser.stranger_id, None)
        self.clusters[winner.stranger_id] = merged
        self._alias(loser.stranger_id, winner.stranger_id)
        log.info("strangers: %s is %s (merged by the earlier first_seen)", loser.stranger_id, winner.stranger_id)
        if self.sharing is not None:
            self.sharing.alias(loser.stranger_id, winner.stranger_id)
        return merged

    def _alias(self, loser: str, winner: str) -> None:
        self.aliases.pop(loser, None)
        self.aliases[loser] = winner  # last in the dict: the newest, kept longest under the bound
        for a, b in self.aliases.items():
            if b == loser:
                self.aliases[a] = winner

    def _adopt_alias(self, loser: str, winner: str) -> str | None:
        winner = self.resolve(winner)
        if winner == loser:
            return None  # a cycle: impossible under the rule, but entries come from outside
        if loser not in self.clusters and self.resolve(loser) == winner:
            return winner  # known already (our own merge, its echo, or a restart's retained entries)
        self._alias(loser, winner)
        mine = self.clusters.pop(loser, None)
        if mine is not None:
            there = self.clusters.get(winner)
            if there is None:
                # The winner's entry has not come yet: the stranger goes on under its id (the entry, when it
                # comes, brings the earlier first_seen).
                mine.stranger_id = winner
                self.clusters[winner] = mine
            else:
                there.total = there.total + mine.total
                there.count += mine.count
                there.first_seen = min(there.first_seen, mine.first_seen)
                there.last_seen = max(there.last_seen, mine.last_seen)
        self._prune()
        return winner

    @locked
    def drop(self, stranger_id: str) -> bool:
        """Another device cleared this stranger's entry (forgotten or expired there): forget it here too,
        without clearing anything (already cleared). True if something was forgotten."""
        if stranger_id in self.aliases:
            del self.aliases[stranger_id]
            self.save()
            return True
        if self.clusters.pop(stranger_id, None) is None:
            return False
        self._drop_aliases_of({stranger_id})
        self.save()
        return True

    @locked
    def forget(self, stranger_id: str | None = None) -> int:
        """Forget one stranger (or all); returns how many were forgotten. Shared: forgotten on every device."""
        if stranger_id is None:
            n = len(self.clusters)
            removed = [*self.clusters, *self.aliases]
            self.clusters, self.aliases = {}, {}
        else:
            # An id from an older event may have been merged since: the stranger is the one it became.
            sid = self.resolve(stranger_id)
            n = int(self.clusters.pop(sid, None) is not None)
            removed = [sid, *self._drop_aliases_of({sid})] if n else []
        if removed and self.sharing is not None:
            self.sharing.remove(removed)
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
