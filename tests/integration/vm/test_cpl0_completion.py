"""CPL0 completion on real KVM: guests/cpl0.c executes at CPL0 the instructions PVM's emulator
rejects and checks each architectural result itself; here we check its verdicts and that the VMM
counted what it completed (virtkit/cpl0.py). On VT-x/AMD-V the same instructions run natively, so
the results must hold and nothing is counted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from virtkit import VM
from virtkit.kvm.flavor import kvm_flavor
from virtkit.stop import StopReason

pytestmark = pytest.mark.usefixtures("kvm", "no_leaks")


def test_cpl0_instructions_are_completed_exactly(guests: Path) -> None:
    with VM(guests / "cpl0.elf") as vm:
        r = vm.run(timeout=60)
    out = r.serial_output
    assert r.reason is StopReason.DEBUG_EXIT, (r.detail, out)
    assert "cpl0: done failures=0" in out and "cpl0: FAIL" not in out, out
    assert r.exit_code == 1
    m = re.search(r"cpl0: features (.*)", out)
    assert m, out
    has = {k: v == "1" for k, v in (kv.split("=") for kv in m[1].split())}
    done = r.stats.completed
    if kvm_flavor() != "pvm":
        assert done == {}
        return
    # every CPL0 int3 / int n / xgetbv / stac / clac goes through the VMM on PVM
    assert done.get("int3") == 1 and done.get("int") == 1, done
    assert done.get("xgetbv(#UD)") == 1, done
    if has["xsave"]:
        assert done.get("xgetbv") == 1, done
    if has["smap"]:
        assert done.get("stac") == 1 and done.get("clac") == 1, done
    else:
        assert done.get("stac(#UD)") == 1, done
    for name in ("rdpru", "invpcid"):
        if not has[name]:
            assert done.get(f"{name}(#UD)") == 1, done
    # KVM's emulator handles some of these itself (here clflush and clflushopt): anything the VMM
    # counted must be one the guest executed, and the flushes at most once each
    allowed = {"int3", "int", "xgetbv", "xgetbv(#UD)", "stac", "clac", "stac(#UD)", "movbe", "movbe(#UD)"}
    allowed |= {"clflush", "clflushopt", "clwb", "clflush(#UD)", "clflushopt(#UD)", "clwb(#UD)"}
    allowed |= {"rdpru(#UD)", "invpcid(#UD)"}
    assert set(done) <= allowed, done
    assert all(done.get(k, 0) <= 1 for k in ("clflush", "clflushopt", "clwb")), done


def test_stats_table_lists_the_completed_instructions(guests: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from virtkit.cli import main

    rc = main(["run", str(guests / "cpl0.elf"), "--stats"])
    captured = capsys.readouterr()
    out = captured.err  # the --stats table goes to stderr, the guest's console to stdout
    assert rc == 1, captured  # the guest's debug-exit value 0 -> status (0 << 1) | 1
    if kvm_flavor() == "pvm":
        assert "CPL0 instructions completed by the VMM" in out
        assert re.search(r"^  int3 +1$", out, re.M), out
    else:
        assert "CPL0 instructions completed" not in out
