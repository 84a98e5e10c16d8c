"""OCI containers: a runtime-spec 1.x runtime (namespaces, pivot_root, cgroups v1/hybrid/v2, Docker's
security defaults), registry-free images, and bridge networking.

Layers, each importing only downward (the host kernel's calls, the syscall table, capabilities,
the seccomp compiler and the cgroup files are :mod:`virtkit.host`'s)::

    config, spec            config.json parsing (errors name the field) and the default config
    seccomp                 the shape check of linux.seccomp; Docker's default profile
    devices                 the device allowlist as a cgroup2 eBPF program
    cgroups, rootfs         OCI resources as cgroup limits, stats/OOM reports; the container's
                            mount namespace
    state                   the state directory (crash-consistent records, locking)
    process                 the forked monitor/setup/init and exec processes
    network, image          --net bridge; busybox, OCI layouts, docker-save archives, overlayfs
    runtime                 the verbs: create, start, kill, delete, run, exec, ps, stats, events,
                            pause, resume, update
    features                runtime-spec features.md, and runc's update flags as linux.resources
    sealexe                 run from a sealed interpreter copy (CVE-2019-5736)

Independent of the VM stack: may import ``virtkit.host``, ``virtkit.errors`` and
``virtkit.records`` only.

Library use (the warm path)::

    from virtkit.container import Runtime
    rt = Runtime("/run/virtkit")
    rt.create("web", "/path/to/bundle"); rt.start("web")
    print(rt.wait("web"))          # {'exitStatus': 0, 'signal': None, 'oomKilled': False}
    rt.delete("web")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtkit.container.runtime import Runtime

__all__ = ["Runtime"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from virtkit.container.runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'virtkit.container' has no attribute {name!r}")
