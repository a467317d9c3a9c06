"""`faceberry rollback`: point the Pi's `current` back at the version before it, and reload the daemon.

The store keeps the last switch in its `previous` link (faceberry.device.ops.store), so a second rollback returns
to the version the first one left.
"""

from __future__ import annotations

import argparse

from faceberry.device.ops.reloader import add_store_arguments, read_setup, reload_and_report, store_root
from faceberry.device.ops.store import BundleStore

HELP = "switch the Pi's bundle back to the version that was current before, and reload the daemon"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup = read_setup(args.config)
    root = store_root(args.store, setup)
    store = BundleStore(root)  # a StoreError (nothing to go back to) is printed by faceberry.device.cli, exit 2
    was = store.current()
    now = store.rollback()
    print(f"rolled back {root}: current is {now} (was {was}; `faceberry rollback` again returns to it)")
    reports = reload_and_report(args, setup, root, now)
    return 0 if all(r.ok for r in reports) else 1
