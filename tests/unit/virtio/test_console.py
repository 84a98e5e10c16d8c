"""virtio-console (virtio 1.2 §5.3): transmit, receive, emergency write, resize."""

from __future__ import annotations

import pytest
from virtio_driver import Machine, Rig  # type: ignore[import-not-found]

from virtkit.devices.virtio import spec
from virtkit.devices.virtio.console import EMERG_WR_OFFSET, F_EMERG_WRITE, F_SIZE, ConsoleDevice
from virtkit.devices.virtio.mmio import CONFIG_OFFSET


def console(machine: Machine, **kw: object) -> tuple[Rig, bytearray]:
    out = bytearray()
    return machine.attach(ConsoleDevice(out.extend, **kw)), out  # type: ignore[arg-type]


def test_transmit_goes_to_the_sink(machine: Machine) -> None:
    rig, out = console(machine)
    rx, tx = rig.driver.init()
    a, b = tx.buffer(b"hello, "), tx.buffer(b"world\n")
    head = tx.add([(a, 7, False), (b, 6, False)])
    rig.driver.kick(1)
    assert out == b"hello, world\n"
    assert tx.take_used() == [(head, 0)]  # nothing written into a transmit buffer
    assert rig.device.bytes_out == 13


def test_transmit_through_an_indirect_table(machine: Machine) -> None:
    rig, out = console(machine)
    rx, tx = rig.driver.init()
    tx.add([(tx.buffer(b"in"), 2, False), (tx.buffer(b"direct"), 6, False)], indirect=True)
    rig.driver.kick(1)
    assert out == b"indirect"


def test_large_transmit_is_streamed_in_bounded_pieces(machine: Machine) -> None:
    pieces: list[int] = []
    rig = machine.attach(ConsoleDevice(lambda b: pieces.append(len(b))), slice_size=1 << 20)
    rx, tx = rig.driver.init()
    tx.add([(tx.buffer(200_000), 200_000, False)])
    rig.driver.kick(1)
    assert sum(pieces) == 200_000 and max(pieces) <= 64 * 1024


def test_input_waits_for_receive_buffers(machine: Machine) -> None:
    rig, _ = console(machine)
    con = rig.device
    rx, tx = rig.driver.init()
    assert con.receive(b"early") == 5
    assert rx.take_used() == [] and con.pending_input == 5
    buf = rx.buffer(3)
    head = rx.add([(buf, 3, True)])
    rig.driver.kick(0)
    assert rx.take_used() == [(head, 3)] and machine.mem.read(buf, 3) == b"ear"
    buf2 = rx.buffer(16)
    head2 = rx.add([(buf2, 16, True)])
    rig.driver.kick(0)
    assert rx.take_used() == [(head2, 2)] and machine.mem.read(buf2, 2) == b"ly"
    assert con.pending_input == 0


def test_input_is_delivered_at_once_when_buffers_wait(machine: Machine) -> None:
    rig, _ = console(machine)
    rx, tx = rig.driver.init()
    bufs = [rx.buffer(4) for _ in range(3)]
    for b in bufs:
        rx.add([(b, 4, True)])
    rig.driver.kick(0)
    assert rx.take_used() == []  # no input yet: buffers stay with the device
    rig.device.receive(b"abcdef")
    assert [n for _, n in rx.take_used()] == [4, 2]
    assert machine.mem.read(bufs[0], 4) == b"abcd" and machine.mem.read(bufs[1], 2) == b"ef"
    assert rig.irq.triggers == 1


def test_input_before_driver_ok_is_kept(machine: Machine) -> None:
    rig, _ = console(machine)
    rig.device.receive(b"boot")
    rx, tx = rig.driver.init()
    buf = rx.buffer(8)
    rx.add([(buf, 8, True)])
    rig.driver.kick(0)
    assert machine.mem.read(buf, 4) == b"boot"


def test_no_input_after_the_driver_failed(machine: Machine) -> None:
    rig, _ = console(machine)
    rx, tx = rig.driver.init()
    rx.add([(rx.buffer(8), 8, True)])
    rig.driver.kick(0)
    rig.driver.set_status(spec.DeviceStatus.FAILED)
    rig.device.receive(b"late")
    assert rx.take_used() == [] and rig.device.pending_input == 4


def test_input_is_bounded(machine: Machine) -> None:
    rig, _ = console(machine, input_limit=10)
    assert rig.device.receive(b"x" * 25) == 10
    assert rig.device.input_dropped == 15


def test_emergency_write_works_before_any_setup(machine: Machine) -> None:
    rig, out = console(machine)
    assert rig.driver.device_features() & F_EMERG_WRITE
    rig.transport.mmio_write(CONFIG_OFFSET + EMERG_WR_OFFSET, 4, 0x1234_5621)  # the lower byte: "!"
    rig.transport.mmio_write(CONFIG_OFFSET + EMERG_WR_OFFSET, 1, ord("\n"))
    assert out == b"!\n"


def test_size_feature_only_with_a_size(machine: Machine) -> None:
    with_size, _ = console(machine, size=(80, 24))
    without, _ = console(machine)
    assert with_size.driver.device_features() & F_SIZE
    assert not without.driver.device_features() & F_SIZE


def test_wrong_direction_buffers_fail_only_that_request(machine: Machine) -> None:
    rig, out = console(machine)
    rx, tx = rig.driver.init()
    rig.device.receive(b"data")
    rx.add([(rx.buffer(b"ro"), 2, False)])  # device-readable in the receiveq (§5.3.6.1)
    rig.driver.kick(0)
    tx.add([(tx.buffer(4), 4, True)])  # device-writable in the transmitq
    rig.driver.kick(1)
    assert [n for _, n in rx.take_used()] == [0] and [n for _, n in tx.take_used()] == [0]
    assert rig.device.failed_requests == 2 and out == b""
    # both queues keep working
    buf = rx.buffer(8)
    rx.add([(buf, 8, True)])
    rig.driver.kick(0)
    tx.add([(tx.buffer(b"ok"), 2, False)])
    rig.driver.kick(1)
    assert machine.mem.read(buf, 4) == b"data" and out == b"ok"
    assert not rig.driver.needs_reset


def test_a_failing_sink_does_not_break_the_device(machine: Machine) -> None:
    def sink(data: bytes) -> None:
        raise BrokenPipeError("terminal closed")

    rig = machine.attach(ConsoleDevice(sink))
    rx, tx = rig.driver.init()
    head = tx.add([(tx.buffer(b"lost"), 4, False)])
    rig.driver.kick(1)
    assert tx.take_used() == [(head, 0)] and rig.transport.internal_errors == 0


@pytest.mark.parametrize("event_idx", [True, False])
def test_interrupts_respect_suppression(machine: Machine, event_idx: bool) -> None:
    rig, _ = console(machine)
    drop = 0 if event_idx else spec.F_EVENT_IDX
    rx, tx = rig.driver.init(drop=drop)
    if event_idx:
        tx.used_event = 2  # interrupt me when the third buffer is used
    else:
        tx.avail_flags = spec.VIRTQ_AVAIL_F_NO_INTERRUPT
    for _ in range(2):
        tx.add([(tx.buffer(b"x"), 1, False)])
        rig.driver.kick(1)
    assert rig.irq.triggers == 0
    if not event_idx:
        tx.avail_flags = 0
    tx.add([(tx.buffer(b"x"), 1, False)])
    rig.driver.kick(1)
    assert rig.irq.triggers == 1


def test_save_restore_keeps_pending_input_and_size(machine: Machine) -> None:
    rig, _ = console(machine, size=(100, 30))
    rig.device.receive(b"pending")
    state = rig.device.save()
    other, _ = console(machine)
    other.device.restore(state)
    assert other.device.pending_input == 7 and other.driver.config(0, 2) == 100
