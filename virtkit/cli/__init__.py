"""The ``virtkit`` command line.

Each group of commands lives in its own module with a ``register(subparsers)`` function;
handlers import the heavy parts of virtkit only when they run, so ``virtkit run`` starts fast.
Errors derived from :class:`virtkit.errors.VirtkitError` are printed on one line and turned
into a non-zero exit status; a traceback is never shown unless ``--debug`` is given.

The top layer: may import anything in virtkit; nothing in virtkit imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

Handler = Callable[[argparse.Namespace], int]

#: command modules, in the order their commands appear in ``--help``
_COMMAND_MODULES = (
    "virtkit.cli.vm",
    "virtkit.cli.container",
    "virtkit.cli.sandbox",
    "virtkit.cli.failover",
    "virtkit.cli.service",
)
#: commands whose module is known without importing every module (start-up time of `virtkit run`)
_FAST_COMMANDS = {
    "run": "virtkit.cli.vm",
    "doctor": "virtkit.cli.vm",
    "demo": "virtkit.cli.vm",
    "sandbox": "virtkit.cli.sandbox",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line like every other virtkit error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"virtkit: error: {message} (see '{self.prog} --help')\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` a module name, a parser with just that module's commands."""
    import importlib

    parser = _Parser(
        prog="virtkit",
        description="virtkit: a KVM hypervisor, paravirtualization, OCI containers and failover, in Python.",
        epilog="Run 'virtkit doctor' first to see what this host can do.",
    )
    parser.add_argument("--version", action="version", version="virtkit 0.1.0")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # OCI runtime conventions (runc/crun): global flags come before the command.
    parser.add_argument("--root", default=None, help="container state directory (default /run/virtkit)")
    parser.add_argument("--log", default=None, help="container runtime log file")
    parser.add_argument("--log-format", default="text", choices=("text", "json"), help="log format")
    parser.add_argument("--systemd-cgroup", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only else _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from virtkit.errors import VirtkitError

    argv = list(sys.argv[1:] if argv is None else argv)
    # `virtkit run IMAGE [options] -- CMD ARGS...`: argparse cannot put a variable-length command
    # after an optional-laden positional, so everything after the first `--` is split off here.
    trailing: list[str] = []
    if "run" in argv and "--" in argv and argv.index("run") < argv.index("--"):
        cut = argv.index("--")
        argv, trailing = argv[:cut], argv[cut + 1 :]
    fast = _FAST_COMMANDS.get(argv[0]) if argv and not ({"-h", "--help"} & set(argv[:1])) else None
    parser = build_parser(fast)
    args = parser.parse_args(argv)
    if trailing:
        args.command = trailing
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except VirtkitError as err:
        if args.debug:
            raise
        print(f"virtkit: error: {err}", file=sys.stderr)
        # as an OCI runtime (runc, crun), every failure exits 1; callers (podman, conmon) test for it
        return 1 if getattr(args, "oci_command", None) is not None else err.exit_status
    except KeyboardInterrupt:
        print("virtkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`virtkit ps | head -1`): end quietly, with the
        # status a shell shows for a program killed by SIGPIPE
        return 141


def run(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point. Every resource is released by the time main() returns, so
    the interpreter's own teardown (a few ms of garbage collection and module cleanup) is skipped."""
    try:
        status = main(argv)
    except KeyboardInterrupt:  # Ctrl-C before main() could catch it (while parsing, importing)
        print("virtkit: interrupted", file=sys.stderr)
        status = 130
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(status)


def runtime() -> None:
    """``virtkit-runtime``: the OCI runtime binary, ``virtkit oci`` under a name of its own, for
    tools that take a runtime path (``podman --runtime``, crun's test suite's ``OCI_RUNTIME``).
    Every argument is the runtime's: ``virtkit-runtime --root R run --bundle B ID``."""
    run(["oci", *sys.argv[1:]])
