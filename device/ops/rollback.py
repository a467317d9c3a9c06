"""`faceberry rollback`: point the Pi's `current` back at the version before it, and reload the daemon.

The store keeps the last switch in its `previous` link (faceberry.device.ops.store), so a second rollback returns
to the version the first one left.

From the laptop (--host USER@HOST, repeated, or --hosts-file): `faceberry rollback` runs on each host over ssh
(`ssh HOST sudo -n /opt/faceberry/venv/bin/faceberry rollback --store STORE`), at most --parallel at a time,
one line per host and a summary, exit non-zero if any host failed; a host that fails is left as it was (the
switch of `current` is one rename).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess

from faceberry.device.ops import deploy
from faceberry.device.ops.fleet import HostResult, read_hosts
from faceberry.device.ops.reloader import add_store_arguments, read_setup, reload_and_report, store_root
from faceberry.device.ops.store import BundleStore

HELP = "switch the Pi's bundle back to the version that was current before, and reload the daemon"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    deploy.add_host_arguments(parser, "roll it back over ssh")
    parser.add_argument("--ssh", default="ssh",
                        help="the ssh command for --host, with its options (default: ssh), e.g. 'ssh -p 2222'")
    parser.add_argument("--remote-command", default=deploy.REMOTE_COMMAND,
                        help=f"faceberry on the host (default: {deploy.REMOTE_COMMAND}, where install.sh puts it)")
    parser.add_argument("--remote-sudo", default="sudo -n",
                        help="prefix for the host's faceberry (default: 'sudo -n'; '' when USER is root)")


validate = deploy.validate


def rollback_on(host: str, args: argparse.Namespace, *, capture: bool = False) -> HostResult:
    ssh, sudo, root = deploy.remote_prefix(args)
    remote = [*sudo, *shlex.split(args.remote_command), "rollback", "--store", str(root),
              "--timeout", str(args.timeout)]
    if args.no_reload:
        remote.append("--no-reload")
    out = subprocess.PIPE if capture else None
    done = subprocess.run([*ssh, host, shlex.join(remote)], check=False, stdout=out,
                          stderr=subprocess.STDOUT if capture else None, text=True)
    return HostResult(host, done.returncode, deploy.summary_line(done.stdout) if capture else "")


def rollback_here(args: argparse.Namespace) -> int:
    setup = read_setup(args.config)
    root = store_root(args.store, setup)
    store = BundleStore(root)  # a StoreError (nothing to go back to) is printed by faceberry.device.cli, exit 2
    was = store.current()
    now = store.rollback()
    print(f"rolled back {root}: current is {now} (was {was}; `faceberry rollback` again returns to it)")
    reports = reload_and_report(args, setup, root, now)
    return 0 if all(r.ok for r in reports) else 1


def run(args: argparse.Namespace) -> int:
    if not hasattr(args, "hosts"):  # called without validate() (a script)
        args.hosts = read_hosts(args.host, args.hosts_file)
    if not args.hosts:
        return rollback_here(args)
    if len(args.hosts) == 1:
        return rollback_on(args.hosts[0], args).code
    print(f"rolling back {len(args.hosts)} hosts, {min(args.parallel, len(args.hosts))} at a time")
    return deploy.on_each_host(args, "rollback", lambda host: rollback_on(host, args, capture=True))
