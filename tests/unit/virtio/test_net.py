"""virtio-net (virtio 1.2 §5.1) with a fake frame backend: features and config, transmit, receive,
the bounded backlog, hostile descriptors, and save/restore of its state record."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from virtio_driver import Machine, Rig  # type: ignore[import-not-found]

from virtkit import records
from virtkit.devices.virtio import spec
from virtkit.devices.virtio.net import NetDevice, parse_mac
from virtkit.devices.virtio.net import device as net
from virtkit.devices.virtio.net.persist import NetState
from virtkit.devices.virtio.persist import TransportState
from virtkit.errors import DeviceError, VirtkitError
from virtkit.snapshot import format

MAC = bytes.fromhex("02766b000001")
HDR = bytes(12)


class FakeBackend:
    """Frames the host would read (``incoming``) and the frames the device sent (``sent``)."""

    def __init__(self) -> None:
        self.incoming: list[bytes] = []
        self.sent: list[bytes] = []
        self.accept = True
        self.closed = 0

    def send(self, frame: bytes) -> bool:
        if self.accept:
            self.sent.append(frame)
        return self.accept

    def recv(self) -> bytes | None:
        return self.incoming.pop(0) if self.incoming else None

    def close(self) -> None:
        self.closed += 1


def frame(n: int = 60, fill: int = 0xAB) -> bytes:
    return b"\xff" * 6 + MAC + b"\x08\x00" + bytes([fill]) * (n - 14)


def card(machine: Machine, **kw: Any) -> tuple[Rig, FakeBackend]:
    backend = FakeBackend()
    return machine.attach(NetDevice(backend, MAC, **kw)), backend


def test_offers_mac_and_status_and_no_offload(machine: Machine) -> None:
    rig, _ = card(machine)
    offered = rig.driver.device_features()
    assert offered & net.F_MAC and offered & net.F_STATUS and offered & spec.F_VERSION_1
    # offloads off by default: no checksum, no segmentation, no mergeable buffers
    assert offered & (net.F_CSUM | net.F_GUEST_CSUM | net.F_MRG_RXBUF | (0x1FF << 7)) == 0  # bits 7-15: GSO
    assert rig.transport.mmio_read(0x008, 4) == spec.DeviceType.NET
    rig.driver.init()
    assert bytes(rig.driver.config(i, 1) for i in range(6)) == MAC
    assert rig.driver.config(6, 2) == net.S_LINK_UP
    assert rig.driver.config(8, 2) == 0  # max_virtqueue_pairs does not exist without MQ (§5.1.4)


def test_a_driver_asking_for_an_offload_is_refused(machine: Machine) -> None:
    rig, _ = card(machine)
    assert not rig.driver.negotiate(rig.driver.device_features() | net.F_CSUM)


def test_transmit_sends_the_frame_without_its_header(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    f = frame(100)
    # header and frame split over descriptors anywhere (§2.7.4.1)
    head = tx.add(
        [(tx.buffer(HDR[:5]), 5, False), (tx.buffer(HDR[5:] + f[:20]), 27, False), (tx.buffer(f[20:]), 80, False)]
    )
    rig.driver.kick(1)
    assert backend.sent == [f]
    assert tx.take_used() == [(head, 0)]
    assert rig.device.tx_frames == 1 and rig.device.failed_requests == 0


def test_transmit_dropped_by_the_host_is_counted(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    backend.accept = False
    head = tx.add([(tx.buffer(HDR + frame()), 72, False)])
    rig.driver.kick(1)
    assert tx.take_used() == [(head, 0)] and rig.device.tx_dropped == 1


@pytest.mark.parametrize(
    ("bufs", "why"),
    [
        ([(HDR + frame(), False), (b"\0" * 4, True)], "device-writable"),
        ([(HDR + frame()[:13], False)], "not an Ethernet frame"),
        ([(HDR + frame(net.MAX_FRAME + 1), False)], "not an Ethernet frame"),
        ([(bytes([net.HDR_F_NEEDS_CSUM]) + HDR[1:] + frame(), False)], "offload"),
        ([(b"\0\x01" + HDR[2:] + frame(), False)], "offload"),  # gso_type TCPV4
        ([(HDR[:8], False)], "not an Ethernet frame"),
    ],
)
def test_hostile_transmit_chains_fail_alone(machine: Machine, bufs: list[tuple[bytes, bool]], why: str) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    bad = tx.add([(tx.buffer(data), len(data), writable) for data, writable in bufs])
    good = tx.add([(tx.buffer(HDR + frame()), 72, False)])
    rig.driver.kick(1)
    assert tx.take_used() == [(bad, 0), (good, 0)]
    assert backend.sent == [frame()]
    assert rig.device.failed_requests == 1 and why in (rig.device.last_failure or "")
    assert not rig.driver.needs_reset


def test_transmit_buffer_outside_ram_and_oversized_chains_fail(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    outside = tx.add([(tx.buffer(HDR), 12, False), (0xFFFF_F000, 60, False)])
    # a chain that describes more than a device request may move (queue.py's max_chain_bytes)
    huge = tx.add([(tx.buffer(HDR), 12, False), (tx.buffer(16), net.MAX_CHAIN, False)])
    rig.driver.kick(1)
    assert [h for h, _ in tx.take_used()] == [outside, huge]
    assert backend.sent == [] and rig.device.failed_requests == 2


def test_a_descriptor_loop_stops_the_queue_not_the_vmm(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    tx.write_desc(0, tx.buffer(HDR + frame()), 72, flags=1, nxt=1)  # NEXT
    tx.write_desc(1, tx.buffer(8), 8, flags=1, nxt=0)  # ... back to 0
    tx.publish(0)
    rig.driver.kick(1)
    assert rig.driver.needs_reset and backend.sent == []


def test_receive_fills_a_posted_buffer_and_interrupts(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    rx.avail_flags = 0  # interrupts wanted
    buf = rx.buffer(1526)
    head = rx.add([(buf, 1526, True)])
    rig.driver.kick(0)
    backend.incoming.append(frame(98))
    rig.device.backend_readable()
    assert rx.take_used() == [(head, 12 + 98)]
    flags, gso, hdr_len, gso_size, cstart, coff, num_buffers = struct.unpack("<BBHHHHH", machine.mem.read(buf, 12))
    assert (flags, gso, num_buffers) == (0, net.GSO_NONE, 1)  # §5.1.6.4 without MRG_RXBUF
    assert machine.mem.read(buf + 12, 98) == frame(98)
    assert rig.irq.triggers == 1 and rig.device.rx_frames == 1


def test_frames_wait_for_buffers_in_a_bounded_backlog(machine: Machine) -> None:
    rig, backend = card(machine, rx_backlog=4)
    rx, tx = rig.driver.init()
    backend.incoming.extend(frame(60, fill=i) for i in range(6))
    rig.device.backend_readable()
    # the fd was read to the end (no spinning on a readable TAP); 4 held, the 2 newest dropped
    assert backend.incoming == [] and rig.device.pending_frames == 4 and rig.device.rx_dropped == 2
    bufs = [rx.buffer(1526) for _ in range(5)]
    heads = [rx.add([(b, 1526, True)]) for b in bufs]
    rig.driver.kick(0)
    used = rx.take_used()
    assert [h for h, _ in used] == heads[:4]  # the fifth buffer stays posted for the next frame
    assert [machine.mem.read(b + 12, 60) for b in bufs[:4]] == [frame(60, fill=i) for i in range(4)]
    assert rig.device.pending_frames == 0


def test_one_busy_call_takes_a_bounded_number_of_frames(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    backend.incoming.extend(frame() for _ in range(net.RX_BUDGET + 5))
    rig.device.backend_readable()
    assert len(backend.incoming) == 5  # the rest is for the next round of the I/O thread


def test_frames_before_driver_ok_and_odd_sizes_are_dropped(machine: Machine) -> None:
    rig, backend = card(machine)
    backend.incoming.append(frame())
    rig.device.backend_readable()
    assert rig.device.rx_dropped == 1 and rig.device.pending_frames == 0
    rx, tx = rig.driver.init()
    backend.incoming.extend([b"\0" * 10, frame(net.MAX_FRAME + 1)])
    rig.device.backend_readable()
    assert rig.device.rx_dropped == 3 and rig.device.pending_frames == 0


def test_hostile_receive_buffers(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    readable = rx.add([(rx.buffer(1526), 1526, False)])  # not device-writable (§5.1.6.3.1)
    small = rx.add([(rx.buffer(40), 40, True)])  # too small for the frame: the frame is lost
    outside = rx.add([(0xFFFF_F000, 1526, True)])
    good_buf = rx.buffer(1526)
    good = rx.add([(good_buf, 1526, True)])
    backend.incoming.extend([frame(60, 1), frame(60, 2)])
    rig.device.backend_readable()
    used = dict(rx.take_used())
    assert used[readable] == 0 and used[small] == 0 and used[outside] == 0
    # frame 1 survived the readable and out-of-RAM buffers, was lost to the small one; frame 2 arrived
    assert used[good] == 72 and machine.mem.read(good_buf + 12, 60) == frame(60, 2)
    assert rig.device.rx_dropped == 1 and rig.device.failed_requests == 3
    assert not rig.driver.needs_reset


def test_reset_forgets_waiting_frames(machine: Machine) -> None:
    rig, backend = card(machine)
    rig.driver.init()
    backend.incoming.append(frame())
    rig.device.backend_readable()
    assert rig.device.pending_frames == 1
    rig.driver.wr(0x070, 0)  # Status = 0: reset (§4.2.2)
    assert rig.device.pending_frames == 0


def test_close_closes_the_backend(machine: Machine) -> None:
    rig, backend = card(machine)
    rig.transport.close()
    assert backend.closed == 1


def test_bad_macs_are_refused() -> None:
    with pytest.raises(DeviceError, match="unicast"):
        NetDevice(FakeBackend(), bytes.fromhex("017766000001"))
    with pytest.raises(DeviceError, match="6-byte"):
        NetDevice(FakeBackend(), b"\x02")
    for text in ("02:76:6b:00:00", "02:76:6b:00:00:0g", "0276:6b:00:00:01:02", "03:00:00:00:00:01"):
        with pytest.raises(DeviceError):
            parse_mac(text)
    assert parse_mac("02:76:6B:00:00:01") == MAC


# --- persistence ---------------------------------------------------------------------------------------


def test_state_record_round_trips_through_the_snapshot_format(machine: Machine) -> None:
    rig, backend = card(machine)
    rx, tx = rig.driver.init()
    rx.add([(rx.buffer(1526), 1526, True)])
    rig.driver.kick(0)
    state = rig.transport.save()
    assert isinstance(state.device.specific, NetState) and hasattr(NetState, "__slots__")
    doc = format.unpack(format.pack({"d": records.to_json(state)}))
    back = records.parse(TransportState, doc["d"], what="devices.virtio-net")
    assert back == state
    # a second card with the same MAC takes the state and serves the posted buffer
    other, backend2 = card(machine)
    other.transport.restore(back)
    backend2.incoming.append(frame())
    other.device.backend_readable()
    assert other.device.rx_frames == 1


def test_restore_refuses_another_mac_or_a_crafted_one(machine: Machine) -> None:
    rig, _ = card(machine)
    rig.driver.init()
    state = rig.device.save()
    other = NetDevice(FakeBackend(), bytes.fromhex("02766b000002"))
    machine.attach(other)
    with pytest.raises(DeviceError, match="MAC 02:76:6b:00:00:01"):
        other.restore(state)
    doc = records.to_json(state)
    doc["specific"]["mac"] = "ff:ff:ff:ff:ff:ff"
    with pytest.raises(DeviceError, match="multicast") as e:
        rig.device.restore(records.parse(type(state), doc, what="devices.virtio-net"))
    assert "\n" not in str(e.value)
    doc["specific"]["mac"] = "x" * 100
    with pytest.raises(VirtkitError, match="wrong type"):  # fits no device's record
        records.parse(type(state), doc, what="devices.virtio-net")
    assert rig.device.save() == state


def test_a_card_whose_mac_nobody_chose_takes_the_saved_one(machine: Machine) -> None:
    """A migration receiver's card (no mac= given) takes the MAC the guest knows; a crafted one
    is still refused."""
    rig, _ = card(machine)
    rig.driver.init()
    state = rig.device.save()
    other = NetDevice(FakeBackend(), bytes.fromhex("02766b000002"))
    other.adopt_saved_mac = True
    machine.attach(other)
    other.restore(state)
    assert other.mac == MAC and other.config_space()[:6] == MAC
    doc = records.to_json(state)
    doc["specific"]["mac"] = "ff:ff:ff:ff:ff:ff"
    with pytest.raises(DeviceError, match="multicast"):
        other.restore(records.parse(type(state), doc, what="devices.virtio-net"))


def test_restore_refuses_another_device_types_record(machine: Machine) -> None:
    rig, _ = card(machine)
    with pytest.raises(DeviceError, match="not a network card"):
        rig.device.restore_device(object())


# --- the --net option ------------------------------------------------------------------------------------


def test_parse_net_accepts_the_documented_forms() -> None:
    from virtkit.devices.virtio.net.tap import parse_net

    spec = parse_net("tap")
    assert (spec.bridge, spec.mac, spec.name) == (None, None, None)
    spec = parse_net("tap,bridge=br-x,mac=02:76:6b:00:00:01,name=vk-tap-a")
    assert (spec.bridge, spec.mac, spec.name) == ("br-x", MAC, "vk-tap-a")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user", "the only backend is tap"),
        ("tap,bridge", "is not bridge=BR"),
        ("tap,color=red", "is not bridge=BR"),
        ("tap,bridge=a,bridge=b", "given twice"),
        ("tap,mac=01:00:00:00:00:01", "multicast"),
        ("tap,mac=zz", "six hex pairs"),
        ("tap,name=" + "x" * 16, "1 to 15"),
        ("tap,name=a/b", "1 to 15"),
        ("tap,bridge=..", "1 to 15"),
    ],
)
def test_parse_net_refuses_bad_values_in_one_line(text: str, message: str) -> None:
    from virtkit.devices.virtio.net.tap import parse_net

    with pytest.raises(DeviceError, match=message) as e:
        parse_net(text)
    assert "\n" not in str(e.value) and text in str(e.value)


def test_default_names_fit_ifnamsiz_and_macs_are_local_unicast() -> None:
    from virtkit.devices.virtio.net.tap import IFNAMSIZ, default_name, random_mac

    name = default_name()
    assert name.startswith("vk-tap") and len(name) < IFNAMSIZ and name != default_name()
    mac = random_mac()
    assert mac[0] & 0b10 and not mac[0] & 1 and mac[:3] == bytes.fromhex("02766b")


def test_a_snapshots_network_card_is_parsed_and_checked() -> None:
    from virtkit.snapshot.format import SnapshotError
    from virtkit.snapshot.snapshot import _parse_net

    spec = _parse_net({"mac": "02:76:6b:00:00:01", "bridge": "br0"}, "state.machine.nets[0]")
    assert (spec.mac, spec.bridge, spec.name) == (MAC, "br0", None)  # the TAP is made anew
    assert _parse_net({"mac": "02:76:6b:00:00:01"}, "n").bridge is None
    for raw, message in [
        ({"mac": "01:00:00:00:00:01"}, "multicast"),
        ({"mac": "02:76:6b:00:00:01", "bridge": "a,name=lo"}, "not an interface name"),
        ({"mac": 5}, "mac"),
        ({}, "mac"),
    ]:
        with pytest.raises(SnapshotError, match=message) as e:
            _parse_net(raw, "state.machine.nets[0]")
        assert "\n" not in str(e.value)
