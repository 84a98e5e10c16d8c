"""virtio-mmio version 2 (virtio 1.2 §4.2): registers, the §3.1.1 sequence, negotiation, interrupts."""

from __future__ import annotations

import os
import threading

import pytest
from virtio_driver import HOLE, FakeDriver, Machine, MiB, RecordingInterrupt  # type: ignore[import-not-found]

from virtkit.arch import layout
from virtkit.devices.virtio import spec
from virtkit.devices.virtio.console import ConsoleDevice
from virtkit.devices.virtio.interrupt import IrqFdInterrupt, IrqLineInterrupt
from virtkit.devices.virtio.mmio import (
    CONFIG_OFFSET,
    NotifyRegistration,
    Reg,
    VirtioMmioTransport,
)
from virtkit.devices.virtio.rng import RngDevice
from virtkit.errors import DeviceError

S = spec.DeviceStatus


def rng_request(drv: FakeDriver, length: int = 16) -> int:
    q = drv.queues[0]
    return q.add([(q.buffer(length), length, True)])


def test_identity_registers(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    assert d.rd(Reg.MAGIC_VALUE) == 0x74726976
    assert d.rd(Reg.VERSION) == 2
    assert d.rd(Reg.DEVICE_ID) == spec.DeviceType.ENTROPY
    assert d.rd(Reg.VENDOR_ID) == 0x54494B56


def test_offered_features(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    features = d.device_features()
    assert features & spec.F_VERSION_1 and features & spec.F_EVENT_IDX and features & spec.F_INDIRECT_DESC
    d.wr(Reg.DEVICE_FEATURES_SEL, 7)
    assert d.rd(Reg.DEVICE_FEATURES) == 0


def test_init_sequence_and_io(machine: Machine) -> None:
    rig = machine.attach(RngDevice(source=lambda n: b"\x5a" * n))
    d = rig.driver
    (q,) = d.init()
    assert d.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert rig.device.acked_features == rig.device.offered_features
    head = rng_request(d, 8)
    d.kick(0)
    assert q.take_used() == [(head, 8)]
    assert rig.irq.triggers == 1 and rig.irq.asserted
    assert d.ack_interrupts() == spec.InterruptReason.USED_BUFFER
    assert not rig.irq.asserted and d.rd(Reg.INTERRUPT_STATUS) == 0


def test_features_ok_needs_version_1(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    assert not d.negotiate(drop=spec.F_VERSION_1)
    assert not d.status & S.FEATURES_OK
    assert d.negotiate()  # after a reset the same driver can try again


def test_features_ok_refused_for_features_not_offered(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    assert not d.negotiate(accept=d.device_features() | 1 << 3)
    assert not d.negotiate(accept=d.device_features() | spec.F_RING_PACKED)


def test_features_ok_refused_for_unknown_feature_words(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    d.wr(Reg.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    d.wr(Reg.DRIVER_FEATURES_SEL, 9)
    d.wr(Reg.DRIVER_FEATURES, 1)
    d.wr(Reg.DRIVER_FEATURES_SEL, 1)
    d.wr(Reg.DRIVER_FEATURES, 1)  # VERSION_1
    d.set_status(S.FEATURES_OK)
    assert not d.status & S.FEATURES_OK


def test_features_frozen_after_features_ok(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    d = rig.driver
    assert d.negotiate(accept=spec.F_VERSION_1)
    d.wr(Reg.DRIVER_FEATURES_SEL, 0)
    d.wr(Reg.DRIVER_FEATURES, spec.F_EVENT_IDX)
    assert rig.device.acked_features == spec.F_VERSION_1 == rig.transport.driver_features


def test_status_order_is_enforced(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    d.wr(Reg.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)  # DRIVER_OK before FEATURES_OK
    assert d.status == S.ACKNOWLEDGE | S.DRIVER
    d.wr(Reg.STATUS, S.ACKNOWLEDGE)  # clearing DRIVER is not allowed (§2.1.1)
    assert d.status == S.ACKNOWLEDGE | S.DRIVER
    d.wr(Reg.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.DEVICE_NEEDS_RESET)  # nor setting the device's bit
    assert d.status == S.ACKNOWLEDGE | S.DRIVER


def test_features_ok_before_driver_is_refused(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    d.wr(Reg.DRIVER_FEATURES_SEL, 1)
    d.wr(Reg.DRIVER_FEATURES, 1)
    d.wr(Reg.STATUS, S.ACKNOWLEDGE | S.FEATURES_OK)
    assert d.status == S.ACKNOWLEDGE


def test_reset_clears_everything(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    d = rig.driver
    d.init()
    rng_request(d)
    d.kick(0)
    assert rig.irq.asserted
    d.wr(Reg.STATUS, 0)
    assert d.status == 0 and d.rd(Reg.INTERRUPT_STATUS) == 0 and not rig.irq.asserted
    d.wr(Reg.QUEUE_SEL, 0)
    assert d.rd(Reg.QUEUE_READY) == 0
    assert rig.device.queues == [None] and not rig.device.active and rig.device.acked_features == 0
    (q,) = d.init()  # and it can be brought up again
    head = rng_request(d)
    d.kick(0)
    assert q.take_used() == [(head, 16)]


def test_queue_registers(machine: Machine) -> None:
    rig = machine.attach(ConsoleDevice(lambda b: None, queue_size=64))
    d = rig.driver
    d.wr(Reg.QUEUE_SEL, 1)
    assert d.rd(Reg.QUEUE_NUM_MAX) == 64
    d.wr(Reg.QUEUE_SEL, 2)
    assert d.rd(Reg.QUEUE_NUM_MAX) == 0  # no such queue (§4.2.3.2)
    d.wr(Reg.QUEUE_READY, 1)
    assert d.rd(Reg.QUEUE_READY) == 0


def test_queue_ready_needs_features_ok(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    d.wr(Reg.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    d.wr(Reg.QUEUE_SEL, 0)
    d.wr(Reg.QUEUE_NUM, 16)
    d.wr(Reg.QUEUE_READY, 1)
    assert d.rd(Reg.QUEUE_READY) == 0 and not d.needs_reset


def test_queue_configuration_is_frozen_while_ready(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    d = rig.driver
    (q,) = d.init()
    d.wr(Reg.QUEUE_SEL, 0)
    d.wr(Reg.QUEUE_DESC_LOW, HOLE)  # §4.2.2.2: not allowed while ready; ignored
    d.wr(Reg.QUEUE_NUM, 2)
    head = rng_request(d)
    d.kick(0)
    assert q.take_used() == [(head, 16)]
    d.wr(Reg.QUEUE_READY, 0)  # disabling the queue stops it
    assert d.rd(Reg.QUEUE_READY) == 0 and rig.device.queues[0] is None
    rng_request(d)
    d.kick(0)
    assert q.take_used() == []


def test_64_bit_ring_addresses(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    d = rig.driver
    d.negotiate()
    d.setup_queue(0, 16, desc=8 * MiB, avail=8 * MiB + 0x1000, used=8 * MiB + 0x2000)  # the second region
    queue = rig.device.queues[0]
    assert queue is not None and (queue.desc_table, queue.avail_ring, queue.used_ring) == (
        8 * MiB,
        8 * MiB + 0x1000,
        8 * MiB + 0x2000,
    )
    d.wr(Reg.QUEUE_SEL, 0)
    d.wr(Reg.QUEUE_READY, 0)
    d.wr(Reg.QUEUE_DESC_HIGH, 1)  # 4 GiB + 8 MiB is not RAM here
    d.wr(Reg.QUEUE_READY, 1)
    assert rig.transport.queue_regs[0].desc == (1 << 32) | 8 * MiB
    assert d.needs_reset


def test_notifications_before_driver_ok_wait_for_it(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    d = rig.driver
    d.negotiate()
    q = d.setup_queue(0)
    head = rng_request(d)
    d.kick(0)  # §3.1.1: no notifications before DRIVER_OK; the device must not consume yet
    assert q.take_used() == []
    d.set_status(S.DRIVER_OK)
    assert q.take_used() == [(head, 16)]


def test_failed_driver_gets_no_service(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    d = rig.driver
    (q,) = d.init()
    d.set_status(S.FAILED)
    rng_request(d)
    d.kick(0)
    assert q.take_used() == []


@pytest.mark.parametrize("offset,size", [(Reg.STATUS, 1), (Reg.STATUS, 2), (Reg.STATUS + 1, 4), (Reg.MAGIC_VALUE, 8)])
def test_registers_only_answer_aligned_32_bit_accesses(machine: Machine, offset: int, size: int) -> None:
    rig = machine.attach(RngDevice())
    assert rig.transport.mmio_read(offset, size) == 0
    rig.transport.mmio_write(offset, size, 0xFF)
    assert rig.driver.status == 0


def test_write_only_and_missing_registers(machine: Machine) -> None:
    d = machine.attach(RngDevice()).driver
    assert d.rd(Reg.QUEUE_NOTIFY) == 0 and d.rd(Reg.DRIVER_FEATURES) == 0 and d.rd(0x0F8) == 0
    assert d.rd(Reg.SHM_LEN_LOW) == d.rd(Reg.SHM_LEN_HIGH) == 0xFFFF_FFFF  # no shared memory: -1
    assert d.rd(Reg.QUEUE_RESET) == 0
    d.wr(Reg.MAGIC_VALUE, 0)
    assert d.rd(Reg.MAGIC_VALUE) == 0x74726976


def test_config_space_and_generation(machine: Machine) -> None:
    con = ConsoleDevice(lambda b: None, size=(80, 25))
    rig = machine.attach(con)
    d = rig.driver
    d.init()
    assert (d.config(0, 2), d.config(2, 2)) == (80, 25)
    assert d.config(0, 4) == 80 | 25 << 16
    assert d.config(12, 4) == 0 and d.config(0, 3) == 0  # past the end / odd width
    gen = d.rd(Reg.CONFIG_GENERATION)
    con.resize(132, 43)
    assert d.rd(Reg.CONFIG_GENERATION) != gen
    assert (d.config(0, 2), d.config(2, 2)) == (132, 43)
    assert d.rd(Reg.INTERRUPT_STATUS) == spec.InterruptReason.CONFIG_CHANGE and rig.irq.triggers == 1


def test_interrupt_level_follows_interrupt_status(machine: Machine) -> None:
    con = ConsoleDevice(lambda b: None, size=(80, 25))
    rig = machine.attach(con)
    d = rig.driver
    rx, tx = d.init()
    rx.add([(rx.buffer(8), 8, True)])
    d.kick(0)
    con.receive(b"hi")
    con.resize(1, 1)
    # two events, two edges, one level change
    assert rig.irq.triggers == 2 and rig.irq.levels == [True]
    d.wr(Reg.INTERRUPT_ACK, spec.InterruptReason.USED_BUFFER)
    assert rig.irq.levels == [True]  # the config change is still pending
    d.wr(Reg.INTERRUPT_ACK, spec.InterruptReason.CONFIG_CHANGE)
    assert rig.irq.levels == [True, False]


def test_notify_registrations_and_layout() -> None:
    base = layout.VIRTIO_MMIO_BASE + 3 * layout.VIRTIO_MMIO_SIZE
    m = Machine()
    try:
        t = m.attach(ConsoleDevice(lambda b: None)).transport
        assert t.notify_registrations(base) == [
            NotifyRegistration(queue=0, addr=base + 0x50, length=4, datamatch=0),
            NotifyRegistration(queue=1, addr=base + 0x50, length=4, datamatch=1),
        ]
    finally:
        m.close()


def test_notify_is_the_ioeventfd_path(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    (q,) = rig.driver.init()
    head = rng_request(rig.driver)
    rig.transport.notify(0)  # what the machine's I/O thread calls when the ioeventfd fires
    assert q.take_used() == [(head, 16)]
    rig.transport.notify(7)  # no such queue: nothing happens
    assert rig.transport.internal_errors == 0 and not rig.driver.needs_reset


def test_concurrent_notifications_complete_each_request_once(machine: Machine) -> None:
    rig = machine.attach(RngDevice(queue_size=256))
    (q,) = rig.driver.init()
    heads = [rng_request(rig.driver, 4) for _ in range(200)]
    start = threading.Barrier(8)

    def kick() -> None:
        start.wait()
        for _ in range(50):
            rig.transport.notify(0)

    threads = [threading.Thread(target=kick) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    used = q.take_used()
    assert sorted(h for h, _ in used) == sorted(heads) and all(n == 4 for _, n in used)
    assert rig.transport.internal_errors == 0


def test_save_and_restore_mid_flight(machine: Machine) -> None:
    rig = machine.attach(ConsoleDevice(lambda b: None, size=(80, 25)))
    d = rig.driver
    rx, tx = d.init()
    for _ in range(3):
        rx.add([(rx.buffer(4), 4, True)])
    d.kick(0)
    rig.device.receive(b"abcdefgh")  # fills two buffers, one left
    rx.take_used()
    rig.device.receive(b"1234567")  # 4 bytes go out, 3 wait in the device
    state = rig.transport.save()
    # a fresh device and transport on the same guest memory, as after loading a snapshot
    out = bytearray()
    con2 = ConsoleDevice(out.extend, size=(1, 1))
    irq2 = RecordingInterrupt()
    t2 = VirtioMmioTransport(con2, machine.mem, irq2)
    t2.restore(state)
    assert t2.save() == state
    assert irq2.levels == [True]  # InterruptStatus was still set
    assert t2.mmio_read(CONFIG_OFFSET, 2) == 80 and con2.pending_input == 3
    rx.take_used()
    rx.add([(rx.buffer(8), 8, True)])
    t2.mmio_write(Reg.QUEUE_NOTIFY, 4, 0)
    assert [n for _, n in rx.take_used()] == [3]
    buf = tx.buffer(b"after restore")
    tx.add([(buf, 13, False)])
    t2.mmio_write(Reg.QUEUE_NOTIFY, 4, 1)
    assert out == b"after restore"


def test_restore_refuses_a_mismatched_state(machine: Machine) -> None:
    state = machine.attach(RngDevice()).transport.save()
    t = VirtioMmioTransport(ConsoleDevice(lambda b: None), machine.mem, RecordingInterrupt())
    with pytest.raises(DeviceError):
        t.restore(state)
    with pytest.raises(DeviceError):
        t.restore({"status": 0})


def test_irqfd_interrupt_writes_the_eventfd() -> None:
    irq = IrqFdInterrupt()
    try:
        irq.trigger()
        irq.trigger()
        irq.set_level(True)  # no effect on an eventfd
        assert os.eventfd_read(irq.fileno()) == 2
    finally:
        irq.close()


def test_irq_line_interrupt_level_and_edge() -> None:
    lines: list[int] = []
    level = IrqLineInterrupt(lines.append)
    level.trigger()
    level.set_level(True)
    level.set_level(False)
    assert lines == [1, 0]
    lines.clear()
    edge = IrqLineInterrupt(lines.append, edge=True)
    edge.set_level(True)
    edge.trigger()
    assert lines == [1, 0]
