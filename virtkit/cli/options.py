"""Command-line options more than one command takes, parsed in one place."""

from __future__ import annotations

import argparse


def add_machine_options(
    p: argparse.ArgumentParser,
    *,
    modes: tuple[str, ...] = ("full", "para"),
    mode_help: str = "full virtualization (default) or paravirtualized guest",
) -> None:
    """What a VM is made of, parsed by :class:`virtkit.api.VM`: ``run`` boots such a machine,
    ``migrate-receive`` builds one and takes an incoming VM into it only if the VM has this shape."""
    p.add_argument("--mode", default="full", choices=modes, help=mode_help)
    p.add_argument("--memory", "-m", default=None, help="memory size, e.g. 64M, 1G (VM default 64M)")
    p.add_argument("--vcpus", type=str, default="1", help="number of vCPUs (default 1)")
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="IMAGE[,ro]",
        help="raw disk image: ATA disk in full mode, block hypercalls/virtio-blk in para mode",
    )
    p.add_argument("--strict", action="store_true", help="treat accesses to unknown ports and MMIO addresses as errors")


def add_initrd_option(p: argparse.ArgumentParser) -> None:
    """``--initrd FILE``: the initial ramdisk a Linux kernel (bzImage, vmlinux, PVH) is given."""
    p.add_argument(
        "--initrd", default=None, metavar="FILE", help="initial ramdisk for a Linux kernel (bzImage or vmlinux)"
    )


def add_net_option(p: argparse.ArgumentParser) -> None:
    """``--net``: a virtio-net card on a TAP device made for the VM (paravirtualized VMs)."""
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap[,bridge=BR][,mac=MAC][,name=IF]",
        help="virtio-net card on a new TAP device (removed when the VM ends), optionally on bridge BR (--mode para)",
    )
