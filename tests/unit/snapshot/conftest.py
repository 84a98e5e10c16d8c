"""A synthetic but well-formed snapshot document, built without /dev/kvm."""

from __future__ import annotations

import ctypes as C
from collections.abc import Callable
from typing import Any

import pytest

from virtkit.kvm import structs as S
from virtkit.snapshot import vmstate

MEMORY = 4 << 20
CHUNK = 256 << 10


def raw(t: type[C.Structure], **fields: int) -> bytes:
    s = t()
    for k, v in fields.items():
        setattr(s, k, v)
    return bytes(memoryview(s).cast("B"))


def make_document(vcpus: int = 1) -> dict[str, Any]:
    vm: dict[str, Any] = {name: raw(S.kvm_irqchip, chip_id=chip) for name, chip in vmstate.IRQCHIPS}
    vm["pit2"] = raw(S.kvm_pit_state2)
    vm["clock"] = raw(S.kvm_clock_data, clock=12345)
    cpus = []
    for i in range(vcpus):
        cpu: dict[str, Any] = {name: raw(t) for name, t in vmstate.VCPU_STRUCTS.items()}
        cpu.update(
            id=i,
            mp_state=0,
            tsc_khz=2_000_000,
            msrs=[[0x10, 42], [0xC0000080, 0x500]],
            cpuid=[[0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65], [1, 0, 0, 0, 0, 1, 1]],
        )
        cpus.append(cpu)
    return {
        "virtkit": "test",
        "created": 1.0,
        "host": {"kvm": "test"},
        "machine": {"memory": MEMORY, "vcpus": vcpus, "paravirt": False, "strict": False, "disks": []},
        "memory": {
            "file": "memory-test.bin",
            "size": MEMORY,
            "regions": [[0, MEMORY]],
            "chunk": CHUNK,
            "crc32": [[0] * (MEMORY // CHUNK)],
            "written": 0,
        },
        "vm": vm,
        "vcpus": cpus,
        "devices": {"uart0": {"ier": 0, "rx": b"ab"}, "rtc": {"index": 0, "nvram": bytes(128)}},
    }


@pytest.fixture
def document() -> dict[str, Any]:
    return make_document()


@pytest.fixture
def document_factory() -> Callable[..., dict[str, Any]]:
    return make_document
