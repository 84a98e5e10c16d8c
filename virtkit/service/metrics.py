"""Prometheus text exposition (format 0.0.4) of the host's account and every running VM.

Per VM: CPU time and throttling (from its cgroup: the VMM's threads, guest time included), memory
(cgroup charge and the VMM's RSS), exits by reason, device I/O (exits per device: uart, debug-exit,
rtc, ...; serial bytes), guest vs VMM time. Names follow Prometheus conventions (``_total`` for
counters, base units).

It renders a :class:`~virtkit.service.model.MetricsSnapshot` the service takes at the scrape
(:meth:`virtkit.service.daemon.Service.metrics_snapshot`) and knows nothing of the service itself.
"""

from __future__ import annotations

from virtkit.service.model import MetricsSnapshot, VmStats


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.declared: set[str] = set()

    def metric(self, name: str, kind: str, help_: str, value: float, **labels: str) -> None:
        if name not in self.declared:
            self.declared.add(name)
            self.lines.append(f"# HELP {name} {help_}")
            self.lines.append(f"# TYPE {name} {kind}")
        lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")


def vm_metrics(w: _Writer, st: VmStats) -> None:
    vm = st.name
    w.metric("virtkit_vm_up", "gauge", "1 if the VM's VMM is running", 1 if st.state == "running" else 0, vm=vm)
    if st.cpu_seconds is not None:
        w.metric(
            "virtkit_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VM's VMM process (cgroup)",
            st.cpu_seconds,
            vm=vm,
        )
        w.metric(
            "virtkit_vm_cpu_throttled_seconds_total",
            "counter",
            "time the VM was held at its CPU quota",
            st.throttled_seconds or 0,
            vm=vm,
        )
        w.metric(
            "virtkit_vm_memory_cgroup_bytes",
            "gauge",
            "memory charged to the VM's cgroup",
            st.memory_cgroup_bytes or 0,
            vm=vm,
        )
    if st.rss_bytes is not None:
        w.metric(
            "virtkit_vm_rss_bytes",
            "gauge",
            "resident memory of the VMM process (guest pages included)",
            st.rss_bytes,
            vm=vm,
        )
    w.metric("virtkit_vm_memory_bytes", "gauge", "guest memory the VM was given", st.memory_bytes, vm=vm)
    w.metric("virtkit_vm_vcpus", "gauge", "vCPUs of the VM", st.vcpus, vm=vm)
    vmm = st.vmm
    if vmm is None:
        return
    for reason, n in sorted((vmm.exits or {}).items()):
        w.metric("virtkit_vm_exits_total", "counter", "VM exits by reason", n, vm=vm, reason=reason)
    for device, n in sorted((vmm.device_exits or {}).items()):
        w.metric("virtkit_vm_device_io_total", "counter", "port and MMIO accesses by device", n, vm=vm, device=device)
    w.metric(
        "virtkit_vm_serial_bytes_total",
        "counter",
        "bytes the guest wrote to its serial port",
        vmm.serial_bytes,
        vm=vm,
    )


def render(snapshot: MetricsSnapshot) -> str:
    w = _Writer()
    host = snapshot.host
    w.metric("virtkit_host_cores", "gauge", "host CPU cores", host.cores)
    w.metric(
        "virtkit_host_vcpu_capacity",
        "gauge",
        "vCPUs the service runs at once (cores x overcommit)",
        host.vcpu_capacity,
    )
    w.metric("virtkit_host_vcpus_used", "gauge", "vCPUs of running VMs", host.vcpus_used)
    w.metric("virtkit_host_memory_capacity_bytes", "gauge", "memory the service gives VMs", host.memory_capacity)
    w.metric(
        "virtkit_host_memory_used_bytes",
        "gauge",
        "memory held by running VMs (guest + VMM allowance)",
        host.memory_used,
    )
    for sample in snapshot.vms:
        if sample.stats is None:
            w.metric("virtkit_vm_up", "gauge", "1 if the VM's VMM is running", 0, vm=sample.name)
        else:
            vm_metrics(w, sample.stats)
    return "\n".join(w.lines) + "\n"
