"""VM commands: ``run``, ``doctor``, ``demo``."""

from __future__ import annotations

import argparse

MODES = ("full", "para", "container", "sandbox")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="boot a kernel in a VM (or, with --mode container, run an image in a container)",
        usage="virtkit run [options] KERNEL  |  virtkit run --mode container|sandbox [options] IMAGE -- CMD [ARG...]",
        description=(
            "Boot KERNEL (a Linux bzImage or vmlinux, a Multiboot ELF, or any ELF64 with --boot direct64) "
            "in a virtual machine on "
            "/dev/kvm. The guest's debug-exit status (port 0xF4, as QEMU's isa-debug-exit) becomes "
            "this command's exit status: (value << 1) | 1. With --mode container, run IMAGE -- CMD "
            "in an OCI container instead."
        ),
    )
    run.add_argument("target", metavar="KERNEL|IMAGE", help="guest kernel (VM modes) or image (container)")
    run.set_defaults(command=[])  # container mode: the command after `--` (split off in cli.main)
    from virtkit.cli.options import add_initrd_option, add_machine_options, add_net_option

    add_machine_options(
        run,
        modes=MODES,
        mode_help="full virtualization (default), paravirtualized guest, container, or sandbox (the image's "
        "program in a kernel-less VM, its system calls served by virtkit: docs/SANDBOX.md)",
    )
    add_net_option(run)
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="FILE[,STRING]",
        help="Multiboot module, optionally with its string (repeatable)",
    )
    add_initrd_option(run)
    run.add_argument(
        "--boot",
        default="auto",
        choices=("auto", "multiboot", "direct64", "linux", "pvh"),
        help="boot protocol: Multiboot v1, direct 64-bit ELF entry, the Linux 64-bit boot protocol "
        "(bzImage or vmlinux), or Linux's PVH entry (default: auto, from the file)",
    )
    run.add_argument(
        "--serial", default="stdout", metavar="stdout|FILE|none", help="where the UART's output goes (default stdout)"
    )
    run.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="stop the guest after S seconds (exit status 124)"
    )
    run.add_argument("--stats", action="store_true", help="print VM exit statistics at the end")
    # container mode
    run.add_argument("--cpus", default=None, help="container mode: CPU limit, e.g. 0.5")
    run.add_argument("--pids-limit", default=None, help="container mode: maximum number of processes")
    run.add_argument("--name", default=None, help="container mode: container id (default generated)")
    run.set_defaults(handler=cmd_run)
    from virtkit.cli.foreground import add_run_options

    add_run_options(run)  # --control, --checkpoint-every, --restart on-failure

    doctor = sub.add_parser(
        "doctor", help="probe this host: is /dev/kvm usable, which KVM flavor, what guests can expect"
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(handler=cmd_doctor)

    demo = sub.add_parser("demo", help="boot the shipped guests and show what happened")
    demo.add_argument("--guests-dir", default=None, help="where the built guests are (default build/guests)")
    demo.set_defaults(handler=cmd_demo)


def cmd_run(args: argparse.Namespace) -> int:
    if args.mode == "sandbox":
        from virtkit.cli.sandbox import cmd_run_sandbox

        return cmd_run_sandbox(args)
    if args.mode == "container":
        if args.net:
            from virtkit.errors import ConfigError

            raise ConfigError("--net tap is for VMs: a container gets a network with 'virtkit oci run --net bridge'")
        from virtkit.cli.container import cmd_run_container

        return cmd_run_container(args)
    from virtkit.cli.run_vm import run_vm

    return run_vm(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from virtkit.doctor import print_report

    return print_report(as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from virtkit.demo import run_demo

    return run_demo(args.guests_dir)
