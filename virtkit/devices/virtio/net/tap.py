"""``--net tap[,bridge=BR][,mac=MAC][,name=IF]``: a host TAP device as a virtio-net card's backend.

The TAP is made by ``TUNSETIFF`` on ``/dev/net/tun`` (Documentation/networking/tuntap.rst) and
*not* made persistent: the kernel deletes it when its last fd closes, so it goes away with the VMM
on every exit path, SIGKILL and crashes included. pyroute2 then brings it up and enslaves it to
the bridge, if one is named, and checks on close that it is gone (deleting it if something kept it).

Flags: ``IFF_TAP | IFF_NO_PI`` and no ``IFF_VNET_HDR``. With no offload negotiated with the guest
(device.py), a virtio_net_hdr would carry nothing; without IFF_VNET_HDR the host kernel also never
hands us a GSO or partially checksummed packet (it has to finish them itself, as for any TAP
without offloads), and we never parse a header the kernel wrote. Each read is one whole frame, each
write one frame. The fd is non-blocking and served by the machine's I/O thread.

The default name is ``vk-tap<pid in hex>-<n>`` (IFNAMSIZ allows 15 characters); the default MAC is
``02:76:6b`` ("vk", locally administered, unicast) followed by three random bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
from typing import Final

from virtkit.devices.virtio.net.device import format_mac, parse_mac

__all__ = ["NetSpec", "TapDevice", "check_ifname", "parse_mac", "parse_net"]
from virtkit.errors import DeviceError

log = logging.getLogger(__name__)

TUN_DEVICE: Final = "/dev/net/tun"
#: _IOW('T', 202, int) (include/uapi/linux/if_tun.h)
TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
#: struct ifreq: 16-byte name, then the union (flags is its first short); 40 bytes on x86-64
IFREQ: Final = struct.Struct("16sH22x")
IFNAMSIZ: Final = 16
NAME_PREFIX: Final = "vk-tap"
MAC_PREFIX: Final = bytes((0x02, 0x76, 0x6B))
#: read size: a frame is at most 65535 bytes on any link; larger reads are never needed
READ_SIZE: Final = 65536
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")

_counter = 0


class NetSpec:
    """One ``--net`` option, parsed. ``tap``: a TAP already made for it (by a process that must
    make it before it leaves the host's network namespace, as ``migrate-receive`` does), which the
    machine then uses instead of making one; the machine's card owns and closes it."""

    __slots__ = ("bridge", "mac", "name", "tap")

    def __init__(
        self,
        *,
        bridge: str | None = None,
        mac: bytes | None = None,
        name: str | None = None,
        tap: TapDevice | None = None,
    ) -> None:
        self.bridge, self.mac, self.name, self.tap = bridge, mac, name, tap

    def __repr__(self) -> str:
        mac = format_mac(self.mac) if self.mac else None
        return f"NetSpec(bridge={self.bridge!r}, mac={mac!r}, name={self.name!r})"


def check_ifname(text: str, what: str, name: str) -> str:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise DeviceError(
            f"--net {text!r}: {what}= is not an interface name (1 to 15 letters, digits, '_', '.' or '-')"
        )
    return name


def parse_net(text: str) -> NetSpec:
    """``tap[,bridge=BR][,mac=MAC][,name=IF]``; DeviceError (one line) for anything else."""
    kind, _, rest = text.partition(",")
    if kind != "tap":
        raise DeviceError(f"--net {text!r}: the only backend is tap (--net tap[,bridge=BR][,mac=MAC][,name=IF])")
    fields: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in ("bridge", "mac", "name") or not eq or not value:
            raise DeviceError(f"--net {text!r}: {item!r} is not bridge=BR, mac=MAC or name=IF")
        if key in fields:
            raise DeviceError(f"--net {text!r}: {key}= is given twice")
        fields[key] = value
    try:
        mac = parse_mac(fields["mac"]) if "mac" in fields else None
    except DeviceError as e:
        raise DeviceError(f"--net {text!r}: {e}") from None
    bridge = check_ifname(text, "bridge", fields["bridge"]) if "bridge" in fields else None
    name = check_ifname(text, "name", fields["name"]) if "name" in fields else None
    return NetSpec(bridge=bridge, mac=mac, name=name)


def random_mac() -> bytes:
    return MAC_PREFIX + os.urandom(3)


def default_name() -> str:
    """A name no other virtkit process on this host picks: the pid, and a counter within it."""
    global _counter
    name = f"{NAME_PREFIX}{os.getpid():x}-{_counter}"
    _counter += 1
    return name


class TapDevice:
    """An open, up TAP interface; :meth:`close` removes it. Implements the device's FrameBackend."""

    def __init__(self, spec: NetSpec) -> None:
        name = spec.name or default_name()
        if len(name) >= IFNAMSIZ:
            raise DeviceError(f"TAP name {name!r} is longer than 15 characters: give a shorter name=")
        if os.path.exists(f"/sys/class/net/{name}"):
            raise DeviceError(f"--net: a network interface named {name} already exists: give another name=")
        if spec.bridge is not None and not os.path.isdir(f"/sys/class/net/{spec.bridge}/bridge"):
            raise DeviceError(
                f"--net bridge={spec.bridge}: no bridge of that name in this network namespace (create it first)"
            )
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"--net tap: cannot open {TUN_DEVICE}: {e.strerror}") from None
        self.fd = fd
        self.name = name
        self.bridge = spec.bridge
        self._closed = False
        try:
            try:
                ifr = fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI))
            except OSError as e:
                hint = " (needs CAP_NET_ADMIN: run as root)" if e.errno == errno.EPERM else ""
                raise DeviceError(f"--net tap: cannot create TAP {name}: {e.strerror}{hint}") from None
            self.name = IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
            self._configure()
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ip:
                (index,) = ip.link_lookup(ifname=self.name)
                if self.bridge is not None:
                    (br,) = ip.link_lookup(ifname=self.bridge)
                    ip.link("set", index=index, master=br)
                ip.link("set", index=index, state="up")
        except (NetlinkError, ValueError) as e:
            raise DeviceError(f"--net tap: cannot set up TAP {self.name}: {e}") from None

    def fileno(self) -> int:
        return self.fd

    # --- FrameBackend -------------------------------------------------------------------------------
    def send(self, frame: bytes) -> bool:
        try:
            return os.write(self.fd, frame) == len(frame)
        except BlockingIOError:
            return False  # the TAP's queue is full: the frame is dropped, as a NIC would
        except OSError as e:  # EIO while the link is down, ...
            log.debug("TAP %s: write failed: %s", self.name, e)
            return False

    def recv(self) -> bytes | None:
        if self.fd < 0:
            return None
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            log.debug("TAP %s: read failed: %s", self.name, e)
            return None

    def release(self) -> None:
        """Close this process's fd only: another process (a forked child) holds the TAP, which the
        kernel deletes when the last fd closes. Idempotent; :meth:`close` afterwards still checks
        that the TAP is gone."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Close the fd (the kernel deletes the non-persistent TAP) and make sure it is gone.
        Idempotent."""
        self.release()
        if self._closed:
            return
        self._closed = True
        if not os.path.exists(f"/sys/class/net/{self.name}"):
            return
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with contextlib.suppress(NetlinkError), IPRoute() as ip:
            for index in ip.link_lookup(ifname=self.name):
                ip.link("del", index=index)
