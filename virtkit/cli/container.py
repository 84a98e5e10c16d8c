"""Container commands, in the OCI runtime CLI conventions (runc/crun).

Top level: ``create start state kill delete exec ps list logs spec events stats images import``.
``virtkit oci ...`` holds the same verbs plus ``run`` (``virtkit oci run ID --bundle DIR``): the
top-level ``run`` belongs to the VM modes (``virtkit run --mode container IMAGE -- CMD``), so
tools that drive a runtime binary use ``virtkit oci`` as it (global flags may follow ``oci``).

Handlers import the runtime only when they run; commands that start processes in a container
first re-execute from a sealed copy of the interpreter (see :mod:`virtkit.container.sealexe`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _logged(handler: Handler) -> Handler:
    """Write errors to --log (runc's --log/--log-format) as well as to stderr."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        from virtkit.errors import ContainerError, VirtkitError

        _log_target(args)
        try:
            try:
                return handler(args)
            except OSError as err:
                # a system error nobody anticipated still gets one line, never a traceback
                where = f" ({err.filename})" if err.filename else ""
                hint = "; containers need root (or a rootless bundle)" if err.errno in (1, 13) else ""
                raise ContainerError(f"{err.strerror or err}{where}{hint}") from err
        except VirtkitError as err:
            if getattr(args, "log", None):
                import datetime

                now = datetime.datetime.now(datetime.timezone.utc).isoformat()  # noqa: UP017
                line = (
                    json.dumps({"level": "error", "msg": str(err), "time": now})
                    if getattr(args, "log_format", "text") == "json"
                    else f"{now} error: {err}"
                )
                try:
                    with open(args.log, "a") as f:
                        f.write(line + "\n")
                except OSError:
                    pass
            raise

    return wrapper


def _log_target(args: argparse.Namespace) -> None:
    """crun's --log takes ``file:PATH`` (and journald:/syslog:); runc's a plain path. A scheme
    virtkit cannot write to is refused before anything runs."""
    import re

    log = getattr(args, "log", None)
    if not log:
        return
    m = re.match(r"([a-z]+):(.*)", log)
    if m is None:
        return
    if m.group(1) == "file":
        args.log = m.group(2)
        return
    args.log = None
    from virtkit.errors import ConfigError

    raise ConfigError(f"--log {log}: the {m.group(1)}: log driver is not supported; give a file path (or file:PATH)")


def _runtime(args: argparse.Namespace) -> Any:
    from virtkit.container.runtime import Runtime

    return Runtime(args.root, cgroups=getattr(args, "cgroup_manager", "cgroupfs") != "disabled")


def _warn(message: str) -> None:
    print(f"virtkit: warning: {message}", file=sys.stderr)


def _seal() -> None:
    from virtkit.container.sealexe import ensure_sealed

    ensure_sealed()


def _global_flags(p: argparse.ArgumentParser) -> None:
    """The global flags of runc and crun, before the verb (accepted after ``oci`` too)."""
    p.add_argument("--root", default=argparse.SUPPRESS, help="container state directory (default /run/virtkit)")
    p.add_argument("--log", default=argparse.SUPPRESS, help="runtime log file (errors are appended there too)")
    p.add_argument("--log-format", default=argparse.SUPPRESS, choices=("text", "json"), help="log format")
    p.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=("debug", "info", "warning", "error"), help="log level"
    )
    p.add_argument(
        "--debug",
        dest="log_level",
        action="store_const",
        const="debug",
        default=argparse.SUPPRESS,
        help="log at debug level (as runc and crun; 'virtkit --debug' before 'oci' shows tracebacks)",
    )
    p.add_argument(
        "--cgroup-manager",
        default=argparse.SUPPRESS,
        choices=("cgroupfs", "systemd", "disabled"),
        help="cgroupfs (default); disabled: no cgroup (crun's; no limits then); systemd: refused",
    )
    p.add_argument(
        "--systemd-cgroup",
        dest="cgroup_manager",
        action="store_const",
        const="systemd",
        default=argparse.SUPPRESS,
        help="runc's spelling of --cgroup-manager systemd",
    )
    p.add_argument("--rootless", default=argparse.SUPPRESS, choices=("true", "false", "auto"), help=argparse.SUPPRESS)


def _bundle_flags(p: argparse.ArgumentParser) -> None:
    """What ``create`` and ``run`` share, as runc and crun spell it."""
    p.add_argument("id")
    p.add_argument("--bundle", "-b", default=".", help="bundle directory with config.json (default .)")
    p.add_argument("--config", "-f", default=None, help="the config file (default BUNDLE/config.json), as crun")
    p.add_argument("--pid-file", default=None, help="write the container's init pid here")
    p.add_argument(
        "--console-socket",
        default=None,
        metavar="SOCKET",
        help="with process.terminal: a unix socket to send the terminal's master side to",
    )
    p.add_argument(
        "--preserve-fds", type=_count, default=0, metavar="N", help="pass fds 3..3+N-1 on to the container's process"
    )
    p.add_argument("--no-new-keyring", action="store_true", help="accepted: virtkit never makes a session keyring")
    p.add_argument("--no-pivot", action="store_true", help="accepted: virtkit always uses pivot_root")
    p.add_argument("--no-subreaper", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--capture", action="store_true", help="keep the container's output for 'virtkit logs'")
    p.add_argument(
        "--net",
        choices=("none", "bridge"),
        default="none",
        help="bridge: a veth pair on the virtkit0 bridge, with an address (default: loopback only)",
    )


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of file descriptors (0..65536)")
    return int(text)


def _add_lifecycle(sub: Any, with_run: bool) -> None:
    def cmd(name: str, handler: Handler, help_: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_, **kw)
        p.set_defaults(handler=_logged(handler))
        return p

    p = cmd("create", cmd_create, "create a container from an OCI bundle (it waits for 'start')")
    _bundle_flags(p)

    if with_run:
        p = cmd("run", cmd_oci_run, "create and start a container from an OCI bundle, and wait for it")
        _bundle_flags(p)
        p.add_argument("--detach", "-d", action="store_true", help="do not wait for the container to exit")
        p.add_argument("--keep", action="store_true", help="do not delete the container after it exits")
        p.add_argument("--rm", action="store_true", help="delete the container when it exits (the default)")

    p = cmd("start", cmd_start, "start a created container (runs its process)")
    p.add_argument("id")
    p = cmd("state", cmd_state, "print a container's OCI state as JSON")
    p.add_argument("id")
    p = cmd("kill", cmd_kill, "send a signal to a container's init (default TERM)")
    p.add_argument("id")
    p.add_argument("signal", nargs="?", default="TERM", help="name (TERM, KILL, SIGHUP) or number")
    p.add_argument("--all", "-a", action="store_true", help="signal every process of the container")
    p = cmd("delete", cmd_delete, "delete a stopped (or created) container and everything it holds")
    p.add_argument("id")
    p.add_argument("--force", "-f", action="store_true", help="kill it first if it is running")
    p.add_argument("--regex", "-r", action="store_true", help="ID is a regular expression (crun): delete every match")

    p = cmd("exec", cmd_exec, "run a process in a running container")
    p.add_argument("id")
    p.add_argument("command", nargs=argparse.REMAINDER, help="CMD ARGS... (after the id, or after --)")
    p.add_argument("--process", "-p", default=None, help="process.json (OCI process object) instead of CMD")
    p.add_argument("--env", "-e", action="append", default=[], help="KEY=VALUE (repeatable)")
    p.add_argument("--cwd", default=None, help="working directory in the container")
    p.add_argument("--user", "-u", default=None, help="UID[:GID]")
    p.add_argument("--additional-gids", "-g", action="append", default=[], help="another group id (repeatable)")
    p.add_argument("--cap", "-c", action="append", default=[], help="add a capability (repeatable)")
    p.add_argument("--no-new-privs", action="store_true", help="set no_new_privs for the process")
    p.add_argument("--apparmor", default=None, help=argparse.SUPPRESS)
    p.add_argument("--process-label", default=None, help=argparse.SUPPRESS)
    p.add_argument("--detach", "-d", action="store_true")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--preserve-fds", type=_count, default=0)
    p.add_argument("--tty", "-t", action="store_true", help="give the process a terminal")
    p.add_argument("--console-socket", default=None, metavar="SOCKET", help="with --tty: where to send the terminal")
    p.add_argument("--cgroup", default=None, help="a sub-cgroup to run in (runc, crun): not supported, refused")

    p = cmd("ps", cmd_ps, "list containers in one table, or with ID the processes of one container")
    p.add_argument("id", nargs="?")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p = cmd("list", cmd_list, "list containers (OCI runtime style)")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("--quiet", "-q", action="store_true", help="ids only")
    p = cmd("spec", cmd_spec, "write a default config.json (Docker's security defaults)")
    p.add_argument("--bundle", "-b", default=".", help="where to write config.json (default .)")
    p.add_argument("--rootless", action="store_true", help="with a user namespace and id maps")
    p.add_argument("--args", default=None, help="the process, as one shell-like string (default sh)")
    p = cmd("events", cmd_events, "stream stats and OOM events of a container (JSON lines)")
    p.add_argument("id")
    p.add_argument("--stats", action="store_true", help="print one stats event and exit")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between stats events (default 5)")

    p = cmd("pause", cmd_pause, "suspend every process of a container (cgroup freezer)")
    p.add_argument("id")
    p = cmd("resume", cmd_resume, "resume a paused container")
    p.add_argument("id")
    p = cmd("features", cmd_features, "what this runtime supports, as runtime-spec features.md JSON")
    p = cmd("update", cmd_update, "change a running container's resource limits")
    p.add_argument("id")
    p.add_argument("--resources", "-r", default=None, help="a linux.resources JSON file ('-' for stdin)")
    p.add_argument("--memory", default=None, help="memory limit in bytes (or 64M...)")
    p.add_argument("--memory-reservation", default=None, help="memory soft limit in bytes")
    p.add_argument("--memory-swap", default=None, help="memory+swap limit in bytes (-1: unlimited)")
    p.add_argument("--kernel-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kernel-memory-tcp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-shares", "--cpu-share", dest="cpu_shares", default=None, help="CPU shares (relative weight)")
    p.add_argument("--cpu-quota", default=None, help="CPU time per period in microseconds (-1: none)")
    p.add_argument("--cpu-period", default=None, help="CFS period in microseconds")
    p.add_argument("--cpu-rt-period", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-rt-runtime", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpuset-cpus", default=None, help="CPUs allowed (0-3,5)")
    p.add_argument("--cpuset-mems", default=None, help="memory nodes allowed")
    p.add_argument("--pids-limit", default=None, help="maximum number of processes (-1: none)")
    p.add_argument("--blkio-weight", default=None, help="block I/O weight (10..1000)")
    p.add_argument("--l3-cache-schema", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mem-bw-schema", default=None, help=argparse.SUPPRESS)


_GLOBAL_WITH_VALUE = ("--root", "--log", "--log-format", "--log-level", "--cgroup-manager", "--rootless")
_SEALED_VERBS = ("create", "run", "exec")


def _needs_seal(argv: list[str]) -> bool:
    """Whether this command line will start processes in a container (so must run sealed)."""
    words = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _GLOBAL_WITH_VALUE:
            skip = True
            continue
        if a == "--":
            break
        if not a.startswith("-"):
            words.append(a)
    if not words:
        return False
    if words[0] == "oci":
        return len(words) > 1 and words[1] in _SEALED_VERBS
    if words[0] == "run":
        return "container" in argv and "--mode" in " ".join(argv)
    return words[0] in ("create", "exec")


def _is_the_program() -> bool:
    """True when this process is the virtkit command itself (not a test or a library caller)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0.endswith(("/virtkit", "/virtkit-runtime", "virtkit/__main__.py")) or argv0 in (
        "virtkit",
        "virtkit-runtime",
    )


def _argv() -> list[str]:
    """This process's command line as ``virtkit`` would take it (``virtkit-runtime X`` is ``virtkit oci X``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith("virtkit-runtime"):
        return ["oci", *sys.argv[1:]]
    return sys.argv[1:]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    program = _is_the_program()
    # Re-executing from the sealed interpreter copy costs an interpreter start; doing it before the
    # parser and the runtime are built (rather than in the handler) saves their cost once.
    if program and _needs_seal(_argv()):
        _seal()
    # as the OCI runtime binary ('virtkit oci VERB'), only the oci verbs are needed: each parser
    # built costs start-up time, and a runtime is started once per container operation
    oci_only = program and _command_word(_argv()) == "oci"
    if not oci_only:
        _register_top_level(sub)
    oci = sub.add_parser(
        "oci",
        help="the OCI runtime CLI (runc-compatible verbs, including run)",
        description="virtkit as an OCI runtime binary: 'virtkit oci [--root DIR] VERB ...'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps --version's lines
    )
    _global_flags(oci)
    oci.add_argument(
        "--version",
        action="version",
        version="virtkit-runtime version 0.1.0\nspec: 1.0.2\n+SECCOMP +CAP +CGROUPFS",
    )
    oci_sub = oci.add_subparsers(dest="oci_command", metavar="VERB")
    # the verbs under 'oci' are only built when the command line uses them
    if not program or "oci" in _argv():
        _add_lifecycle(oci_sub, with_run=True)

    def oci_help(_args: argparse.Namespace) -> int:
        oci.print_help()
        return 2

    oci.set_defaults(handler=oci_help)


def _command_word(argv: list[str]) -> str | None:
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in _GLOBAL_WITH_VALUE:
            skip = True
        elif not a.startswith("-"):
            return a
    return None


def _register_top_level(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_lifecycle(sub, with_run=False)

    p = sub.add_parser("logs", help="print the captured output of a container")
    p.add_argument("id")
    p.set_defaults(handler=_logged(cmd_logs))
    p = sub.add_parser("stats", help="resource usage of a container (memory, CPU, pids, OOM kills)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_logged(cmd_stats))
    p = sub.add_parser("images", help="list container images (busybox is built in)")
    p.add_argument("--store", default=None, help="image store (default /var/lib/virtkit/images)")
    p.set_defaults(handler=_logged(cmd_images))
    p = sub.add_parser("import", help="import an OCI image layout or a docker-save archive")
    p.add_argument("path")
    p.add_argument("--name", default=None, help="image name (default: from the file name)")
    p.add_argument("--ref", default=None, help="the tag to take from a multi-image OCI layout")
    p.add_argument("--store", default=None)
    p.set_defaults(handler=_logged(cmd_import))


# ------------------------------------------------------------------------------------------------
# handlers


def _check_cgroup_manager(args: argparse.Namespace) -> None:
    """runc's --systemd-cgroup / crun's --cgroup-manager systemd: cgroups made through systemd's
    D-Bus API. virtkit writes cgroupfs itself; with systemd asked for, say so rather than ignore it."""
    from virtkit.errors import ContainerError

    if getattr(args, "cgroup_manager", "cgroupfs") == "systemd":
        import os

        where = "systemd runs here" if os.path.isdir("/run/systemd/system") else "and no systemd runs here"
        raise ContainerError(
            f"the systemd cgroup manager is not supported by virtkit ({where}): "
            "use --cgroup-manager cgroupfs (podman: --cgroup-manager cgroupfs)"
        )


def _create_args(args: argparse.Namespace) -> dict[str, Any]:
    _check_cgroup_manager(args)
    return {
        "pid_file": args.pid_file,
        "capture": args.capture,
        "net": None if args.net == "none" else args.net,
        "console_socket": args.console_socket,
        "config_path": args.config,
        "preserve_fds": args.preserve_fds,
        "listen_fds": _listen_fds(),
    }


def _listen_fds() -> int:
    """systemd socket activation (sd_listen_fds(3)): with LISTEN_FDS=N in the runtime's environment,
    fds 3..3+N-1 go on to the container with LISTEN_FDS=N and LISTEN_PID=1, as runc does."""
    import os

    text = os.environ.get("LISTEN_FDS", "")
    return int(text) if text.isdigit() and 0 < int(text) <= 1024 else 0


def cmd_create(args: argparse.Namespace) -> int:
    create_args = _create_args(args)
    # as an OCI runtime (virtkit oci / virtkit-runtime) the init goes to the caller's subreaper
    # (conmon, containerd-shim), which reads its exit status, as runc's does; virtkit's own
    # 'create' keeps a monitor that records the exit status for 'state'
    create_args["handover"] = getattr(args, "oci_command", None) is not None
    _seal()
    _runtime(args).create(args.id, args.bundle, **create_args)
    return 0


def cmd_oci_run(args: argparse.Namespace) -> int:
    """runc's ``run``: create + start; in the foreground wait and delete (unless --keep); the
    container's stdio is the caller's (``--capture`` keeps it for 'virtkit logs' instead)."""
    create_args = _create_args(args)
    if args.keep and args.rm:
        from virtkit.errors import ConfigError

        raise ConfigError("--keep and --rm contradict each other: give one")
    if args.detach:
        create_args["handover"] = True
    _seal()
    return int(
        _runtime(args).run(
            args.id,
            args.bundle,
            detach=args.detach,
            remove=not args.keep,
            **create_args,
        )
    )


def cmd_start(args: argparse.Namespace) -> int:
    _runtime(args).start(args.id)
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    print(json.dumps(_runtime(args).state(args.id), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from virtkit.container.signals import parse_signal

    _runtime(args).kill(args.id, parse_signal(args.signal), all_processes=args.all)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from virtkit.container.state import validate_id

    rt = _runtime(args)
    if args.regex:
        return _delete_matching(rt, args)
    if args.force and not rt.dirs.exists(validate_id(args.id)):
        return 0  # runc and crun: 'delete --force' of a container that is gone succeeds
    rt.delete(args.id, force=args.force)
    for w in rt.warnings:
        _warn(w)
    return 0


def _delete_matching(rt: Any, args: argparse.Namespace) -> int:
    """crun's ``delete --regex PATTERN``: every container whose id the pattern matches
    (anywhere in it, as regexec(3) does for crun: anchor it with ^...$ for whole ids)."""
    import re

    from virtkit.errors import ConfigError

    if len(args.id) > 256:
        raise ConfigError("delete --regex: the pattern is longer than 256 characters")
    try:
        pattern = re.compile(args.id)
    except re.error as err:
        raise ConfigError(f"delete --regex {args.id!r}: not a regular expression ({err})") from None
    for cid in rt.dirs.ids():
        if pattern.search(cid):
            rt.delete(cid, force=args.force)
    for w in rt.warnings:
        _warn(w)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from virtkit.errors import ConfigError

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.cgroup is not None:
        raise ConfigError(f"exec --cgroup {args.cgroup}: sub-cgroups for exec are not supported by virtkit; drop it")
    rt = _runtime(args)
    base = None
    if args.process:
        from virtkit.container.config import MAX_CONFIG_BYTES
        from virtkit.records import UntrustedInput, load_object

        try:
            with open(args.process, "rb") as f:
                base = load_object(
                    f.read(MAX_CONFIG_BYTES + 1), what=f"process file {args.process}", max_bytes=MAX_CONFIG_BYTES
                )
        except OSError as err:
            raise ConfigError(f"cannot read process file {args.process}: {err.strerror}") from None
        except UntrustedInput as err:
            raise ConfigError(str(err)) from None
    process = rt.exec_process(
        args.id,
        command,
        env=args.env,
        cwd=args.cwd,
        user=args.user,
        base=base,
        tty=args.tty,
        additional_gids=args.additional_gids,
        caps=args.cap,
        no_new_privs=args.no_new_privs,
    )
    _seal()
    return int(
        rt.exec(
            args.id,
            process,
            detach=args.detach,
            pid_file=args.pid_file,
            preserve_fds=args.preserve_fds,
            console_socket=args.console_socket,
        )
    )


def cmd_pause(args: argparse.Namespace) -> int:
    _runtime(args).pause(args.id)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _runtime(args).resume(args.id)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from virtkit.container.features import features

    print(json.dumps(features(), indent=2))
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from virtkit.container.features import update_resources

    flags = {
        "memory": args.memory,
        "memory_reservation": args.memory_reservation,
        "memory_swap": args.memory_swap,
        "cpu_shares": args.cpu_shares,
        "cpu_quota": args.cpu_quota,
        "cpu_period": args.cpu_period,
        "cpuset_cpus": args.cpuset_cpus,
        "cpuset_mems": args.cpuset_mems,
        "pids_limit": args.pids_limit,
        "blkio_weight": args.blkio_weight,
    }
    unsupported = {
        "--kernel-memory": args.kernel_memory,
        "--kernel-memory-tcp": args.kernel_memory_tcp,
        "--cpu-rt-period": args.cpu_rt_period,
        "--cpu-rt-runtime": args.cpu_rt_runtime,
        "--l3-cache-schema": args.l3_cache_schema,
        "--mem-bw-schema": args.mem_bw_schema,
    }
    resources_text = None
    if args.resources:
        from virtkit.container.config import MAX_CONFIG_BYTES
        from virtkit.errors import ConfigError

        try:
            if args.resources == "-":
                resources_text = sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1)
            else:
                with open(args.resources, "rb") as f:
                    resources_text = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as err:
            raise ConfigError(f"cannot read resources file {args.resources}: {err.strerror}") from None
    raw = update_resources(flags, unsupported, resources_text, what=args.resources or "")
    _runtime(args).update(args.id, raw)
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def cmd_ps(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    if args.id:
        pids = rt.processes(args.id)
        if args.format == "json":
            print(json.dumps(pids))
            return 0
        rows = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            rows.append([str(pid), cmdline])
        print(_table(rows, ["PID", "CMD"]))
        return 0
    from virtkit.units import format_size

    states = rt.containers(warn=_warn)
    rows = []
    out = []
    for st in states:
        mem = ""
        if st["status"] in ("created", "running"):
            try:
                usage = rt.stats(st["id"]).get("memory", {}).get("usage", {})
                mem = format_size(usage.get("usage", 0))
                if usage.get("limit", -1) > 0:
                    mem += " / " + format_size(usage["limit"])
            except Exception:  # noqa: BLE001 - a table row must not fail the listing
                mem = ""
        rows.append([st["id"], "container", st["status"], str(st["pid"] or ""), mem, st["created"][:19]])
        out.append(
            {
                "id": st["id"],
                "kind": "container",
                "status": st["status"],
                "pid": st["pid"],
                "memory": mem,
                "created": st["created"],
            }
        )
    from virtkit.service.client import ps_entries  # VMs run by virtkitd, when it is running

    for e in ps_entries():
        rows.append([e["id"], e["kind"], e["status"], str(e["pid"] or ""), e["memory"], e["created"][:19]])
        out.append(e)
    if args.format == "json":
        print(json.dumps(out, indent=2))
    else:
        print(_table(rows, ["ID", "KIND", "STATUS", "PID", "MEMORY", "CREATED"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    states = _runtime(args).containers(warn=_warn)
    if args.quiet:
        for st in states:
            print(st["id"])
    elif args.format == "json":
        print(json.dumps(states, indent=2))
    else:
        rows = [[st["id"], str(st["pid"]), st["status"], st["bundle"], st["created"], st["owner"]] for st in states]
        print(_table(rows, ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    import os
    import shlex

    from virtkit.container.spec import default_spec
    from virtkit.errors import ConfigError

    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise ConfigError(f"{path} exists; remove it first (virtkit spec does not overwrite)")
    spec = default_spec(shlex.split(args.args) if args.args else None, rootless=args.rootless)
    try:
        with open(path, "x") as f:
            json.dump(spec, f, indent=2)
            f.write("\n")
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror}") from None
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    for event in _runtime(args).events(args.id, interval=args.interval, stats_only=args.stats):
        print(json.dumps(event), flush=True)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    sys.stdout.write(_runtime(args).logs(args.id))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from virtkit.units import format_size

    rt = _runtime(args)
    st = rt.stats(args.id)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    mem = st.get("memory", {}).get("usage", {})
    cpu = st.get("cpu", {})
    pids = st.get("pids", {})
    limit = mem.get("limit", -1)
    rows = [
        [
            "memory",
            format_size(mem.get("usage", 0)),
            "max " + format_size(mem.get("max", 0)),
            "limit " + (format_size(limit) if limit and limit > 0 else "none"),
        ],
        ["oom kills", str(st.get("memory", {}).get("oomKills", 0)), "", ""],
        [
            "cpu",
            f"{cpu.get('usage', {}).get('total', 0) / 1e9:.3f} s",
            f"throttled {cpu.get('throttling', {}).get('throttledPeriods', 0)} periods",
            "",
        ],
        [
            "pids",
            str(pids.get("current", 0)),
            "",
            "limit " + (str(pids["limit"]) if pids.get("limit", -1) >= 0 else "none"),
        ],
    ]
    print(_table(rows, ["RESOURCE", "USAGE", "", "LIMIT"]))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from virtkit.container.image import list_images

    rows = [
        [m.get("name", "?"), (m.get("digest") or "built-in")[:19], m.get("source", "")] for m in list_images(args.store)
    ]
    print(_table(rows, ["NAME", "DIGEST", "SOURCE"]))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from virtkit.container.image import import_image

    print(import_image(args.path, name=args.name, store=args.store, ref=args.ref))
    return 0


@_logged
def cmd_run_container(args: argparse.Namespace) -> int:
    """``virtkit run --mode container IMAGE -- CMD``: an image on a copy-on-write rootfs, with limits,
    in the foreground; the container is deleted when it exits."""
    import os
    import secrets

    from virtkit.container import image
    from virtkit.container.config import parse_config
    from virtkit.container.runtime import Runtime
    from virtkit.container.spec import default_spec
    from virtkit.container.state import validate_id
    from virtkit.errors import ConfigError
    from virtkit.units import parse_count, parse_size

    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    cid = validate_id(args.name) if args.name else "vk-" + secrets.token_hex(4)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if args.memory:
        limit = parse_size(args.memory, what="--memory")
        resources["memory"] = {"limit": limit, "swap": limit}
    if args.cpus:
        try:
            cpus = float(args.cpus)
        except ValueError:
            raise ConfigError(f"--cpus {args.cpus!r} is not a number: use e.g. 0.5 or 2") from None
        if not 0.01 <= cpus <= (os.cpu_count() or 1):
            raise ConfigError(f"--cpus must be between 0.01 and {os.cpu_count()} on this host, got {cpus}")
        resources["cpu"] = {"quota": int(cpus * 100_000), "period": 100_000}
    if args.pids_limit:
        resources["pids"] = {"limit": parse_count(args.pids_limit, what="--pids-limit", minimum=1)}
    _seal()
    lower, img = image.resolve(args.target)
    argv = command or (img.get("Entrypoint") or []) + (img.get("Cmd") or []) or ["sh"]
    raw = default_spec(argv, hostname=cid[:63])
    if img.get("Env"):
        raw["process"]["env"] = list(img["Env"])
    if img.get("WorkingDir"):
        raw["process"]["cwd"] = img["WorkingDir"]
    user = img.get("User") or ""
    if user:
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise ConfigError(f"image user {user!r} is not numeric; virtkit needs UID[:GID]")
        raw["process"]["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    raw["linux"]["resources"] = resources
    rt = Runtime(args.root)
    cdir = os.path.join(rt.dirs.root, cid)
    raw["root"]["path"] = os.path.join(cdir, "rootfs")
    config = parse_config(raw)
    overlay = {"lower": lower, "upper": os.path.join(cdir, "upper"), "work": os.path.join(cdir, "work")}
    return int(
        rt.run(
            cid,
            cdir,
            config=config,
            rootfs=raw["root"]["path"],
            raw_config=raw,
            overlay=overlay,
            remove=True,
            annotations={"org.virtkit.image": args.target},
        )
    )
