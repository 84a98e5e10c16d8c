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


def _run(
    root: str,
    argv: list[str],
    *,
    readonly: bool,
    memory: int,
    trace: bool,
    stats: bool,
    env: list[bytes] | None,
    cwd: str = "/",
    fast_stub: bool = True,
) -> int:
    import sys

    from virtkit.sandbox.sandbox import Sandbox, wait_status_to_exit
    from virtkit.sandbox.trace import Tracer

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    tracer = Tracer(trace, stats, err) if (trace or stats) else None
    sb = Sandbox(root, readonly=readonly, memory=memory, tracer=tracer, env=env, fast_stub=fast_stub)
    try:
        status = sb.run(argv, cwd=cwd)
    finally:
        if tracer is not None and stats:
            err(tracer.table(sb.faults))
        sb.close()
    return wait_status_to_exit(status)


def _check_memory(text: str) -> int:
    from virtkit.errors import ConfigError
    from virtkit.units import parse_size

    memory = parse_size(text, what="--memory")
    if memory < (16 << 20) or memory > (64 << 30) or memory % 4096:
        raise ConfigError(f"--memory {text}: give between 16M and 64G")
    return memory


def cmd_run_sandbox(args: argparse.Namespace) -> int:
    """``virtkit run --mode sandbox IMAGE -- CMD``: the image's rootfs, read-only, as the program's /
    (no writable overlay yet: docs/SANDBOX.md)."""
    import os

    from virtkit.container import image
    from virtkit.errors import ConfigError

    for flag in ("net", "disk", "module"):
        if getattr(args, flag, None):
            raise ConfigError(f"--{flag} is not for --mode sandbox")
    if args.cpus or args.pids_limit:
        raise ConfigError("--cpus and --pids-limit are not enforced in --mode sandbox yet: leave them out")
    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    memory = _check_memory(args.memory) if args.memory else 1 << 30
    lower, img = image.resolve(args.target)
    argv = command or (img.get("Entrypoint") or []) + (img.get("Cmd") or []) or ["/bin/sh"]
    return _run(
        lower,
        argv,
        readonly=True,
        memory=memory,
        trace=False,
        stats=bool(args.stats),
        env=[os.fsencode(e) for e in img.get("Env") or []] or None,
        cwd=img.get("WorkingDir") or "/",
    )


def cmd_sandbox(args: argparse.Namespace) -> int:
    import os

    from virtkit.errors import ConfigError

    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("no program given: virtkit sandbox [--root DIR] -- PROGRAM [ARG...]")
    memory = _check_memory(args.memory)
    for entry in args.env:
        if "=" not in entry:
            raise ConfigError(f"--env {entry}: write NAME=VALUE")
    return _run(
        args.sandbox_root or "/",
        argv,
        readonly=args.read_only or args.sandbox_root is None,
        memory=memory,
        trace=args.trace,
        stats=args.stats,
        env=[os.fsencode(e) for e in args.env] or None,
        fast_stub=not args.register_stub,
    )
