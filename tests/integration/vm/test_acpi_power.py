"""Power-off and reset through the ACPI registers the FADT describes (devices/legacy/acpi_power.py).

guests/acpipower.c finds the RSDP by scanning the BIOS area, follows the XSDT to the FADT and the
DSDT (checking every checksum), and writes SLP_TYP(\\_S5) << 2 | SLP_EN to SLEEP_CONTROL_REG
(action=off) or RESET_VALUE to RESET_REG (action=reset): what Linux does for `poweroff` and
`reboot` on a hardware-reduced ACPI platform. Both end the VM cleanly, with status 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from virtkit import VM
from virtkit.stop import StopReason

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")

TABLES = "acpipower: reset_reg=io:0xc4a reset_value=0x1 s5_slp_typ=5"


@pytest.mark.parametrize("boot,elf", [("multiboot", "acpipower.elf"), ("direct64", "acpipower64.elf")])
def test_acpi_power_off_ends_the_vm(guests: Path, boot: str, elf: str) -> None:
    with VM(guests / elf, boot=boot, cmdline="action=off") as vm:
        r = vm.run(timeout=20)
    assert r.reason is StopReason.POWER_OFF and r.exit_code == 0, (r.detail, r.serial_output)
    assert "sleep control register" in r.detail
    assert "sleep_control=io:0xc48 sleep_status=io:0xc49" in r.serial_output and TABLES in r.serial_output
    assert "still running" not in r.serial_output


def test_acpi_reset_register_ends_the_vm(guests: Path) -> None:
    with VM(guests / "acpipower.elf", cmdline="action=reset") as vm:
        r = vm.run(timeout=20)
    assert r.reason is StopReason.RESET and r.exit_code == 0, (r.detail, r.serial_output)
    assert "ACPI reset register" in r.detail and TABLES in r.serial_output


def test_the_tables_describe_every_vcpu_and_the_power_registers_with_smp(guests: Path) -> None:
    """The same tables with 2 vCPUs and paravirtual devices (virtio-mmio in the DSDT): the guest
    still finds the FADT and powers off."""
    with VM(guests / "acpipower.elf", vcpus=2, mode="para", cmdline="action=off") as vm:
        r = vm.run(timeout=20)
    assert r.reason is StopReason.POWER_OFF and r.exit_code == 0, (r.detail, r.serial_output)


@pytest.mark.parametrize("action,said", [("off", "power-off: guest powered off"), ("reset", "reset: guest wrote")])
def test_virtkit_run_exits_0_and_says_why(guests: Path, action: str, said: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "virtkit", "run", str(guests / "acpipower.elf"), "--cmdline", f"action={action}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert said in p.stderr and "Traceback" not in p.stderr
