"""Prometheus text exposition (format 0.0.4) of the host's account and every running VM.

Per VM: CPU time and throttling (from its cgroup: the VMM's threads, guest time included), memory
(cgroup charge and the VMM's RSS), exits by reason, device I/O (exits per device: uart, debug-exit,
rtc, ...; serial bytes), guest vs VMM time. Names follow Prometheus conventions (``_total`` for
counters, base units).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtkit.service.daemon import Service


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


def vm_metrics(w: _Writer, st: dict[str, Any]) -> None:
    vm = st["name"]
    w.metric("virtkit_vm_up", "gauge", "1 if the VM's VMM is running", 1 if st.get("state") == "running" else 0, vm=vm)
    if "cpu_seconds" in st:
        w.metric(
            "virtkit_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VM's VMM process (cgroup)",
            st["cpu_seconds"],
            vm=vm,
        )
        w.metric(
            "virtkit_vm_cpu_throttled_seconds_total",
            "counter",
            "time the VM was held at its CPU quota",
            st.get("throttled_seconds", 0),
            vm=vm,
        )
        w.metric(
            "virtkit_vm_memory_cgroup_bytes",
            "gauge",
            "memory charged to the VM's cgroup",
            st.get("memory_cgroup_bytes", 0),
            vm=vm,
        )
    if "rss_bytes" in st:
        w.metric(
            "virtkit_vm_rss_bytes",
            "gauge",
            "resident memory of the VMM process (guest pages included)",
            st["rss_bytes"],
            vm=vm,
        )
    w.metric("virtkit_vm_memory_bytes", "gauge", "guest memory the VM was given", st.get("memory_bytes", 0), vm=vm)
    w.metric("virtkit_vm_vcpus", "gauge", "vCPUs of the VM", st.get("vcpus", 0), vm=vm)
    vmm = st.get("vmm") or {}
    for reason, n in sorted((vmm.get("exits") or {}).items()):
        w.metric("virtkit_vm_exits_total", "counter", "VM exits by reason", n, vm=vm, reason=reason)
    for device, n in sorted((vmm.get("device_exits") or {}).items()):
        w.metric("virtkit_vm_device_io_total", "counter", "port and MMIO accesses by device", n, vm=vm, device=device)
    if "serial_bytes" in vmm:
        w.metric(
            "virtkit_vm_serial_bytes_total",
            "counter",
            "bytes the guest wrote to its serial port",
            vmm["serial_bytes"],
            vm=vm,
        )


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def render(service: Service) -> str:
    w = _Writer()
    host = service.account.describe()
    w.metric("virtkit_host_cores", "gauge", "host CPU cores", _number(host["cores"]))
    w.metric(
        "virtkit_host_vcpu_capacity",
        "gauge",
        "vCPUs the service runs at once (cores x overcommit)",
        _number(host["vcpu_capacity"]),
    )
    w.metric("virtkit_host_vcpus_used", "gauge", "vCPUs of running VMs", _number(host["vcpus_used"]))
    w.metric(
        "virtkit_host_memory_capacity_bytes", "gauge", "memory the service gives VMs", _number(host["memory_capacity"])
    )
    w.metric(
        "virtkit_host_memory_used_bytes",
        "gauge",
        "memory held by running VMs (guest + VMM allowance)",
        _number(host["memory_used"]),
    )
    for rec in service.store.all():
        if rec["state"] != "running":
            w.metric("virtkit_vm_up", "gauge", "1 if the VM's VMM is running", 0, vm=rec["name"])
            continue
        try:
            vm_metrics(w, service.stats(rec["name"]))
        except Exception:  # noqa: BLE001, S112 - a VM that just ended is left out of this scrape
            continue
    return "\n".join(w.lines) + "\n"
