"""The Python API: a VM in a ``with`` block.

with VM(kernel="build/guests/hello.elf", memory="64M") as vm:
    result = vm.run(timeout=5)
print(result.exit_code, result.serial_output, result.stats.total_exits)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from virtkit.boot.loader import ModuleSpec
from virtkit.console import Console
from virtkit.errors import ConfigError
from virtkit.stats import RunStats, merge
from virtkit.stop import Stop, StopReason
from virtkit.units import parse_count, parse_size
from virtkit.vm import DiskSpec, Machine, MachineConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

    from virtkit.devices.virtio.net.tap import NetSpec

VM_MODES = ("full", "para")

#: process exit statuses for stops that are not a debug-exit (documented in the README)
EXIT_OK = 0
EXIT_VMM_ERROR = 1
EXIT_TIMEOUT = 124
EXIT_GUEST_CRASH = 125
EXIT_UNKNOWN_ACCESS = 126
EXIT_STOPPED = 130
#: the serial output's reader went away: what a shell reports for a program killed by SIGPIPE
EXIT_OUTPUT_CLOSED = 141


def parse_disk(text: str) -> DiskSpec:
    """``PATH`` or ``PATH,ro``."""
    path, _, opts = text.partition(",")
    if not path:
        raise ConfigError(f"--disk {text!r}: give an image file, optionally followed by ,ro")
    if opts not in ("", "ro", "rw"):
        raise ConfigError(f"--disk {text!r}: unknown option {opts!r} (use ,ro for read-only)")
    return DiskSpec(path, read_only=opts == "ro")


def _parse_nets(nets: Sequence[str]) -> tuple[NetSpec, ...]:
    if not nets:
        return ()
    from virtkit.devices.virtio.net.tap import parse_net

    return tuple(parse_net(n) for n in nets)


def exit_status_for(stop: Stop) -> int:
    if stop.reason in (StopReason.DEBUG_EXIT, StopReason.POWER_OFF) and stop.exit_status is not None:
        return stop.exit_status
    return {
        StopReason.RESET: EXIT_OK,
        StopReason.POWER_OFF: EXIT_OK,
        StopReason.HALTED: EXIT_OK,
        StopReason.TIMEOUT: EXIT_TIMEOUT,
        StopReason.UNKNOWN_ACCESS: EXIT_UNKNOWN_ACCESS,
        StopReason.STOPPED: EXIT_STOPPED,
        StopReason.ERROR: EXIT_VMM_ERROR,
        StopReason.OUTPUT_CLOSED: EXIT_OUTPUT_CLOSED,
    }.get(stop.reason, EXIT_GUEST_CRASH)


class RunResult:
    """How a run ended: ``reason``, the process-style ``exit_code``, a readable ``detail`` (a crash
    report for crashes), everything the guest printed, and the exit statistics."""

    __slots__ = ("reason", "exit_code", "detail", "serial_bytes", "stats")

    def __init__(self, reason: StopReason, exit_code: int, detail: str, serial_bytes: bytes, stats: RunStats):
        self.reason, self.exit_code, self.detail = reason, exit_code, detail
        self.serial_bytes, self.stats = serial_bytes, stats

    @property
    def serial_output(self) -> str:
        return self.serial_bytes.decode("utf-8", errors="replace")

    @property
    def crashed(self) -> bool:
        return self.reason.is_crash


class VM:
    """A virtual machine booting ``kernel``. Use it as a context manager; :meth:`run` boots it."""

    def __init__(
        self,
        kernel: str | os.PathLike[str],
        *,
        memory: str | int = "64M",
        vcpus: int | str = 1,
        cmdline: str = "",
        modules: Sequence[str | ModuleSpec] = (),
        initrd: str | os.PathLike[str] | None = None,
        boot: str = "auto",
        mode: str = "full",
        strict: bool = False,
        serial: str | BinaryIO | None = None,
        disks: Sequence[str | DiskSpec] = (),
        nets: Sequence[str] = (),
    ) -> None:
        """``nets``: ``--net`` option values (``tap[,bridge=BR][,mac=MAC][,name=IF]``)."""
        if mode not in VM_MODES:
            raise ConfigError(
                f"--mode {mode!r} is not a VM mode: use one of {', '.join(VM_MODES)} (or 'container' from the CLI)"
            )
        self.kernel = os.fspath(kernel)
        self.config = MachineConfig(
            memory=parse_size(
                memory,
                what="--memory",
                default_unit="M" if isinstance(memory, str) and memory.strip().isdigit() else "",
            ),
            vcpus=parse_count(vcpus, what="--vcpus"),
            paravirt=mode == "para",
            strict=strict,
            disks=tuple(d if isinstance(d, DiskSpec) else parse_disk(d) for d in disks),
            nets=_parse_nets(nets),
        )
        self.cmdline = cmdline
        self.modules = [m if isinstance(m, ModuleSpec) else ModuleSpec(str(m)) for m in modules]
        self.boot = boot
        self.initrd = None if initrd is None else os.fspath(initrd)
        self._serial_file: BinaryIO | None = None
        tee: BinaryIO | None
        if serial is None or serial == "none":
            tee = None
        elif serial == "stdout":
            tee = sys.stdout.buffer
        elif isinstance(serial, str):
            try:
                self._serial_file = tee = open(serial, "wb")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise ConfigError(f"cannot open serial output file {serial}: {e.strerror}") from None
        else:
            tee = serial
        self.console = Console(tee)
        self.console.on_closed = self._output_closed
        self.machine: Machine | None = None

    def _output_closed(self) -> None:
        # every way of making the machine (boot, restore, incoming migration) ends here alike
        if self.machine is not None:
            self.machine.request_stop(
                Stop(StopReason.OUTPUT_CLOSED, detail="the reader of the serial output went away")
            )

    def __enter__(self) -> VM:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the machine and load the kernel (what ``with`` does)."""
        if self.machine is not None:
            return
        try:
            self.machine = Machine(self.config, self.console.write)
            self.machine.load(
                self.kernel, cmdline=self.cmdline, modules=self.modules, protocol=self.boot, initrd=self.initrd
            )
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        self.open()
        assert self.machine is not None
        self.machine.start()

    def wait(self, timeout: float | None = None) -> RunResult:
        assert self.machine is not None, "start() the VM first"
        stop = self.machine.wait(timeout)
        self.console.flush()
        return self._result(stop)

    def run(self, timeout: float | None = None) -> RunResult:
        """Boot the guest and wait until it stops (or ``timeout`` seconds pass)."""
        self.start()
        return self.wait(timeout)

    def stop(self) -> None:
        if self.machine is not None:
            self.machine.stop()

    def send_serial(self, data: bytes) -> None:
        """Type ``data`` into the guest's UART."""
        assert self.machine is not None
        self.machine.uart.receive(data)

    def _result(self, stop: Stop) -> RunResult:
        m = self.machine
        assert m is not None
        stats = merge(m.vcpu_stats(), m.io_bus.unknown, m.mmio_bus.unknown, (m.ended_ns or m.started_ns) - m.started_ns)
        stats.tsc_khz = m.tsc_khz()
        stats.boot_protocol = m.boot_protocol
        if self.console.first_byte_ns is not None and m.started_ns:
            stats.first_output_s = (self.console.first_byte_ns - m.started_ns) / 1e9
        return RunResult(stop.reason, exit_status_for(stop), stop.detail, self.console.output, stats)

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        self.console.flush()
        if self._serial_file is not None:
            self._serial_file.close()
            self._serial_file = None
