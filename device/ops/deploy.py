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

To many Pis at once (--host repeated, or --hosts-file with one USER@HOST per line): the bundle is checked
here once, then each host gets the two steps above, at most --parallel hosts at a time
(faceberry.device.ops.fleet.on_hosts); one line per host as it finishes (its last word: `deployed …`, or
why not), then a summary; exit non-zero if any host failed. Each host is all or nothing: `current` switches
only after the whole bundle is on that host and verified there, so a host that fails keeps serving what
it served (a partial copy stays in `.incoming-*`, never a version, and is removed by a later prune). The
other hosts go on; deploy again with a hosts file naming the failed ones.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from faceberry.bundle import BundleError, load_bundle
from faceberry.device.ops.fleet import HostResult, on_hosts, read_hosts
from faceberry.device.ops.reloader import add_store_arguments, read_setup, reload_and_report, store_root
from faceberry.device.ops.store import DEFAULT_ROOT, INCOMING_PREFIX, KEEP, BundleStore, StoreError
from faceberry.errors import FaceberryError, UnavailableError, exit_code_for
from faceberry.runtime import ModelError

HELP = "install a bundle as a new version of the Pi's store, switch to it and reload the daemon (or --host)"
REMOTE_COMMAND = "/opt/faceberry/venv/bin/faceberry"
PARALLEL = 8  # hosts at once: each is an rsync and an ssh, mostly waiting on the network and the Pi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle directory (from `python -m convert`)")
    add_host_arguments(parser, "copy the bundle there with rsync over ssh and deploy it there")
    add_store_arguments(parser)
    parser.add_argument("--keep", type=int, default=KEEP,
                        help=f"versions kept besides current and previous; older ones are removed (default {KEEP})")
    parser.add_argument("--ssh", default="ssh",
                        help="the ssh command for --host, with its options (default: ssh), e.g. 'ssh -p 2222'")
    parser.add_argument("--remote-command", default=REMOTE_COMMAND,
                        help=f"faceberry on the host (default: {REMOTE_COMMAND}, where install.sh puts it)")
    parser.add_argument("--remote-sudo", default="sudo -n",
                        help="prefix for the host's rsync and faceberry (default: 'sudo -n'; '' when USER is root)")


def add_host_arguments(parser: argparse.ArgumentParser, does: str) -> None:
    """--host (repeatable), --hosts-file and --parallel: shared with rollback."""
    parser.add_argument("--host", action="append", default=None, metavar="USER@HOST",
                        help=f"a Pi: {does} (default: this machine's store); repeat for several Pis")
    parser.add_argument("--hosts-file", default=None,
                        help="a file with one USER@HOST per line (# comments allowed), added to --host")
    parser.add_argument("--parallel", type=int, default=PARALLEL,
                        help=f"hosts worked on at once (default {PARALLEL})")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: give at least 1")
    args.hosts = read_hosts(args.host, args.hosts_file)
    if args.hosts_file and not args.hosts:
        parser.error(f"--hosts-file {args.hosts_file} names no host; put one USER@HOST per line")


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


def remote_prefix(args: argparse.Namespace) -> tuple[list[str], list[str], Path]:
    """(the ssh command, the host's sudo prefix, the store on the host)."""
    return shlex.split(args.ssh), shlex.split(args.remote_sudo), Path(args.store) if args.store else DEFAULT_ROOT


def deploy_to(host: str, args: argparse.Namespace, bundle_id: str, *, capture: bool = False) -> HostResult:
    """rsync the bundle to `host`'s store and deploy it there. capture: the tools' output is kept (the last
    line is the result's message) instead of going to this terminal, where several hosts would interleave."""
    ssh, sudo, root = remote_prefix(args)
    incoming = f"{root}/{INCOMING_PREFIX}deploy-{os.getpid()}"
    rsync = ["rsync", "-rtL", "--delete", "--chmod=D0750,F0640", "-e", shlex.join(ssh)]
    if sudo:
        rsync.append(f"--rsync-path={shlex.join([*sudo, 'rsync'])}")
    rsync += [f"{args.bundle}/", f"{host}:{incoming}/"]
    out = subprocess.PIPE if capture else None
    if not capture:
        print(f"copying {bundle_id} to {host}:{incoming}")
    try:
        copied = subprocess.run(rsync, check=False, stdout=out, stderr=subprocess.STDOUT if capture else None,
                                text=True)
    except FileNotFoundError:
        raise StoreError("rsync is not installed here; install it (`sudo apt install rsync`) on this machine and "
                         "the Pi") from None
    if copied.returncode != 0:
        why = _last_line(copied.stdout) if capture else ""
        raise UnavailableError(f"rsync to {host} failed (exit {copied.returncode}{': ' + why if why else ''}); check "
                               f"that ssh {host} works, that {root} exists there (install.sh creates it) and that "
                               f"{args.remote_sudo or 'the user'} may run rsync there")
    remote = [*sudo, *shlex.split(args.remote_command), "deploy", "--bundle", incoming, "--store", str(root),
              "--keep", str(args.keep), "--timeout", str(args.timeout)]
    if args.no_reload:
        remote.append("--no-reload")
    # ssh hands the host's shell one string: each word quoted for it.
    done = subprocess.run([*ssh, host, shlex.join(remote)], check=False, stdout=out,
                          stderr=subprocess.STDOUT if capture else None, text=True)
    return HostResult(host, done.returncode, summary_line(done.stdout) if capture else "")


def _last_line(text: str | None) -> str:
    """rsync's reason: ssh's own line when there is one (rsync's last line only says the connection closed)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    ssh = [line for line in lines if line.startswith("ssh:")]
    return ssh[0] if ssh else lines[-1] if lines else ""


def summary_line(text: str | None) -> str:
    """A host's result in one line: its `deployed …`/`rolled back …` line, its reload line, or its error."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    said = [line for line in lines if line.startswith(("deployed ", "rolled back ", "reload:", "current is "))]
    return "; ".join(said) if said else (lines[-1] if lines else "(no output)")


def on_each_host(args: argparse.Namespace, what: str, one: Callable[[str], HostResult]) -> int:
    """`one` on every host of args.hosts: a failure is that host's line, not the end of the others."""
    def guarded(host: str) -> HostResult:
        try:
            return one(host)
        except FaceberryError as exc:
            return HostResult(host, exit_code_for(exc), str(exc))

    return on_hosts(args.hosts, guarded, workers=args.parallel, what=what)


def deploy_remote(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)  # refused here, before anything is copied to any host
    if len(args.hosts) == 1:
        return deploy_to(args.hosts[0], args, bundle.bundle_id).code
    print(f"deploying {bundle.bundle_id} to {len(args.hosts)} hosts, {min(args.parallel, len(args.hosts))} at a time")
    return on_each_host(args, f"deploy {bundle.bundle_id}",
                        lambda host: deploy_to(host, args, bundle.bundle_id, capture=True))


def run(args: argparse.Namespace) -> int:
    # A StoreError or BundleError (bad input, exit 2) is printed by faceberry.device.cli.
    if not hasattr(args, "hosts"):  # called without validate() (a script)
        args.hosts = read_hosts(args.host, args.hosts_file)
    return deploy_remote(args) if args.hosts else deploy_local(args)
