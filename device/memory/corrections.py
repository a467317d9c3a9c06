"""Corrections ("wrong, that was not X"): hard negatives per person, kept in state_dir, undoable.

`<state_dir>/negatives-<device_id>.json` holds one record per correction: the person it was not, the
embeddings of that face, the event it came from and when. faceberry.contract.accept_with_negatives is the
rule that uses them. Records are never pruned by age: a correction is a decision the user made.

A damaged file (not JSON, wrong types, embeddings of mixed sizes, NaN or infinite values: a NaN negative
would turn every face of its person `unknown`) is moved aside with one line (faceberry/statefile.py); the
records that are whole are kept and written back. Non-finite embeddings are never written.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from faceberry.classifier import Prediction
from faceberry.contract import UNKNOWN, accept_with_negatives
from faceberry.statefile import DamagedFileError, RateLimitedLog, describe_error, set_aside, write_atomic

log = logging.getLogger(__name__)

F32_MAX = float(np.finfo(np.float32).max)


def _valid_record(rec: Any, dim: int | None) -> bool:
    if not isinstance(rec, dict) or not isinstance(rec.get("label"), str) or not rec["label"]:
        return False
    if not isinstance(rec.get("id"), str) or not isinstance(rec.get("embeddings"), list) or not rec["embeddings"]:
        return False
    for row in rec["embeddings"]:
        if not isinstance(row, list) or not row or (dim is not None and len(row) != dim):
            return False
        # Finite as float32, the type they are used in (1e308 is finite only as a float64).
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= F32_MAX
                   for v in row):
            return False
    return True


def read_corrections(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the whole records, how many were damaged) of a corrections file; DamagedFileError if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedFileError(f"not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise DamagedFileError(f"not JSON: {exc.msg} at line {exc.lineno}") from exc
    except RecursionError as exc:
        raise DamagedFileError("JSON nested too deeply") from exc
    if not isinstance(data, dict) or not isinstance(data.get("corrections"), list):
        raise DamagedFileError('not a corrections file: no "corrections" list')
    records = data["corrections"]
    dims: dict[str, int] = {}  # per person: the size of the first whole record (they are stacked)
    good = []
    for rec in records:
        if _valid_record(rec, None) and _valid_record(rec, dims.setdefault(rec["label"], len(rec["embeddings"][0]))):
            good.append(rec)
    return good, len(records) - len(good)


class Negatives:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._failures = RateLimitedLog(log)
        # Two writers: the command runner's thread and the shared library's (device/messaging/library.py).
        self._lock = threading.RLock()
        if path is not None and (path.exists() or path.is_symlink()):
            self._load(path)
        self._index()

    def _load(self, path: Path) -> None:
        lost = "all its corrections (\"wrong, not X\" from the dashboard) are lost; say them again"
        try:
            if path.is_dir():
                raise DamagedFileError("a directory, not a file")
            records, damaged = read_corrections(path)
        except (OSError, DamagedFileError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, (IsADirectoryError, FileNotFoundError)):
                # Unreadable (rights, an I/O error) is not damage: leave the file for a person to fix.
                log.warning("cannot read the corrections %s (%s); the daemon goes on without them", path,
                            describe_error(exc))
                return
            set_aside(path, describe_error(exc), lost)
            return
        self.records = records
        if damaged:
            reason = (f"{damaged} of {damaged + len(records)} corrections damaged (wrong types, embeddings of another "
                      "size, NaN or infinite values)")
            if not records:
                set_aside(path, reason, lost)
                return
            set_aside(path, reason, f"those {damaged} are dropped, the other {len(records)} are kept and written back")
            self._save()

    def _index(self) -> None:
        by: dict[str, list[np.ndarray]] = {}
        for rec in self.records:
            by.setdefault(rec["label"], []).extend(np.asarray(e, np.float32) for e in rec["embeddings"])
        self._by_label = {label: np.stack(rows) for label, rows in by.items() if rows}

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps({"corrections": self.records}) + "\n")
        except OSError as exc:
            self._failures.fail("save", f"cannot save the corrections in {self.path}: {describe_error(exc)}; they "
                                "hold until the daemon stops; check the free space in state_dir")
        else:
            self._failures.ok("save", f"the corrections in {self.path} are saved again")

    def add(self, label: str, embeddings: np.ndarray, event_id: str | None = None, library: str | None = None) -> str:
        """Store that these embeddings are not `label`; returns the correction's id. `library`: the shared library
        entry it came from or went out as (an undo anywhere then removes it everywhere).

        Rows with NaN or infinite values are left out; ValueError when none is left (nothing to store).
        """
        with self._lock:
            return self._add(label, embeddings, event_id, library)

    def _add(self, label: str, embeddings: np.ndarray, event_id: str | None, library: str | None) -> str:
        rows = np.atleast_2d(np.asarray(embeddings, np.float32))
        rows = rows[np.all(np.isfinite(rows), axis=1)]
        if not len(rows):
            raise ValueError("the stored embeddings of that face are not finite (NaN or infinite): nothing to "
                             "correct; wait for the face to be seen again")
        current = self._by_label.get(label)
        if current is not None and current.shape[1] != rows.shape[1]:
            raise ValueError(f"that face's embeddings have {rows.shape[1]} values, the stored corrections of "
                             f"{label} {current.shape[1]} (another bundle): undo the old corrections first")
        rec = {"id": uuid.uuid4().hex[:12], "label": label, "event_id": event_id, "at": time.time(),
               "embeddings": [[round(float(v), 6) for v in row] for row in rows]}
        if library is not None:
            rec["library"] = library
        self.records.append(rec)
        self._index()
        self._save()
        return rec["id"]

    def tag(self, correction_id: str, library: str) -> None:
        """Record the shared library entry a correction made here went out as."""
        with self._lock:
            for rec in self.records:
                if rec["id"] == correction_id:
                    rec["library"] = library
                    self._save()

    def undo(self) -> dict[str, Any] | None:
        """Remove the latest correction; returns it (None when there is none)."""
        with self._lock:
            if not self.records:
                return None
            rec = self.records.pop()
            self._index()
            self._save()
            return rec

    def remove_library(self, library: str) -> int:
        """Remove the corrections that came from (or went out as) the library entry `library`; how many."""
        with self._lock:
            kept = [rec for rec in self.records if rec.get("library") != library]
            removed = len(self.records) - len(kept)
            if removed:
                self.records = kept
                self._index()
                self._save()
            return removed

    def clear(self) -> int:
        with self._lock:
            n = len(self.records)
            self.records = []
            self._index()
            self._save()
            return n

    def for_label(self, label: str) -> np.ndarray | None:
        # The frame loop reads while the command runner's and the library's threads (the writers, one at a
        # time under the lock) add and undo: _index swaps in a whole new dict, so a reader sees the old
        # corrections or the new, never half.
        return self._by_label.get(label)

    def __len__(self) -> int:
        return len(self.records)


class CorrectionFilter:
    """Applies the stored corrections to a recognition in the frame loop, before the tracker votes
    (faceberry.contract.accept_with_negatives): a face a user said was not X is `unknown` from then on."""

    def __init__(self, negatives: Negatives, margin: float) -> None:
        self.negatives = negatives
        self.margin = margin

    def apply(self, pred: Prediction, vector: np.ndarray | None, threshold: float) -> Prediction:
        if pred.label == UNKNOWN:
            return pred
        label = accept_with_negatives(pred.label, pred.score, threshold, vector,
                                      self.negatives.for_label(pred.label), self.margin)
        return pred if label == pred.label else Prediction(UNKNOWN, pred.score, pred.best)
