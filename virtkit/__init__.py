"""virtkit: a virtualization toolkit in Python.

A KVM virtual machine monitor (full and paravirtualized guests), an OCI container runtime,
and snapshot/restore/migration, all measured against their real peers.

The public Python API is imported lazily so that ``virtkit run`` starts fast::

    from virtkit import VM
    with VM(kernel="build/guests/hello.elf", memory="64M") as vm:
        result = vm.run(timeout=5)
    print(result.exit_code, result.serial_output)
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs ~10 ms of start-up: only type checkers import it

__version__ = "0.1.0"

if TYPE_CHECKING:
    from typing import Any

    from virtkit.api import VM, RunResult
    from virtkit.errors import VirtkitError

__all__ = ["VM", "RunResult", "VirtkitError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("VM", "RunResult"):
        from virtkit import api

        return getattr(api, name)
    if name == "VirtkitError":
        from virtkit.errors import VirtkitError

        return VirtkitError
    raise AttributeError(f"module 'virtkit' has no attribute {name!r}")
