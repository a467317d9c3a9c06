"""The workstation's progress bars: one look for every long step of train, cohort and convert."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(total: int | float | None, desc: str, unit: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr: on a terminal a live bar; in a log (not a terminal) one line every 30 s and the
    last state when it closes, so a long run shows it is alive without filling the log. `enabled=False` (the
    command's quiet) prints nothing; `total=None` counts without a percentage."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                mininterval=0.1 if tty else 30.0, ascii=not tty, **kwargs)
