"""The device model: what a guest's port, MMIO and queue accesses reach.

    contract.py   what a device declares: PioDevice, StringPio, MmioDevice, Persistent, QueueReplay
    bus.py        port-I/O and MMIO dispatch (unknown accesses counted, or fatal with --strict)
    manager.py    DeviceManager: buses, windows and interrupt lines, command-line fragments, the
                  map of persistent devices, the virtio wiring
    persist.py    state records of the devices at this level (each folder has its own)
    disk.py       raw disk images shared by the disk front ends
    hypercall.py  the paravirtual call interface (docs/HYPERCALLS.md)
    legacy/       the emulated PC (16550A, ATA, i8042, CMOS, debug exit, POST)
    virtio/       virtqueues, the virtio-mmio transport, blk, console, rng (docs/VIRTIO.md)

May import: ``virtkit.arch`` (the address map), ``virtkit.memory``, ``virtkit.kvm`` (the manager's
irqfd/ioeventfd wiring), ``virtkit.records``, ``virtkit.errors``; never the machine, the vCPU or
anything above them.
"""
