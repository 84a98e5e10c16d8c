"""``virtkit migrate-receive``: build the machine from this host's command line, listen, confine
the process like a service VMM, and only then receive the VM and run it in the foreground.

The steps, in the order each one needs:

1. read the key file (refused if unsafe), parse the machine options, open ``--serial``: mistakes
   are the user's and are reported before anything else happens;
2. bind the migration socket (loopback unless told otherwise) and ``--control``, in the host's
   network and mount namespaces;
3. jailed (the default): unshare the PID namespace and fork (``CLONE_NEWPID`` applies to children
   only). The parent stays outside, unconfined but doing nothing but wait: it forwards
   SIGTERM/SIGINT/SIGHUP, exits with the child's status (128+N and a one-line reason if a signal
   ended it) and removes the control socket file the child cannot. The child dies with it
   (PR_SET_PDEATHSIG), so no VM outlives its foreground command;
4. the child, PID 1 of its namespace, unshares its mount, network, IPC, UTS and cgroup
   namespaces, builds the machine (KVM binds a VM to the address space that created it, so the
   fork comes first) and opens the disks this host names, then writes ``--port-file``;
5. confines itself (:func:`virtkit.jail.confine.confine`): empty read-only root, rlimits, a uid
   of its own with no capabilities, ``no_new_privs``, the seccomp allow-list of
   :func:`virtkit.jail.policy.receiver_filter`;
6. accepts one connection and parses the first byte from the network only now
   (:func:`virtkit.migration.target.receive`), and runs the VM until it stops.

What a confined receiver cannot do afterwards, and so refuses: ``--checkpoint-every`` (it writes
into a host directory: refused at start), and the control socket's ``snapshot`` and ``migrate``
(a host directory; a new connection from a process without a network: refused on request, with
the reason). ``status``, ``pause``, ``resume`` and ``stop`` work. ``--no-jail`` runs all of it
unconfined, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import sys
from typing import Final

from virtkit.cli.foreground import foreground
from virtkit.errors import ConfigError, VirtkitError
from virtkit.migration import keys
from virtkit.migration.target import IncomingVM, listen, receive, write_port_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.net.tap import NetSpec, TapDevice

#: uids of confined receivers: BASE + the parent's pid, unique while the parent waits (RLIMIT_NPROC
#: counts per uid, and distinct uids cannot signal or ptrace one another); above the service's
#: range (virtkit.service.daemon.UID_BASE...) and below 2^31
JAIL_UID_BASE: Final = 2_000_000_000
#: threads besides the vCPUs: main, watchdog, I/O, control server, control clients
EXTRA_THREADS: Final = 8


class _Terminated(BaseException):
    pass


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    key = keys.load(args.key_file)
    jailed = not args.no_jail
    if jailed and args.checkpoint_every is not None:
        raise ConfigError(
            "--checkpoint-every writes into a host directory, which a confined receiver cannot "
            "reach: leave it out (snapshot the VM after migrating it on), or add --no-jail"
        )
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout:g}")
    from virtkit.devices.virtio.net.tap import NetSpec

    nets = _parse_nets(args)
    taps: list[TapDevice] = []
    try:
        # The TAPs are made here, in the host's network namespace, where the bridges are: the
        # confined child leaves it, and a TAP's fd goes on working in any namespace. This process
        # holds them until the VM's process has ended, then makes sure they are gone.
        taps = _open_taps(nets)
        vm = IncomingVM(
            memory=args.memory or "64M",
            vcpus=args.vcpus,
            mode=args.mode,
            strict=args.strict,
            disks=args.disk,
            serial=args.serial,
            nets=[NetSpec(bridge=n.bridge, mac=n.mac, name=n.name, tap=t) for n, t in zip(nets, taps, strict=True)],
        )  # parses the options, opens --serial
    except BaseException:
        _close_taps(taps)
        raise
    try:
        return _listen_and_run(vm, key, args, jailed)
    finally:
        _close_taps(taps)


def _parse_nets(args: argparse.Namespace) -> list[NetSpec]:
    from virtkit.devices.virtio.net.tap import parse_net

    nets = [parse_net(n) for n in args.net]
    if nets and args.mode != "para":
        raise ConfigError("--net needs --mode para: the network card is a virtio device")
    return nets


def _open_taps(nets: list[NetSpec]) -> list[TapDevice]:
    from virtkit.devices.virtio.net.tap import TapDevice

    taps: list[TapDevice] = []
    try:
        for spec in nets:
            taps.append(TapDevice(spec))
    except BaseException:
        _close_taps(taps)
        raise
    return taps


def _close_taps(taps: list[TapDevice]) -> None:
    for tap in taps:
        tap.close()


def _listen_and_run(vm: IncomingVM, key: bytes, args: argparse.Namespace, jailed: bool) -> int:
    listener = control = None
    try:
        listener = listen(args.listen)
        if args.control:
            from virtkit.migration.control import bind

            control = bind(args.control)
    except BaseException:
        for s in (listener, control):
            if s is not None:
                s.close()
        vm.close()
        raise
    if not jailed:
        print(
            "virtkit: warning: --no-jail: this receiver runs unconfined (as root, with the host's files "
            "and network): a guest that takes over its VMM takes over the host",
            file=sys.stderr,
        )
        try:
            return _receive_and_run(vm, listener, control, key, args, uid=None)
        finally:
            if args.control:  # bound here; the control server removes it too, if it got that far
                with contextlib.suppress(OSError):
                    os.unlink(args.control)
    uid = args.jail_uid if args.jail_uid is not None else JAIL_UID_BASE + os.getpid()
    from virtkit.host import ns

    try:
        # Only the PID namespace here (it applies to children only). The child unshares the rest
        # itself: a mount namespace shared with the parent would be the child's to pivot_root,
        # and the parent's root would go empty with it (pivot_root moves every process of the
        # namespace that had the old root), leaving it unable to remove the control socket.
        ns.unshare(ns.CLONE_NEWPID)
        # the child learns from this pipe's end-of-file that the parent is gone (see _child)
        alive_r, alive_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pid = os.fork()
    except OSError as e:
        for s in (listener, control):
            if s is not None:
                s.close()
        vm.close()
        raise ConfigError(
            f"cannot confine the receiver ({e.strerror or e}): run it as root, or add --no-jail"
        ) from None
    if pid == 0:
        os.close(alive_w)
        os._exit(_child(vm, listener, control, key, args, uid, alive_r))
    # the parent: everything it opened now belongs to the child
    os.close(alive_r)  # alive_w stays open until this process ends, however it ends
    listener.close()
    if control is not None:
        control.close()
    vm.close()
    try:
        return _wait(pid)
    finally:
        if args.control:
            with contextlib.suppress(OSError):
                os.unlink(args.control)


def _wait(pid: int) -> int:
    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(forwarded, forward)
    _, status = os.waitpid(pid, 0)  # retried after each forwarded signal (PEP 475)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = " (its seccomp filter stopped a system call the allow-list lacks)" if sig == signal.SIGSYS else ""
        print(f"virtkit: error: the confined receiver was killed by {signal.Signals(sig).name}{why}", file=sys.stderr)
        return 128 + sig
    return os.WEXITSTATUS(status)


def _child(
    vm: IncomingVM,
    listener: socket.socket,
    control: socket.socket | None,
    key: bytes,
    args: argparse.Namespace,
    uid: int,
    parent_alive: int,
) -> int:
    """PID 1 of the receiver's namespaces: returns the process exit status, never raises."""
    try:
        # The VM lives and dies with the foreground process: a launcher killed with SIGKILL must
        # not leave a receiver (and perhaps a running guest) behind, unseen in its PID namespace.
        from virtkit.host import libc, ns

        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _exit_if_orphaned(parent_alive)  # the parent may have died before the prctl
        from virtkit.jail.confine import NAMESPACE_FLAGS

        try:  # still one thread: mount, network, IPC, UTS and cgroup namespaces of its own
            ns.unshare(NAMESPACE_FLAGS & ~ns.CLONE_NEWPID)
        except OSError as e:
            raise ConfigError(
                f"cannot confine the receiver ({e.strerror or e}): run it as root, or add --no-jail"
            ) from None
        # PID 1 gets only the signals it handles: without this, the parent's SIGTERM would be lost
        signal.signal(signal.SIGTERM, _terminate)
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent, which forwards it once
        return _receive_and_run(vm, listener, control, key, args, uid=uid, parent_alive=parent_alive)
    except VirtkitError as e:
        print(f"virtkit: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("virtkit: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("virtkit: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()


def _exit_if_orphaned(parent_alive: int) -> None:
    try:
        if os.read(parent_alive, 1) == b"":  # end of file: the parent's end is closed, it is gone
            os._exit(128 + signal.SIGKILL)
    except BlockingIOError:
        pass  # still there


def _receive_and_run(
    vm: IncomingVM,
    listener: socket.socket,
    control: socket.socket | None,
    key: bytes,
    args: argparse.Namespace,
    *,
    uid: int | None,
    parent_alive: int = -1,
) -> int:
    with vm, contextlib.ExitStack() as owned:
        owned.callback(listener.close)
        if control is not None:
            owned.callback(control.close)
        vm.open()  # the machine this host's options describe, and the disks they name
        assert vm.machine is not None
        if args.port_file:
            write_port_file(args.port_file, listener.getsockname()[1])
        if uid is not None:
            # the device state records the incoming state is parsed into are imported on first
            # use; after the root is emptied an import fails, so they are imported now
            for device in vm.machine.devices.values():
                device.state_type()
            _confine(uid, threads=len(vm.machine.vcpus) + EXTRA_THREADS, seccomp=not args.no_seccomp)
            _exit_if_orphaned(parent_alive)  # the uid change cleared PDEATHSIG until confine re-armed it
            os.close(parent_alive)
        receive(listener, vm, key, accept_timeout=args.accept_timeout, fault=args.inject_fault)
        owned.pop_all()  # the listener is closed; the control socket goes to the control server
        return foreground(vm, args, started=True, control_listener=control, confined=uid is not None)


def _confine(uid: int, threads: int, seccomp: bool = True) -> None:
    # Everything the rest of this process will import, imported now: after the root is emptied
    # an import is an EACCES (and a crash report would lose its disassembly, as in a service VMM).
    import hashlib  # noqa: F401
    import hmac  # noqa: F401
    import json  # noqa: F401
    import secrets  # noqa: F401
    import traceback  # noqa: F401

    import virtkit.diagnose  # noqa: F401
    import virtkit.migration.control  # noqa: F401
    import virtkit.migration.shape  # noqa: F401
    import virtkit.snapshot.snapshot  # noqa: F401
    import virtkit.stats  # noqa: F401
    from virtkit.jail.confine import JailSpec, confine
    from virtkit.jail.policy import receiver_filter

    program = receiver_filter()
    # no file-size limit: --serial FILE is the user's choice, as with `virtkit run`
    spec = JailSpec(
        uid=uid,
        gid=uid,
        threads=threads,
        max_file_size=resource.RLIM_INFINITY,
        seccomp=seccomp,
        parent_death_signal=signal.SIGKILL,
    )
    try:
        confine(spec, program)
    except OSError as e:
        raise ConfigError(
            f"cannot confine the receiver ({e.strerror or e}): run it as root, or add --no-jail"
        ) from None
