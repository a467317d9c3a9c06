"""Corrections ("wrong, that was not X"): hard negatives per person, kept in state_dir, undoable.

`<state_dir>/negatives-<device_id>.json` holds one record per correction: the person it was not, the
embeddings of that face, the event it came from and when. device.contract.accept_with_negatives is the
rule that uses them. Records are never pruned by age: a correction is a decision the user made.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Negatives:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path is not None and path.is_file():
            try:
                self.records = list(json.loads(path.read_text(encoding="utf-8"))["corrections"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring the unreadable corrections file %s: %s", path, exc)
        self._index()

    def _index(self) -> None:
        by: dict[str, list[np.ndarray]] = {}
        for rec in self.records:
            by.setdefault(rec["label"], []).extend(np.asarray(e, np.float32) for e in rec["embeddings"])
        self._by_label = {label: np.stack(rows) for label, rows in by.items() if rows}

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps({"corrections": self.records}) + "\n", encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot save the corrections in %s: %s; they hold until the daemon stops", self.path, exc)

    def add(self, label: str, embeddings: np.ndarray, event_id: str | None = None) -> str:
        """Store that these embeddings are not `label`; returns the correction's id."""
        rows = np.atleast_2d(np.asarray(embeddings, np.float32))
        rec = {"id": uuid.uuid4().hex[:12], "label": label, "event_id": event_id, "at": time.time(),
               "embeddings": [[round(float(v), 6) for v in row] for row in rows]}
        self.records.append(rec)
        self._index()
        self._save()
        return rec["id"]

    def undo(self) -> dict[str, Any] | None:
        """Remove the latest correction; returns it (None when there is none)."""
        if not self.records:
            return None
        rec = self.records.pop()
        self._index()
        self._save()
        return rec

    def clear(self) -> int:
        n = len(self.records)
        self.records = []
        self._index()
        self._save()
        return n

    def for_label(self, label: str) -> np.ndarray | None:
        return self._by_label.get(label)

    def __len__(self) -> int:
        return len(self.records)
