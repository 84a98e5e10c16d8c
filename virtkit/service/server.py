"""virtkitd, the process: arguments, the :class:`~virtkit.service.daemon.Service`, and the API
served on its socket (:func:`virtkit.service.api.serve`) until SIGTERM.

This module sits above both the service and its API, so neither imports the other's caller:
``virtkitd`` (the console script), ``python -m virtkit.service`` and the compatibility spelling
``python -m virtkit.service.daemon`` all end up in :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys

from virtkit.errors import VirtkitError
from virtkit.service.api import serve
from virtkit.service.daemon import API_SOCKET, BACKOFF_BASE, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, Service
from virtkit.units import parse_size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtkitd",
        description="virtkit's hypervisor service: a REST API on a "
        "Unix socket; each VM in its own confined VMM process.",
    )
    p.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help=f"database and VM files (default {DEFAULT_STATE_DIR})"
    )
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"sockets (default {DEFAULT_RUN_DIR})")
    p.add_argument("--socket", default=None, help="API socket (default RUN_DIR/api.sock)")
    p.add_argument("--overcommit", type=float, default=4.0, help="vCPUs per host core (default 4)")
    p.add_argument("--reserve-memory", default=None, help="memory kept for the host (default max(1G, 5%%))")
    p.add_argument("--cgroup-parent", default="virtkitd", help="parent cgroup of the VMs (default virtkitd)")
    p.add_argument("--backoff", type=float, default=BACKOFF_BASE, help="first restart delay in seconds")
    p.add_argument("--vmm-module", default="virtkit.service.vmm", help=argparse.SUPPRESS)  # tests: a hostile VMM
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.overcommit <= 0:
        print("virtkitd: error: --overcommit must be positive", file=sys.stderr)
        return 2
    try:
        reserve = parse_size(args.reserve_memory, what="--reserve-memory") if args.reserve_memory else None
        service = Service(
            args.state_dir,
            args.run_dir,
            overcommit=args.overcommit,
            reserve=reserve,
            cgroup_parent=args.cgroup_parent,
            backoff_base=args.backoff,
            vmm_module=args.vmm_module,
        )
    except (VirtkitError, OSError) as e:
        print(f"virtkitd: error: {e}", file=sys.stderr)
        return 2
    path = args.socket or os.path.join(service.run_dir, API_SOCKET)
    return serve(service, path)


def run() -> None:
    """The ``virtkitd`` entry point: :func:`main`, then exit at once (the monitor and API threads
    are daemons; interpreter teardown would only wait on them)."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
