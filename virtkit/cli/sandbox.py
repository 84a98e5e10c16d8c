"""``virtkit sandbox``: run a Linux program in a VM with no guest kernel, its system calls
served by virtkit (docs/SANDBOX.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sandbox",
        help="run a Linux program in a kernel-less VM, its system calls served by virtkit",
        usage="virtkit sandbox [--root DIR] [--read-only] [--trace] [--stats] [-m SIZE] -- PROGRAM [ARG...]",
        description=(
            "Run PROGRAM (a path inside the root: static, static-PIE or dynamic x86-64 ELF, or a #! "
            "script) at CPL3 in a VM that has no kernel: each system call exits to virtkit, which "
            "serves it against the root directory. The exit status is the program's (128+N when "
            "signal N ended it). The root defaults to / read-only."
        ),
    )
    p.add_argument(
        "--root", dest="sandbox_root", default=None, metavar="DIR", help="the program's / (default: /, read-only)"
    )
    p.add_argument("--read-only", action="store_true", help="refuse every change to the root (EROFS)")
    p.add_argument("--trace", action="store_true", help="print each system call and its result (stderr)")
    p.add_argument("--stats", action="store_true", help="print system calls by count and time spent serving them")
    p.add_argument("--memory", "-m", default="1G", help="guest memory for all of the sandbox's processes (default 1G)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment entry (repeatable)")
    # measurement aid: the register stub (GET/SET_REGS per call) instead of the fast stub on PVM
    p.add_argument("--register-stub", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("program", nargs=argparse.REMAINDER, help="PROGRAM [ARG...] after --")
    p.set_defaults(handler=cmd_sandbox)


def cmd_sandbox(args: argparse.Namespace) -> int:
    import os
    import sys

    from virtkit.errors import ConfigError
    from virtkit.units import parse_size

    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("no program given: virtkit sandbox [--root DIR] -- PROGRAM [ARG...]")
    memory = parse_size(args.memory)
    if memory < (16 << 20) or memory > (64 << 30) or memory % 4096:
        raise ConfigError(f"--memory {args.memory}: give between 16M and 64G")
    for entry in args.env:
        if "=" not in entry:
            raise ConfigError(f"--env {entry}: write NAME=VALUE")
    from virtkit.sandbox.sandbox import Sandbox, wait_status_to_exit
    from virtkit.sandbox.trace import Tracer

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    tracer = Tracer(args.trace, args.stats, err) if (args.trace or args.stats) else None
    root = args.sandbox_root or "/"
    env = [os.fsencode(e) for e in args.env] or None
    sb = Sandbox(
        root,
        readonly=args.read_only or args.sandbox_root is None,
        memory=memory,
        tracer=tracer,
        env=env,
        fast_stub=not args.register_stub,
    )
    try:
        status = sb.run(argv)
    finally:
        if tracer is not None and args.stats:
            err(tracer.table(sb.faults))
        sb.close()
    return wait_status_to_exit(status)
