"""The one-line note for a Linux guest whose init dies at its first system call on PVM."""

from __future__ import annotations

from virtkit.diagnose import linux_init_wall

BOOT = b"[ 40.1] Run /init as init process\r\n"
KILLED = b"[ 40.3] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\r\n"


def test_init_killed_after_it_started_on_pvm_is_explained() -> None:
    note = linux_init_wall(b"...\r\n" + BOOT + KILLED, "pvm")
    assert note is not None and "first system call" in note and "\n" not in note


def test_no_note_on_vtx_or_without_the_story() -> None:
    assert linux_init_wall(BOOT + KILLED, "vmx") is None  # there, an init that dies is the guest's business
    assert linux_init_wall(KILLED, "pvm") is None  # killed before any /init ran
    assert linux_init_wall(BOOT, "pvm") is None
    assert linux_init_wall(KILLED + BOOT, "pvm") is None  # an earlier boot's panic, then a new /init
