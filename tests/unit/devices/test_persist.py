"""Device state records: every device saves a frozen record, round trips through the snapshot
format, and refuses a crafted record in one DeviceError/UntrustedInput line, changing nothing."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtkit import records
from virtkit.devices.contract import Persistent
from virtkit.devices.disk import RawImage
from virtkit.devices.hypercall import Hypercall, HypercallDevice
from virtkit.devices.legacy import uart
from virtkit.devices.legacy.ata import ST_DRQ, AtaController
from virtkit.devices.legacy.i8042 import I8042
from virtkit.devices.legacy.post import PostPort
from virtkit.devices.legacy.rtc import CmosRtc
from virtkit.devices.virtio import persist as vpersist
from virtkit.devices.virtio import spec
from virtkit.errors import DeviceError, VirtkitError
from virtkit.memory import GuestMemory
from virtkit.snapshot import format

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def disk(tmp_path: Path) -> RawImage:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(16 * 512))
    d = RawImage(str(img))
    yield d
    d.close()


def devices(disk: RawImage, mem: GuestMemory) -> dict[str, Persistent]:
    return {
        "uart0": uart.Uart16550(lambda b: None),
        "i8042": I8042(lambda: None),
        "rtc": CmosRtc(64 << 20),
        "post": PostPort(),
        "ata0": AtaController(disk, lambda level: None),
        "hypercall": HypercallDevice(mem, lambda b: None, power_off=lambda s: None),
    }


def through_snapshot_format(dev: Persistent) -> Any:
    """save -> JSON document -> state file -> back -> record, as a snapshot does."""
    doc = format.unpack(format.pack({"d": records.to_json(dev.save())}))
    return records.parse(dev.state_type(), doc["d"], what="devices.d")


def test_every_device_round_trips_its_record(disk: RawImage) -> None:
    mem = GuestMemory([(0, 1 << 20)])
    try:
        for name, dev in devices(disk, mem).items():
            state = dev.save()
            assert dataclasses.is_dataclass(state) and type(state).__dataclass_params__.frozen, name  # type: ignore[attr-defined]
            assert hasattr(type(state), "__slots__"), name
            back = through_snapshot_format(dev)
            assert back == state, name
            dev.restore(back)
            assert dev.save() == state, name
    finally:
        mem.close()


CRAFTED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # what a hand-edited snapshot tried: a string in the UART's receive FIFO (put there under -O)
    ("uart0", lambda d: d.update(rx="abc"), "must be a byte string"),
    ("uart0", lambda d: d.update(lcr=256), "is 256, more than 255"),
    ("uart0", lambda d: d.update(rx=b"x" * 5000), "longer than 4096"),
    ("uart0", lambda d: d.update(extra=1), "unknown field"),
    ("i8042", lambda d: d.update(pending_cmd=0xAA), "no command 0xaa waits"),
    ("rtc", lambda d: d.update(nvram=b"\0" * 10), "shorter than 128"),
    ("rtc", lambda d: d.update(index=0x80), "more than 127"),
    ("post", lambda d: d.update(writes=-1), "less than 0"),
    # a short counter list used to raise IndexError on the vCPU thread at the next call
    ("hypercall", lambda d: d.update(calls=[0, 0]), "call counters"),
    ("hypercall", lambda d: d.update(calls="x"), "must be an array"),
    # the ATA restore used to setattr() every key it was given
    ("ata0", lambda d: d.update(disk=None), "unknown field 'disk'"),
    ("ata0", lambda d: d.update(_set_irq=1), "unknown field"),
    ("ata0", lambda d: d.update(hob=[0, 0, 0, 300]), "more than 255"),
    (
        "ata0",
        lambda d: d.update(status=ST_DRQ, writing=True, buffer=b"\0" * 512, remaining=1, lba=1 << 40),
        "outside the disk",
    ),
    ("ata0", lambda d: d.update(buffer=b"\0" * 100, pos=50), "100-byte transfer buffer"),
]


@pytest.mark.parametrize(("name", "tamper", "message"), CRAFTED, ids=[f"{c[0]}-{i}" for i, c in enumerate(CRAFTED)])
def test_a_crafted_record_is_refused_in_one_line_and_changes_nothing(
    disk: RawImage, name: str, tamper: Callable[[dict[str, Any]], None], message: str
) -> None:
    mem = GuestMemory([(0, 1 << 20)])
    try:
        dev = devices(disk, mem)[name]
        before = dev.save()
        doc = records.to_json(before)
        tamper(doc)
        with pytest.raises(VirtkitError, match=message) as e:
            dev.restore(records.parse(dev.state_type(), doc, what=f"devices.{name}"))
        assert "\n" not in str(e.value)
        assert dev.save() == before
    finally:
        mem.close()


def test_a_record_of_another_device_is_refused(disk: RawImage) -> None:
    mem = GuestMemory([(0, 1 << 20)])
    try:
        devs = devices(disk, mem)
        with pytest.raises(DeviceError):
            devs["uart0"].restore(devs["rtc"].save())
    finally:
        mem.close()


def test_record_bounds_match_the_devices() -> None:
    """The records' literal bounds are the devices' constants (records cannot import devices:
    the devices import records lazily)."""
    hints = records._hints(vpersist.QueueState)
    assert hints["size"].__metadata__[0].hi == spec.MAX_QUEUE_SIZE
    from virtkit.devices.legacy import persist as lpersist

    assert records._hints(lpersist.UartState)["rx"].__metadata__[0].max_len == uart.RX_FIFO_LIMIT
    from virtkit.devices import persist as dpersist

    assert records._hints(dpersist.HypercallState)["calls"].__metadata__[0].max_len >= len(Hypercall)


def _functions(tree: ast.AST) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def test_no_assert_or_type_ignore_in_any_restore_path() -> None:
    """Under python -O an assert is gone: a restore path must validate with real checks. And a
    type: ignore there means an unchecked value reached a device."""
    names = {"restore", "restore_device", "from_state", "parse", "apply", "apply_vcpu", "_record", "_value"}
    files = [
        *sorted((ROOT / "virtkit" / "devices").rglob("*.py")),
        ROOT / "virtkit" / "snapshot" / "vmstate.py",
        ROOT / "virtkit" / "records.py",
    ]
    offenders = []
    for path in files:
        text = path.read_text()
        for fn in _functions(ast.parse(text)):
            if fn.name not in names:
                continue
            body = ast.get_source_segment(text, fn) or ""
            if any(isinstance(n, ast.Assert) for n in ast.walk(fn)) or "type: ignore" in body:
                offenders.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}")
    # the files that rebuild a machine from a snapshot or a migration stream: nowhere in them
    for path in (ROOT / "virtkit" / "snapshot" / "snapshot.py", ROOT / "virtkit" / "migration" / "target.py"):
        text = path.read_text()
        offenders += [
            f"{path.relative_to(ROOT)}:{n.lineno} assert"
            for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.Assert)
        ]
        offenders += [f"{path.relative_to(ROOT)}: type: ignore"] * ("type: ignore" in text)
    assert not offenders, offenders
