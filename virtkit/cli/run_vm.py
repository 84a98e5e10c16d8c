"""``virtkit run KERNEL``: boot one VM in the foreground."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from virtkit.api import VM
from virtkit.boot.loader import ModuleSpec
from virtkit.errors import ConfigError


def _parse_module(text: str) -> ModuleSpec:
    path, _, string = text.partition(",")
    if not path:
        raise ConfigError(f"--module {text!r}: give a file, optionally followed by ,STRING")
    return ModuleSpec(path, string)


def _forward_stdin(vm: VM) -> None:
    def pump() -> None:
        while True:
            try:
                data = os.read(0, 1024)
            except OSError:
                return
            if not data or vm.machine is None:
                return
            vm.send_serial(data)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


def _announce_nets(vm: VM) -> None:
    if vm.machine is not None:
        for name, card in vm.machine.nets:
            print(f"virtkit: --net: TAP {name}, guest MAC {card.mac.hex(':')}", file=sys.stderr)


def run_vm(args: argparse.Namespace) -> int:
    if args.command:
        raise ConfigError("a command after `--` is only for --mode container; pass guest arguments with --cmdline")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout:g}")
    if args.cpus is not None or args.pids_limit is not None:
        raise ConfigError("--cpus and --pids-limit apply to --mode container; VMs take --vcpus and --memory")
    if args.restart != "no":
        from virtkit.cli.supervisor import supervise

        return supervise(args)  # this process becomes the supervisor of a child VMM
    from virtkit.cli.foreground import foreground

    vm = VM(
        args.target,
        memory=args.memory or "64M",
        vcpus=args.vcpus,
        cmdline=args.cmdline,
        modules=[_parse_module(m) for m in args.module],
        initrd=args.initrd,
        boot=args.boot,
        mode=args.mode,
        strict=args.strict,
        serial=args.serial,
        disks=args.disk,
        nets=args.net,
    )
    with vm:
        _announce_nets(vm)
        if sys.stdin.isatty() and args.serial == "stdout":
            _forward_stdin(vm)
        return foreground(vm, args)  # signals, --control/--checkpoint-every, the end report
