"""What the outbox's damage check at open costs on a Pi-sized outbox (issue 21), and what a salvage costs.

Builds a full outbox at the default bounds (10,000 messages, 50 MB: 5,000-byte payloads, snapshot-sized),
then times, each `--repeat` times: opening it without the check, with `PRAGMA quick_check` (what the daemon
runs), with `PRAGMA integrity_check` (for comparison: it also checks every index entry), and opening a copy
with one page in the middle damaged (the check fails, the readable rows are salvaged into a fresh file and
the damaged one is set aside). With the page cache warm (just written) and, when this user may drop the
kernel's caches (root, not in every container), cold: a Pi that boots reads the file from the SD card.

    python -m bench.outbox_check [--rows 10000] [--payload 5000] [--repeat 5]

Prints a table; writes bench/results/outbox_check.json (or --out).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import describe, machine, stats, table, write_result
from faceberry.device.messaging.outbox import Outbox


def build(path: Path, rows: int, payload: int) -> None:
    box = Outbox(path, max_messages=rows, max_bytes=rows * payload)
    try:
        filler = os.urandom(payload)  # incompressible, like JPEG snapshots
        for i in range(rows):
            box.put("faceberry/bench/events", i.to_bytes(4, "big") + filler[4:])
    finally:
        box.close()


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_open(path: Path, check: bool, pragma: str | None = None) -> float:
    t0 = time.perf_counter()
    if pragma is None:
        box = Outbox(path, check=check)
        box.close()
    else:
        db = sqlite3.connect(str(path))
        assert db.execute(f"PRAGMA {pragma}").fetchone()[0] == "ok"
        db.close()
    return (time.perf_counter() - t0) * 1e3


def damaged_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    page = size // 2 // 4096 * 4096
    with open(dst, "r+b") as fh:
        fh.seek(page)
        fh.write(b"\xa5" * 4096)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--payload", type=int, default=5_000, help="bytes per message")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the salvage's WARNING line is expected here

    info = machine()
    print(f"machine: {describe(info)}")
    results: dict[str, Any] = {"machine": info, "rows": args.rows, "payload_bytes": args.payload,
                               "repeat": args.repeat, "sqlite": sqlite3.sqlite_version, "timings_ms": {}}
    with tempfile.TemporaryDirectory(prefix="outbox-check-", dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "outbox.sqlite3"
        t0 = time.perf_counter()
        build(path, args.rows, args.payload)
        results["build_s"] = round(time.perf_counter() - t0, 2)
        results["file_mb"] = round(path.stat().st_size / 1e6, 1)
        print(f"outbox: {args.rows} rows x {args.payload} bytes, file {results['file_mb']} MB "
              f"(built in {results['build_s']} s)")
        can_drop = drop_caches()
        results["cold_cache_measured"] = can_drop
        cases = [("open, no check", dict(check=False)), ("open + quick_check (the daemon)", dict(check=True)),
                 ("integrity_check alone", dict(check=False, pragma="integrity_check"))]
        rows = []
        for name, kw in cases:
            for cache in ("warm", "cold") if can_drop else ("warm",):
                values = []
                for _ in range(args.repeat):
                    if cache == "cold":
                        drop_caches()
                    else:
                        timed_open(path, check=True)  # read once: the pages are in the page cache
                    values.append(timed_open(path, **kw))
                s = stats(values)
                results["timings_ms"][f"{name} ({cache})"] = s
                rows.append([name, cache, f"{s['median']:.0f}", f"{s['p95']:.0f}"])
        salvage = []
        kept = lost = 0
        for i in range(args.repeat):
            copy = Path(tmp) / f"damaged-{i}.sqlite3"
            damaged_copy(path, copy)
            t0 = time.perf_counter()
            box = Outbox(copy, max_messages=args.rows, max_bytes=args.rows * args.payload)
            salvage.append((time.perf_counter() - t0) * 1e3)
            kept, lost = box.salvaged, box.unreadable
            box.close()
            for aside in Path(tmp).glob(f"damaged-{i}.sqlite3*"):
                aside.unlink()
        s = stats(salvage)
        results["timings_ms"]["open a damaged copy: check, salvage, set aside (warm)"] = s
        results["salvage"] = {"kept": kept, "unreadable": lost}
        rows.append(["damaged page: check + salvage + set aside", "warm", f"{s['median']:.0f}", f"{s['p95']:.0f}"])
    print(table(["opening the outbox", "page cache", "median ms", "p95 ms"], rows))
    print(f"salvage of one damaged 4 KiB page: {kept} messages kept, {lost} lost")
    if not can_drop:
        print("(cold cache not measured: this user cannot write /proc/sys/vm/drop_caches)")
    out = write_result("outbox_check", results, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
