"""virtio-rng (virtio 1.2 §5.4): random bytes into device-writable buffers, bounded per request."""

from __future__ import annotations

from virtio_driver import Machine  # type: ignore[import-not-found]

from virtkit.devices.virtio.rng import RngDevice


def test_fills_buffers_with_host_randomness(machine: Machine) -> None:
    rig = machine.attach(RngDevice())
    (q,) = rig.driver.init()
    a, b = q.buffer(16), q.buffer(16)
    head = q.add([(a, 16, True), (b, 16, True)])
    rig.driver.kick(0)
    assert q.take_used() == [(head, 32)]
    data = machine.mem.read(a, 16) + machine.mem.read(b, 16)
    assert data != bytes(32)  # os.urandom: 2^-256 odds of a false failure


def test_bounded_per_request(machine: Machine) -> None:
    rig = machine.attach(RngDevice(max_request=1000, source=lambda n: b"\xee" * n), slice_size=1 << 20)
    (q,) = rig.driver.init()
    buf = q.buffer(300_000)
    head = q.add([(buf, 300_000, True)])
    rig.driver.kick(0)
    assert q.take_used() == [(head, 1000)]  # §5.4.6.2: less than the whole buffer is allowed
    assert machine.mem.read(buf + 999, 2) == b"\xee\0"


def test_readable_buffers_fail_the_request(machine: Machine) -> None:
    rig = machine.attach(RngDevice(source=lambda n: b"\xee" * n))
    (q,) = rig.driver.init()
    ro = q.buffer(b"keep")
    head = q.add([(ro, 4, False), (q.buffer(4), 4, True)])
    rig.driver.kick(0)
    assert q.take_used() == [(head, 0)] and machine.mem.read(ro, 4) == b"keep"
    assert rig.device.failed_requests == 1
    head2 = q.add([(q.buffer(4), 4, True)])
    rig.driver.kick(0)
    assert q.take_used() == [(head2, 4)]
