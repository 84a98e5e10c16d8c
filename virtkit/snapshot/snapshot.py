"""Snapshots on disk: save a machine into a directory, restore or clone machines from one.

A snapshot directory holds::

    vm.state              the state file (virtkit.snapshot.format): machine config, KVM state,
                          device state, and the name and checksums of the memory file
    memory-<id>.bin       guest RAM (virtkit.snapshot.memfile), sparse
    disk<i>-<id>.img      a point-in-time copy of each writable disk (virtkit.snapshot.overlay:
                          reflink or sparse copy), the base of clones' disk overlays

Saving never overwrites a file in place: the memory file gets a fresh name, the state file is
written to a temporary name and renamed over ``vm.state`` last. The rename is the commit point:
a crash before it leaves the previous snapshot intact, and a machine restored from the previous
memory file (which maps it copy-on-write, so it must never change under it) keeps its inode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

from virtkit.api import VM
from virtkit.errors import KvmError, VirtkitError
from virtkit.snapshot import cpucompat, format, memfile, overlay, vmstate
from virtkit.snapshot.cpucompat import CpuidEntry
from virtkit.snapshot.format import Fields, SnapshotError
from virtkit.vm import DiskSpec, Machine, MachineConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtkit.devices.virtio.net.tap import NetSpec

STATE_FILE = "vm.state"
#: CMOS NVRAM bytes where a clone finds its identity (docs/FAILOVER.md, "Clone"): a 16-byte id
#: (RFC 4122 UUID, all zeros when the VM is not a clone) and the clone's number, index + 1, 16-bit
#: little endian (so 0 still means "not a clone" to a guest that only reads these two bytes)
CMOS_CLONE_ID: Final = 0x40
CMOS_CLONE_INDEX: Final = 0x50


def effective_cpuid(machine: Machine) -> list[CpuidEntry]:
    """What a guest booted on this host sees: vCPU 0's CPUID as KVM holds it (KVM_GET_CPUID2 after
    the machine set its policy from KVM_GET_SUPPORTED_CPUID). On PVM this is the reference, not
    KVM_GET_SUPPORTED_CPUID: guest CPL3 code runs natively and PVM merges the host CPU's own
    features into the vCPU's CPUID, so the supported list under-reports (docs/PLATFORM.md).
    Read while no vCPU ran (:meth:`Machine.note_cpuid`): safe on a running machine too."""
    return list(machine.cpuid)


def machine_of(target: Machine | VM) -> Machine:
    if isinstance(target, Machine):
        return target
    if target.machine is None:
        raise SnapshotError("the VM is not running: start it before taking a snapshot")
    return target.machine


# --- save --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    directory: str
    state_bytes: int
    memory_bytes: int  # guest RAM size (the memory file's length)
    memory_written: int  # bytes actually stored (zero chunks are holes)
    paused_ns: int  # how long the guest was paused for this snapshot
    state_ns: int  # of which: reading KVM and device state
    memory_ns: int  # of which: writing the memory file
    #: for each writable disk, its copy in the snapshot directory and how it was made
    disk_copies: tuple[tuple[str, str], ...] = ()


def document(
    machine: Machine, memory: memfile.MemoryImage, state: dict[str, Any], copies: dict[int, str] | None = None
) -> dict[str, Any]:
    import platform

    from virtkit import __version__
    from virtkit.kvm.flavor import kvm_flavor

    c = machine.config
    return {
        "virtkit": __version__,
        "created": time.time(),
        "host": {
            "kernel": platform.release(),
            "kvm": kvm_flavor(),
            "cpu": cpucompat.vendor(effective_cpuid(machine)) if machine.vcpus else "",
        },
        "machine": {
            "memory": c.memory,
            "vcpus": c.vcpus,
            "paravirt": c.paravirt,
            "strict": c.strict,
            # restore reattaches the image by path (shared storage, as for QEMU migration
            # without block copy); "copy" names the point-in-time copy clones start from
            "disks": [
                {
                    "path": os.path.abspath(d.path),
                    "read_only": d.read_only,
                    "size": os.path.getsize(d.path),
                    **({"copy": copies[i]} if copies and i in copies else {}),
                }
                for i, d in enumerate(getattr(c, "disks", ()))
            ],
            # a network card's TAP is not saved: restore makes a new one on the same bridge, and
            # the card keeps its MAC (its state is checked against it; docs/VIRTIO.md, virtio-net)
            **(
                {
                    "nets": [
                        {"mac": card.mac.hex(":"), **({"bridge": spec.bridge} if spec.bridge else {})}
                        for spec, (_, card) in zip(c.nets, machine.nets, strict=True)
                    ]
                }
                if c.nets
                else {}
            ),
        },
        "memory": memory.to_json(),
        **state,
    }


def _write_file(path: str, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def save_paused(
    machine: Machine, directory: str | os.PathLike[str], *, sync: bool = False, copy_disks: bool = True
) -> SnapshotInfo:
    """Write a snapshot of ``machine``, whose vCPUs are all parked (or never started).

    A raw image is only referenced by the state file, so once the guest runs on and writes its
    disk, the snapshot's memory and the image no longer agree. With ``copy_disks`` (the default)
    each writable disk is also copied into the directory while the guest is paused (reflink:
    instant; else a sparse copy of the allocated extents), so the snapshot and the clones made
    from it see the disk exactly as the guest did at the pause."""
    d = os.fspath(directory)
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise SnapshotError(f"cannot create snapshot directory {d}: {e.strerror}") from None
    t0 = time.perf_counter_ns()
    try:
        state = vmstate.capture(machine)
    except KvmError as e:
        raise SnapshotError(f"cannot read the VM's state: {e}") from None
    t1 = time.perf_counter_ns()
    mem_name = f"memory-{os.urandom(6).hex()}.bin"
    mem_path = os.path.join(d, mem_name)
    tmp_mem = os.path.join(d, f".{mem_name}.tmp")
    tmp_state = os.path.join(d, f".{STATE_FILE}.{os.getpid()}.tmp")
    copies: dict[int, str] = {}
    methods: list[tuple[str, str]] = []
    committed = False
    try:
        if copy_disks:
            for i, spec in enumerate(getattr(machine.config, "disks", ())):
                if spec.read_only:
                    continue  # nobody writes it: the image itself is the point-in-time copy
                name = f"disk{i}-{os.urandom(6).hex()}.img"
                copies[i] = name  # before the copy: a failed copy is cleaned up below
                methods.append((name, overlay.copy_image(spec.path, os.path.join(d, name))))
                os.chmod(os.path.join(d, name), 0o400)  # a base: clones copy it, nobody writes it
        fd = os.open(tmp_mem, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            img = memfile.write(machine.memory, fd, mem_name)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        t2 = time.perf_counter_ns()
        data = format.pack(document(machine, img, state, copies))
        os.rename(tmp_mem, mem_path)
        _write_file(tmp_state, data, sync)
        os.rename(tmp_state, os.path.join(d, STATE_FILE))  # the commit point
        committed = True
        if sync:
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException as e:
        # Before the commit point nothing of this attempt may stay: the previous snapshot in the
        # directory is still the valid one.
        undo = (
            [tmp_mem, tmp_state]
            if committed
            else [tmp_mem, tmp_state, mem_path, *(os.path.join(d, n) for n in copies.values())]
        )
        for path in undo:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(e, OSError):
            raise SnapshotError(f"cannot write snapshot to {d}: {e.strerror or e}") from None
        raise
    _remove_unreferenced(d, keep={mem_name, *copies.values()})
    return SnapshotInfo(d, len(data), img.size, img.written, 0, t1 - t0, t2 - t1, tuple(methods))


def _remove_unreferenced(directory: str, keep: set[str]) -> None:
    """Delete memory files and disk copies of older snapshots in this directory. Machines restored
    from them keep running: their mapping holds the inode, unlinking only removes the name; clones
    have their own overlay copies."""
    import glob

    for pattern in ("memory-*.bin", "disk*-*.img"):
        for p in glob.glob(os.path.join(glob.escape(directory), pattern)):
            if os.path.basename(p) not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(p)


def save(
    target: Machine | VM,
    directory: str | os.PathLike[str],
    *,
    resume: bool = True,
    sync: bool = False,
    copy_disks: bool = True,
) -> SnapshotInfo:
    """Pause ``target`` (if it runs), snapshot it into ``directory``, and resume it unless
    ``resume`` is False (then it stays paused: :meth:`Machine.resume` continues it)."""
    m = machine_of(target)
    was_paused = m.paused
    t0 = time.perf_counter_ns()
    try:
        if not was_paused:
            m.pause()
        info = save_paused(m, directory, sync=sync, copy_disks=copy_disks)
    finally:
        paused_ns = time.perf_counter_ns() - t0
        if resume and not was_paused:
            m.resume()
    return SnapshotInfo(
        info.directory,
        info.state_bytes,
        info.memory_bytes,
        info.memory_written,
        paused_ns,
        info.state_ns,
        info.memory_ns,
        info.disk_copies,
    )


# --- load and check ----------------------------------------------------------------------------
@dataclass
class LoadedSnapshot:
    """A state file read and fully validated; no KVM object exists yet."""

    directory: str
    config: MachineConfig
    memory: memfile.MemoryImage
    image: vmstate.MachineImage
    created: float
    host: dict[str, Any] = field(default_factory=dict)
    disk_sizes: list[int] = field(default_factory=list)
    #: per disk: the file name of its copy in the snapshot directory, or None (read-only or not copied)
    disk_copies: list[str | None] = field(default_factory=list)

    @property
    def memory_path(self) -> str:
        return os.path.join(self.directory, self.memory.file)

    @property
    def cpuid(self) -> list[CpuidEntry]:
        return self.image.vcpus[0].cpuid if self.image.vcpus else []


def _parse_net(raw: Any, what: str) -> NetSpec:
    """A saved network card: its MAC and bridge; the TAP itself is made anew (no name)."""
    from virtkit.devices.virtio.net.tap import NetSpec, check_ifname, parse_mac

    d = Fields(raw, what)
    try:
        mac = parse_mac(d.string("mac"))
        bridge = check_ifname(d.string("bridge"), "bridge", d.string("bridge")) if d.has("bridge") else None
    except VirtkitError as e:
        raise SnapshotError(f"snapshot field {what}: {e}") from None
    return NetSpec(bridge=bridge, mac=mac)


def parse_document(doc: dict[str, Any], directory: str = "") -> LoadedSnapshot:
    f = Fields(doc, "state")
    m = f.obj("machine")
    disks, disk_sizes, disk_copies = [], [], []
    for i, raw in enumerate(m.array("disks") if m.has("disks") else []):
        d = Fields(raw, f"state.machine.disks[{i}]")
        disks.append(DiskSpec(d.string("path"), read_only=d.boolean("read_only")))
        disk_sizes.append(d.integer("size"))
        copy = d.string("copy") if d.has("copy") else None
        if copy is not None and (not copy or os.path.basename(copy) != copy or copy.startswith(".")):
            raise SnapshotError(f"snapshot field state.machine.disks[{i}].copy is not a file name: {copy!r}")
        disk_copies.append(copy)
    kw: dict[str, Any] = {"disks": tuple(disks)} if disks else {}
    if m.has("nets"):
        kw["nets"] = tuple(_parse_net(raw, f"state.machine.nets[{i}]") for i, raw in enumerate(m.array("nets")))
    config = MachineConfig(
        memory=m.integer("memory"),
        vcpus=m.integer("vcpus"),
        paravirt=m.boolean("paravirt"),
        strict=m.boolean("strict"),
        **kw,
    )
    if config.vcpus < 1:
        raise SnapshotError("snapshot field machine.vcpus must be at least 1")
    memory = memfile.MemoryImage.from_json(f.obj("memory"))
    image = vmstate.parse(f)
    if len(image.vcpus) != config.vcpus:
        raise SnapshotError(f"snapshot holds {len(image.vcpus)} vCPU states for a {config.vcpus}-vCPU machine")
    if memory.size != config.memory:
        raise SnapshotError(f"snapshot memory file covers {memory.size} bytes of a {config.memory}-byte machine")
    created = f.number("created") if f.has("created") else 0.0
    host = f.raw("host") if f.has("host") else {}
    return LoadedSnapshot(
        directory, config, memory, image, created, host if isinstance(host, dict) else {}, disk_sizes, disk_copies
    )


def load(directory: str | os.PathLike[str]) -> LoadedSnapshot:
    """Read and validate ``directory``/vm.state (truncation, checksum, version, every field)."""
    d = os.fspath(directory)
    path = os.path.join(d, STATE_FILE)
    try:
        fd = open_member(path)
    except FileNotFoundError:
        if not os.path.isdir(d):
            raise SnapshotError(f"snapshot directory {d} does not exist") from None
        raise SnapshotError(f"{d} holds no snapshot ({STATE_FILE} is missing)") from None
    try:
        limit = format.MAX_PAYLOAD + format.HEADER_SIZE + 1
        chunks: list[bytes] = []
        got = 0
        while got < limit:
            chunk = os.read(fd, limit - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return parse_document(format.unpack(data, source=path), d)


def open_member(path: str) -> int:
    """Open ``path``, a file of a snapshot directory, for reading: it must be a regular file and not
    a symbolic link. The directory may be crafted: a FIFO would block open() (and read()) forever, a
    device would be read without end, and a symlink would hand any host file the restoring user can
    read to the guest (as its RAM or its disk). FileNotFoundError is left to the caller; anything
    else is a SnapshotError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SnapshotError(
                f"{path} is a symbolic link: a snapshot's files must be regular files inside its directory"
            ) from None
        raise SnapshotError(f"cannot open {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_host(snap: LoadedSnapshot, host: list[CpuidEntry]) -> None:
    """Refuse a snapshot whose guest saw CPU features that ``host`` (see :func:`effective_cpuid`)
    lacks."""
    reason = cpucompat.check_compatible(snap.cpuid, host)
    if reason is not None:
        raise SnapshotError(f"cannot restore {snap.directory or 'the VM'} here: {reason}")


def tsc_warnings(snap: LoadedSnapshot, machine: Machine) -> list[str]:
    """What the guest will notice but can live with: a TSC that ticks at another rate."""
    saved_khz = snap.image.vcpus[0].tsc_khz if snap.image.vcpus else 0
    here = machine.tsc_khz()
    # 250 ppm: TSC calibration differs that much between boots of the same machine
    if saved_khz and here and abs(here - saved_khz) * 4000 > saved_khz:
        return [
            f"the guest's TSC ran at {saved_khz} kHz and runs at {here} kHz here; KVM cannot "
            "scale it on this host, so guest time will run at a different rate"
        ]
    return []


# --- restore -----------------------------------------------------------------------------------
def open_memory(snap: LoadedSnapshot, *, verify: bool = False) -> int:
    path = snap.memory_path
    try:
        fd = open_member(path)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot memory file {path} is missing") from None
    try:
        memfile.check_size(fd, snap.memory, path)
        if verify:
            memfile.verify(fd, snap.memory, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restore_machine(
    snap: LoadedSnapshot,
    serial_out: Callable[[bytes], None],
    *,
    verify: bool = False,
    memory_fd: int = -1,
    memory_shared: bool = False,
) -> Machine:
    """A new, not yet started machine in exactly the snapshot's state. Guest RAM maps the memory
    file copy-on-write (or ``memory_fd`` if given: migration passes its own). On any failure
    nothing is left behind: no machine, no fd, no thread."""
    for spec, size in zip(getattr(snap.config, "disks", ()), snap.disk_sizes, strict=False):
        try:
            now = os.path.getsize(spec.path)
        except OSError:
            raise SnapshotError(f"the VM's disk image {spec.path} is gone: restore needs it") from None
        if now != size:
            raise SnapshotError(f"the VM's disk image {spec.path} is {now} bytes, it was {size} at the snapshot")
    own_fd = memory_fd < 0
    fd = open_memory(snap, verify=verify) if own_fd else memory_fd
    try:
        m = Machine(snap.config, serial_out, memory_fd=fd, memory_shared=memory_shared)
    except BaseException:
        if own_fd:
            os.close(fd)
        raise
    try:
        if own_fd:
            os.close(fd)  # the mapping keeps the file; the fd is not needed any more
            fd = -1
        # The machine is new and has not run: refusing now leaves nothing behind.
        check_host(snap, effective_cpuid(m))
        regions = tuple((r.gpa, r.size) for r in m.memory.regions)
        if regions != snap.memory.regions:
            raise SnapshotError(
                f"snapshot memory layout {snap.memory.regions} differs from this virtkit's "
                f"{regions} for {snap.config.memory} bytes"
            )
        try:
            vmstate.apply(m, snap.image)
        except KvmError as e:
            raise SnapshotError(f"KVM refused the snapshot's state: {e}") from None
    except BaseException:
        m.close()
        raise
    return m


@dataclass(frozen=True, slots=True)
class CloneDisk:
    base: str  # what the overlay was copied from (the snapshot's disk copy, or the image)
    path: str  # the clone's own writable image
    method: str  # overlay.copy_image's path: "reflink" or "sparse"


@dataclass(frozen=True, slots=True)
class CloneIdentity:
    """Who a clone is. The host sees it here (and in ``virtkit clone --json``); the guest reads
    ``id`` from CMOS bytes 0x40-0x4F and ``index`` from 0x50-0x51 (ports 0x70/0x71)."""

    index: int
    name: str
    id: bytes  # 16 bytes, a random (version 4) UUID
    directory: str  # where the clone's disk overlays live
    disks: tuple[CloneDisk, ...] = ()

    @property
    def uuid(self) -> str:
        return str(uuid.UUID(bytes=self.id))

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "id": self.uuid,
            "directory": self.directory,
            "disks": [{"base": d.base, "path": d.path, "method": d.method} for d in self.disks],
        }


def set_identity(machine: Machine, identity: CloneIdentity) -> None:
    """Write the clone's identity into CMOS NVRAM, after the snapshot's device state was applied
    (which restored the source's NVRAM: all zeros there unless the source was itself a clone)."""
    nvram = machine.rtc.nvram
    nvram[CMOS_CLONE_ID : CMOS_CLONE_ID + 16] = identity.id
    nvram[CMOS_CLONE_INDEX : CMOS_CLONE_INDEX + 2] = ((identity.index + 1) & 0xFFFF).to_bytes(2, "little")


class RestoredVM(VM):
    """A :class:`virtkit.api.VM` whose machine comes from a snapshot instead of a kernel. ``start()``
    resumes the guest where it was; everything else (wait, stop, serial, results) is as for VM.
    ``identity`` (set by :func:`clone`) is written into the guest's CMOS before it resumes."""

    def __init__(
        self,
        snapshot: LoadedSnapshot | str | os.PathLike[str],
        *,
        serial: str | BinaryIO | None = None,
        verify: bool = False,
        identity: CloneIdentity | None = None,
        disks: Sequence[DiskSpec] | None = None,
        nets: Sequence[NetSpec] | None = None,
    ) -> None:
        """``disks``: the VM's disk images, one per disk of the snapshot (see :func:`attach_disks`);
        ``nets``: the host side of its network cards (:func:`attach_nets`). A
        :class:`LoadedSnapshot` passed in is taken as it is where these are None (clone attached
        its disks)."""
        if isinstance(snapshot, LoadedSnapshot):
            snap = snapshot if disks is None else attach_disks(snapshot, disks)
            snap = snap if nets is None else attach_nets(snap, nets)
        else:
            snap = attach_nets(attach_disks(load(snapshot), disks), nets)
        c = snap.config
        super().__init__(
            snap.directory,
            memory=c.memory,
            vcpus=c.vcpus,
            mode="para" if c.paravirt else "full",
            strict=c.strict,
            serial=serial,
        )
        self.config = c  # exactly the saved machine (disks included)
        self.snapshot = snap
        self.verify = verify
        self.identity = identity
        self.warnings: list[str] = []
        #: perf_counter_ns() when open() began and when the machine was ready to run
        self.restore_started_ns = self.restore_ready_ns = 0

    def open(self) -> None:
        if self.machine is not None:
            return
        self.restore_started_ns = time.perf_counter_ns()
        try:
            self.machine = restore_machine(self.snapshot, self.console.write, verify=self.verify)
            if self.identity is not None:
                set_identity(self.machine, self.identity)
            self.warnings = tsc_warnings(self.snapshot, self.machine)
        except BaseException:
            self.close()
            raise
        self.restore_ready_ns = time.perf_counter_ns()


def restore(
    directory: str | os.PathLike[str],
    *,
    serial: str | BinaryIO | None = None,
    verify: bool = False,
    start: bool = True,
    disks: Sequence[DiskSpec] | None = None,
    nets: Sequence[NetSpec] | None = None,
) -> RestoredVM:
    """Restore the snapshot in ``directory`` and (by default) resume it. Use the result like a
    VM: ``wait()``, ``stop()``, ``close()`` (or a ``with`` block). ``disks`` and ``nets``: its disk
    images and the host side of its network cards, named by the caller (:func:`attach_disks`,
    :func:`attach_nets`)."""
    vm = RestoredVM(directory, serial=serial, verify=verify, disks=disks, nets=nets)
    try:
        vm.start() if start else vm.open()
    except BaseException:
        vm.close()
        raise
    return vm


def _clone_snapshot(snap: LoadedSnapshot, disks: tuple[DiskSpec, ...]) -> LoadedSnapshot:
    """``snap`` with other disk images; every other part of the machine (network cards included)
    as it was."""
    c = snap.config
    config = MachineConfig(**{name: getattr(c, name) for name in MachineConfig.__slots__})
    config.disks = disks
    return dataclasses.replace(snap, config=config)


def attach_disks(snap: LoadedSnapshot, disks: Sequence[DiskSpec] | None, *, clone: bool = False) -> LoadedSnapshot:
    """``snap`` with the disk images the caller named, in the snapshot's order.

    A snapshot records the paths its VM's disks had, but a snapshot directory is input (it may
    have been copied from another host, or written by someone else): its paths are never opened
    on its word, or a crafted ``vm.state`` could attach ``/etc/shadow`` or a host block device to
    a guest, read-write. So every disk is named by the caller (``--disk``), as migrate-receive
    does, and must have the recorded size and the recorded read-only flag (a ``,ro`` the caller
    adds to a writable disk is refused: the guest's state expects to write). For a clone, a disk
    the snapshot copied into its own directory needs no name: that copy is the clone's base."""
    recorded = tuple(snap.config.disks)
    given = tuple(disks or ())
    in_dir = [clone and i < len(snap.disk_copies) and snap.disk_copies[i] is not None for i in range(len(recorded))]
    if not given:
        missing = [i for i in range(len(recorded)) if not in_dir[i]]
        if not missing:
            return snap
        listing = "; ".join(
            f"disk {i}: {'read-only' if recorded[i].read_only else 'writable'}, "
            f"{snap.disk_sizes[i] if i < len(snap.disk_sizes) else '?'} bytes, was {recorded[i].path!r}"
            for i in missing
        )
        raise SnapshotError(
            f"the snapshot has {len(recorded)} disk(s) ({listing}): name each image with --disk IMAGE, in "
            "order (a snapshot's recorded paths are not opened on its word)"
        )
    if len(given) != len(recorded):
        raise SnapshotError(
            f"the snapshot has {len(recorded)} disk(s), {len(given)} given with --disk: name each, in order"
        )
    specs = []
    for i, (want, spec) in enumerate(zip(recorded, given, strict=True)):
        if spec.read_only and not want.read_only:
            raise SnapshotError(f"disk {i} ({spec.path}) is writable in the snapshot: leave out ,ro")
        specs.append(DiskSpec(spec.path, read_only=want.read_only))
    return _clone_snapshot(snap, tuple(specs))


def attach_nets(snap: LoadedSnapshot, nets: Sequence[NetSpec] | None) -> LoadedSnapshot:
    """``snap`` with the network cards' host side the caller named (``--net tap[,bridge=BR]``),
    one per card of the snapshot, in order.

    For the same reason as :func:`attach_disks`: a snapshot's recorded bridge is not followed on its
    word (a crafted state file could put the guest on any bridge of the host). Each card keeps the
    MAC the guest knows (recorded, and checked against the device state); a ``mac=`` the caller
    gives must be that MAC."""
    from virtkit.devices.virtio.net.device import format_mac
    from virtkit.devices.virtio.net.tap import NetSpec

    recorded = tuple(snap.config.nets)
    given = tuple(nets or ())
    if not recorded and not given:
        return snap
    if len(given) != len(recorded):
        listing = "; ".join(
            f"card {i}: MAC {format_mac(n.mac) if n.mac else '?'}, was on bridge {n.bridge or '(none)'!r}"
            for i, n in enumerate(recorded)
        )
        raise SnapshotError(
            f"the snapshot has {len(recorded)} network card(s)"
            + (f" ({listing})" if listing else "")
            + f", {len(given)} given: name each with --net tap[,bridge=BR], in order (a snapshot's "
            "recorded bridges are not followed on its word)"
        )
    cards = []
    for i, (want, spec) in enumerate(zip(recorded, given, strict=True)):
        if spec.mac is not None and spec.mac != want.mac:
            raise SnapshotError(
                f"network card {i} has MAC {format_mac(want.mac) if want.mac else '?'} in the snapshot, "
                f"not {format_mac(spec.mac)}: leave out mac="
            )
        cards.append(NetSpec(bridge=spec.bridge, mac=want.mac, name=spec.name))
    c = snap.config
    config = MachineConfig(**{name: getattr(c, name) for name in MachineConfig.__slots__})
    config.nets = tuple(cards)
    return dataclasses.replace(snap, config=config)


def _disk_base(snap: LoadedSnapshot, i: int, spec: DiskSpec) -> str:
    """What clone overlays of disk ``i`` copy: the snapshot's point-in-time copy if it made one,
    else the image itself (then the copy is only as consistent as the image still is). Either way
    it must still have the size recorded at the snapshot."""
    copy = snap.disk_copies[i] if i < len(snap.disk_copies) else None
    base = os.path.join(snap.directory, copy) if copy else spec.path
    try:
        if copy:
            # a file of the snapshot directory: a regular file, never followed out of it (open_member;
            # clone copies it again with follow_symlinks=False, so a swap after this check fails too)
            os.close(open_member(base))
        now = os.path.getsize(base)
    except OSError:
        raise SnapshotError(f"cannot clone: the snapshot's disk image {base} is gone") from None
    size = snap.disk_sizes[i] if i < len(snap.disk_sizes) else now
    if now != size:
        raise SnapshotError(f"cannot clone: disk image {base} is {now} bytes, it was {size} at the snapshot")
    return base


def clone(
    directory: str | os.PathLike[str],
    count: int,
    *,
    serial: Sequence[str | BinaryIO | None] | None = None,
    start: bool = True,
    workdir: str | os.PathLike[str] | None = None,
    reflink: bool = True,
    disks: Sequence[DiskSpec] | None = None,
    nets: Sequence[NetSpec] | None = None,
) -> list[RestoredVM]:
    """``count`` machines resumed from one snapshot. They share its memory file copy-on-write:
    each reads the common pages from the page cache and gets private copies of what it writes.
    ``serial[i]`` is clone i's serial output (a file name or stream; default captured only).

    Each clone gets an identity (``vm.identity``: index, name ``clone-<i>``, a random 16-byte id,
    also in the guest's CMOS) and, for every writable disk, its own overlay: a reflink (or sparse)
    copy of the snapshot's disk in ``workdir``/clone-<i>/ (default: a new ``clones-*`` directory in
    the snapshot directory). Clones write only their overlay, never the base or each other's;
    overlays stay after the clones end. Read-only disks are shared.

    ``nets``: the host side of the network cards (:func:`clone_nets`): each clone gets TAPs of
    its own; every clone's card keeps the MAC the guest knows."""
    import tempfile

    if count < 1:
        raise SnapshotError(f"clone count must be at least 1, got {count}")
    if serial is not None and len(serial) != count:
        raise SnapshotError(f"{count} clones need {count} serial outputs, got {len(serial)}")
    snap = attach_disks(load(directory), disks, clone=True)
    per_clone = clone_nets(snap, nets, count)
    specs: tuple[DiskSpec, ...] = tuple(snap.config.disks)
    bases = {i: _disk_base(snap, i, spec) for i, spec in enumerate(specs) if not spec.read_only}
    try:
        if workdir is None:
            top = tempfile.mkdtemp(prefix="clones-", dir=snap.directory or ".")
        else:
            top = os.fspath(workdir)
            os.makedirs(top, exist_ok=True)
    except OSError as e:
        raise SnapshotError(f"cannot create the clones' directory: {e.strerror or e}") from None
    vms: list[RestoredVM] = []
    try:
        for i in range(count):
            name = f"clone-{i}"
            cdir = os.path.join(top, name)
            cdisks: list[CloneDisk] = []
            new_specs = list(specs)
            if bases:
                try:
                    os.makedirs(cdir, exist_ok=True)
                    for j, base in bases.items():
                        path = os.path.join(cdir, f"disk{j}.img")
                        if os.path.lexists(path):
                            raise SnapshotError(
                                f"cannot clone: {path} already exists (a clone from an "
                                "earlier run?): give another workdir"
                            )
                        in_snapshot = j < len(snap.disk_copies) and snap.disk_copies[j] is not None
                        method = overlay.copy_image(base, path, reflink=reflink, follow_symlinks=not in_snapshot)
                        cdisks.append(CloneDisk(base, path, method))
                        new_specs[j] = DiskSpec(path, read_only=False)
                except OSError as e:
                    raise SnapshotError(f"cannot make {name}'s disk overlay in {cdir}: {e.strerror or e}") from None
            identity = CloneIdentity(i, name, uuid.uuid4().bytes, cdir, tuple(cdisks))
            out = serial[i] if serial is not None else None
            csnap = _clone_snapshot(snap, tuple(new_specs)) if bases else snap
            csnap = attach_nets(csnap, per_clone[i]) if snap.config.nets else csnap
            vm = RestoredVM(csnap, serial=out, identity=identity)
            vms.append(vm)
            vm.start() if start else vm.open()
    except BaseException:
        for vm in vms:
            vm.close()
        raise
    return vms


def clone_nets(snap: LoadedSnapshot, nets: Sequence[NetSpec] | None, count: int) -> list[tuple[NetSpec, ...]]:
    """The ``--net`` options of each of ``count`` clones of ``snap``: given once per card of the
    snapshot (every clone's cards on those bridges) or once per card per clone (clone 0's cards,
    then clone 1's...). Every clone's card has the MAC of the snapshot's (the guest knows no other),
    so two clones' same card on one bridge would put one address behind two ports: refused, as is
    a TAP name= that every clone would share. The count itself is checked by :func:`attach_nets`."""
    from virtkit.devices.virtio.net.device import format_mac

    cards, given = len(snap.config.nets), tuple(nets or ())
    if not cards:
        return [given] * count  # attach_nets refuses any --net for a snapshot without cards
    shared = len(given) == cards
    if shared:
        groups = [given] * count
    elif len(given) == cards * count:
        groups = [given[i * cards : (i + 1) * cards] for i in range(count)]
    else:
        raise SnapshotError(
            f"the snapshot has {cards} network card(s) and {count} clones: give --net tap[,bridge=BR] "
            f"once per card ({cards}, the same for every clone) or once per card per clone ({cards * count}, "
            f"clone 0's first), got {len(given)}"
        )
    for j in range(cards):
        seen: dict[str, int] = {}
        for i, group in enumerate(groups):
            spec = group[j]
            if spec.name is not None and shared and count > 1:
                raise SnapshotError(
                    f"--net ...,name={spec.name} would name every clone's TAP the same: give --net once "
                    "per card per clone, each with its own name=, or leave name= out"
                )
            if spec.bridge is None:
                continue  # a TAP on no bridge: a link of its own, no other clone on it
            if spec.bridge in seen:
                mac = snap.config.nets[j].mac
                raise SnapshotError(
                    f"clone-{seen[spec.bridge]} and clone-{i} would both put card {j} (MAC "
                    f"{format_mac(mac) if mac else '?'}) on bridge {spec.bridge}: one address behind two "
                    "ports; give each clone its own bridge (--net once per card per clone)"
                )
            seen[spec.bridge] = i
    return groups


def describe(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What a snapshot holds, for ``virtkit snapshot-info`` (no KVM needed)."""
    snap = load(directory)
    regs = [v.regs for v in snap.image.vcpus]
    try:
        mem_disk = os.stat(snap.memory_path).st_blocks * 512
    except OSError:
        mem_disk = -1
    return {
        "directory": snap.directory,
        "format_version": format.FORMAT_VERSION,
        "created": snap.created,
        "host": snap.host,
        "memory": snap.config.memory,
        "memory_file": snap.memory.file,
        "memory_stored": snap.memory.written,
        "memory_on_disk": mem_disk,
        "vcpus": [
            {"id": v.id, "rip": r.rip, "mp_state": v.mp_state, "msrs": len(v.msrs)}
            for v, r in zip(snap.image.vcpus, regs, strict=True)
        ],
        "devices": sorted(snap.image.devices),
        "state_file_bytes": os.path.getsize(os.path.join(snap.directory, STATE_FILE)),
    }
