"""`faceberry deploy`: add a bundle to the Pi's versions store, switch `current` to it, and reload the daemon.

On the Pi (no --host): the bundle is copied in as a version (faceberry.device.ops.store: verified, owned so the
service can read it), `current` switches, the running daemon reloads and the status file confirms
it. Should the daemon refuse the new version, `current` goes back to what it serves, so a restart
does not pick up a version that was refused.

From the laptop (--host USER@HOST): the bundle is checked here, rsynced over ssh into the store's
`<store>/.incoming-deploy-<pid>/` on the host, then `faceberry deploy` runs there on that directory:

    rsync -rtL --delete --chmod=D0750,F0640 --rsync-path='sudo -n rsync' -e ssh DIR/ HOST:STORE/.incoming-…/
    ssh HOST sudo -n /opt/faceberry/venv/bin/faceberry deploy --bundle STORE/.incoming-… --store STORE

Before `current` switches, the bundle's checksums are verified and its models loaded and run once, as
the daemon will. The store belongs to the service user, so both steps run under sudo on the host (`-n`: a password
prompt cannot be answered through rsync; allow them without a password for the deploying user, or
log in as root and pass --remote-sudo ''). Old versions beyond --keep are pruned.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from faceberry.bundle import BundleError, load_bundle
from faceberry.device.ops.reloader import add_store_arguments, read_setup, reload_and_report, store_root
from faceberry.device.ops.store import DEFAULT_ROOT, INCOMING_PREFIX, KEEP, BundleStore, StoreError
from faceberry.errors import UnavailableError
from faceberry.runtime import ModelError

HELP = "install a bundle as a new version of the Pi's store, switch to it and reload the daemon (or --host)"
REMOTE_COMMAND = "/opt/faceberry/venv/bin/faceberry"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle directory (from `python -m convert`)")
    parser.add_argument("--host", default=None,
                        help="USER@HOST of the Pi: copy the bundle there with rsync over ssh and deploy it there "
                        "(default: this machine's store)")
    add_store_arguments(parser)
    parser.add_argument("--keep", type=int, default=KEEP,
                        help=f"versions kept besides current and previous; older ones are removed (default {KEEP})")
    parser.add_argument("--ssh", default="ssh",
                        help="the ssh command for --host, with its options (default: ssh), e.g. 'ssh -p 2222'")
    parser.add_argument("--remote-command", default=REMOTE_COMMAND,
                        help=f"faceberry on the host (default: {REMOTE_COMMAND}, where install.sh puts it)")
    parser.add_argument("--remote-sudo", default="sudo -n",
                        help="prefix for the host's rsync and faceberry (default: 'sudo -n'; '' when USER is root)")


def check_models(bundle_dir: Path) -> None:
    """Load the bundle's models and run them on one blank frame, as the daemon will; raises ModelError."""
    import numpy as np

    from faceberry.device.recognition.pipeline import FacePipeline

    FacePipeline(load_bundle(bundle_dir)).process(np.zeros((240, 320, 3), np.uint8))


def deploy_local(args: argparse.Namespace) -> int:
    setup = read_setup(args.config)
    root = store_root(args.store, setup)
    store = BundleStore(root, create=True)
    try:
        check_models(args.bundle)  # before `current` could name a version the daemon cannot run
    except (BundleError, ModelError) as exc:
        if store.is_staged(args.bundle):
            shutil.rmtree(args.bundle, ignore_errors=True)
        raise StoreError(f"refused: {exc}") from None
    path = store.add(args.bundle)
    bundle_id = path.name
    old = store.switch(bundle_id)
    if old == bundle_id:
        print(f"deployed {bundle_id} to {root} (it was current already)")
    else:
        print(f"deployed {bundle_id} to {root} (current was {old or 'empty'})")
    removed = store.prune(args.keep)
    if removed:
        print(f"removed old versions: {', '.join(removed)}")
    reports = reload_and_report(args, setup, root, bundle_id)
    if any(r.state == "refused" for r in reports) and old not in (None, bundle_id):
        store.switch(old)
        print(f"current is {old} again: the daemon refused {bundle_id} and keeps serving {old}; fix the bundle "
              "and deploy again", file=sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


def deploy_remote(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)  # refused here, before anything is copied
    root = Path(args.store) if args.store else DEFAULT_ROOT
    incoming = f"{root}/{INCOMING_PREFIX}deploy-{os.getpid()}"
    ssh = shlex.split(args.ssh)
    sudo = shlex.split(args.remote_sudo)
    rsync = ["rsync", "-rtL", "--delete", "--chmod=D0750,F0640", "-e", shlex.join(ssh)]
    if sudo:
        rsync.append(f"--rsync-path={shlex.join([*sudo, 'rsync'])}")
    rsync += [f"{args.bundle}/", f"{args.host}:{incoming}/"]
    print(f"copying {bundle.bundle_id} to {args.host}:{incoming}")
    try:
        copied = subprocess.run(rsync, check=False)
    except FileNotFoundError:
        raise StoreError("rsync is not installed here; install it (`sudo apt install rsync`) on this machine and "
                         "the Pi") from None
    if copied.returncode != 0:
        raise UnavailableError(f"rsync to {args.host} failed (exit {copied.returncode}); check that ssh {args.host} "
                               f"works, that {root} exists there (install.sh creates it) and that "
                               f"{args.remote_sudo or 'the user'} may run rsync there")
    remote = [*sudo, *shlex.split(args.remote_command), "deploy", "--bundle", incoming, "--store", str(root),
              "--keep", str(args.keep), "--timeout", str(args.timeout)]
    if args.no_reload:
        remote.append("--no-reload")
    # ssh hands the host's shell one string: each word quoted for it.
    done = subprocess.run([*ssh, args.host, shlex.join(remote)], check=False)
    return done.returncode


def run(args: argparse.Namespace) -> int:
    # A StoreError or BundleError (bad input, exit 2) is printed by faceberry.device.cli.
    return deploy_remote(args) if args.host else deploy_local(args)
