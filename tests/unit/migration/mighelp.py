"""Both ends of the migration protocol over socket pairs, without /dev/kvm: channels, a tap that
sees (and can change) every byte in flight, and a fake machine for the target's state machine."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from virtkit.memory import GuestMemory
from virtkit.migration import protocol
from virtkit.migration.protocol import Channel, DiskShape, MachineShape
from virtkit.migration.shape import compare

MiB = 1 << 20
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
#: a plausible vCPU 0 CPUID: vendor leaf and leaf 1 (what cpucompat reads)
CPUID = ((0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65), (1, 0, 0, 0x800F12, 0, 0x1, 0x1))
SHAPE = MachineShape(
    memory=2 * MiB,
    vcpus=1,
    mode="full",
    strict=False,
    disks=(DiskShape(False, 1 << 20),),
    regions=((0, 2 * MiB),),
    devices=("i8042", "post", "rtc", "uart0"),
    cpuid=CPUID,
)
TIMEOUT = 5.0


def channel_pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(a, "target", read_timeout=TIMEOUT), Channel(b, "source", read_timeout=TIMEOUT)


def established_pair() -> tuple[Channel, Channel]:
    """(source's channel, target's channel) with session keys, as after a handshake."""
    src, dst = channel_pair()
    s2t, t2s = protocol.session_keys(KEY, b"s" * 32, b"t" * 32)
    src.establish(send_key=s2t, recv_key=t2s)
    dst.establish(send_key=t2s, recv_key=s2t)
    return src, dst


class Tap:
    """Two socket pairs and a relay between them: the source talks to ``source``, the target to
    ``target``; every byte from source to target goes through ``edit`` (a whole message at a time
    where the test asks for framing) and is recorded in ``sent``."""

    def __init__(self, edit: Callable[[bytes], bytes] | None = None) -> None:
        s1, self._m1 = socket.socketpair()
        self._m2, t1 = socket.socketpair()
        self.source = Channel(s1, "target", read_timeout=TIMEOUT)
        self.target = Channel(t1, "source", read_timeout=TIMEOUT)
        self.edit = edit
        self.sent = bytearray()  # source -> target
        self.replied = bytearray()  # target -> source
        self._threads = [
            threading.Thread(target=self._pump, args=(self._m1, self._m2, True), daemon=True),
            threading.Thread(target=self._pump, args=(self._m2, self._m1, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if forward:
                    self.sent += data
                    if self.edit is not None:
                        data = self.edit(data)
                else:
                    self.replied += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.source.close()
        self.target.close()
        for t in self._threads:
            t.join(timeout=TIMEOUT)
        self._m1.close()
        self._m2.close()


class FakeLanding:
    """A target machine without KVM: 2 MiB of real guest memory, one vCPU; records what the state
    machine asked of it."""

    def __init__(self, shape: MachineShape = SHAPE) -> None:
        self.shape = shape
        self.memory = GuestMemory([(0, 2 * MiB)])
        self.vcpus = 1
        self.applied: list[bytes] = []
        self.started = 0

    def refusal(self, shape: MachineShape) -> str | None:
        return compare(self.shape, shape)

    def apply_state(self, data: bytes, peer: str) -> None:
        self.applied.append(data)

    def start(self) -> int:
        self.started += 1
        return time.monotonic_ns()


class Served:
    """The target's state machine (:func:`virtkit.migration.target.serve`) in a thread."""

    def __init__(self, ch: Channel, landing: FakeLanding, key: bytes = KEY) -> None:
        from virtkit.migration.target import serve

        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = serve(ch, key, landing)  # type: ignore[arg-type]
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> BaseException | None:
        self.thread.join(timeout=3 * TIMEOUT)
        assert not self.thread.is_alive(), "the target's state machine did not end"
        return self.error
