"""``--net bridge``: a veth pair from the container to the ``virtkit0`` bridge, with an address.

Host side (the runtime, netlink through pyroute2): the bridge (made on first use, removed with
its last port), one veth pair per container, the container's end moved into its network
namespace. Container side (the init, before its rootfs is built): rename to ``eth0``, address,
up, default route via the bridge, with plain ioctls (nothing to import after the fork).

Addresses come from 10.87.0.0/16 (the bridge is .0.1; podman's default network is 10.88.0.0/16 and
its later ones 10.89.x.0/24, so both can run on one host); a lease is a file named after the address
under ``/run/virtkit-net``, created with O_EXCL, so two runtimes never hand out the same one.
Traffic stays on this machine: between the host's bridge and containers' namespaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import stat
from typing import Any

from virtkit.errors import ContainerError

BRIDGE = "virtkit0"
SUBNET = ipaddress.ip_network("10.87.0.0/16")
GATEWAY = "10.87.0.1"


#: leases are shared by every state root: two runtimes must not hand out the same address
LEASES = "/run/virtkit-net"


def _names(root: str, cid: str) -> tuple[str, str]:
    h = hashlib.sha256(f"{root}\0{cid}".encode()).hexdigest()[:8]
    return f"vk{h}", f"vkc{h}"  # at most 15 characters (IFNAMSIZ - 1)


def host_ifname(root: str, cid: str) -> str:
    """The host end's name for container ``cid`` of the state root ``root`` (always the same)."""
    return _names(root, cid)[0]


def is_lease_path(path: str) -> bool:
    """Whether ``path`` is a lease file this module makes: LEASES/<an address of SUBNET>."""
    if os.path.dirname(path) != LEASES:
        return False
    try:
        return ipaddress.ip_address(os.path.basename(path)) in SUBNET
    except ValueError:
        return False


def lease_of(host_if: str) -> str | None:
    """The lease file held by ``host_if`` (its content), if any: for cleaning up after a lost record."""
    try:
        names = os.listdir(LEASES)
    except OSError:
        return None
    for name in names:
        path = os.path.join(LEASES, name)
        try:
            with open(path, "rb") as f:
                if f.read(64) == host_if.encode() and is_lease_path(path):
                    return path
        except OSError:
            continue
    return None


def plan(root: str, cid: str) -> dict[str, Any]:
    """Choose interface names and lease an address (before anything is made)."""
    host_if, peer_if = _names(root, cid)
    lease_dir = LEASES
    os.makedirs(lease_dir, mode=0o700, exist_ok=True)
    st = os.lstat(lease_dir)
    if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != 0o700 and st.st_uid == os.geteuid():
        os.chmod(lease_dir, 0o700)  # one made by an older virtkit was world-readable
    start = int.from_bytes(hashlib.sha256(cid.encode()).digest()[:2], "big")
    hosts = SUBNET.num_addresses - 3
    for i in range(hosts):
        addr = SUBNET.network_address + 2 + (start + i) % hosts
        path = os.path.join(lease_dir, str(addr))
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.write(fd, host_if.encode())
        os.close(fd)
        return {
            "host_if": host_if,
            "peer_if": peer_if,
            "ifname": "eth0",
            "address": str(addr),
            "prefix": SUBNET.prefixlen,
            "gateway": GATEWAY,
            "lease": path,
        }
    raise ContainerError(f"no free address left in {SUBNET} for --net bridge")


def attach(spec: dict[str, Any], pid: int) -> None:
    """Make the bridge (if needed) and the veth pair; move the container's end into ``pid``'s netns."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ip:
            if not ip.link_lookup(ifname=BRIDGE):
                with contextlib.suppress(NetlinkError):  # a concurrent runtime may have made it
                    ip.link("add", ifname=BRIDGE, kind="bridge")
                br = ip.link_lookup(ifname=BRIDGE)[0]
                with contextlib.suppress(NetlinkError):
                    ip.addr("add", index=br, address=GATEWAY, prefixlen=SUBNET.prefixlen)
                ip.link("set", index=br, state="up")
            br = ip.link_lookup(ifname=BRIDGE)[0]
            ip.link("add", ifname=spec["host_if"], kind="veth", peer=spec["peer_if"])
            host = ip.link_lookup(ifname=spec["host_if"])[0]
            peer = ip.link_lookup(ifname=spec["peer_if"])[0]
            ip.link("set", index=peer, net_ns_pid=pid)
            ip.link("set", index=host, master=br, state="up")
    except NetlinkError as err:
        raise ContainerError(f"cannot set up the bridge network: {err}") from None


def remove_link(host_if: str, lease: str | None = None) -> None:
    """Delete the host end (the kernel deletes its peer), the lease, and the bridge when unused."""
    if lease:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lease)
    if not os.path.exists(f"/sys/class/net/{host_if}") and not os.path.exists(f"/sys/class/net/{BRIDGE}"):
        return
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=host_if)
        if idx:
            with contextlib.suppress(NetlinkError):
                ip.link("del", index=idx[0])
        br = ip.link_lookup(ifname=BRIDGE)
        if br and not os.listdir(f"/sys/class/net/{BRIDGE}/brif"):
            with contextlib.suppress(NetlinkError):
                ip.link("del", index=br[0])
