"""Run the runtime from a sealed in-memory copy of the interpreter (the CVE-2019-5736 defence).

A container process can reach the binary of the process that started it through ``/proc/PID/exe``,
and a container whose entry point is ``#!/proc/self/exe`` even makes the kernel run that binary
inside the container. If the binary is the host's Python, the container can later open it for
writing and replace it (runc's CVE-2019-5736). runc answered by running from a sealed ``memfd``
copy of itself; virtkit does the same with the interpreter: the copy cannot be written
(F_SEAL_WRITE), shrunk or grown, and the seals cannot be removed (F_SEAL_SEAL). Python's own files
(libpython, the stdlib) stay unreachable: they are outside the container's mount namespace and
``/proc/PID/map_files`` needs CAP_SYS_ADMIN in the initial user namespace.

Processes that run the interpreter inside the container's namespaces also mark themselves
non-dumpable, so ``/proc/PID/exe`` of them cannot be opened from the container at all.
"""

from __future__ import annotations

import fcntl
import os
import sys

from virtkit.errors import ContainerError

MEMFD_NAME = "virtkit-python"
_ENV = "_VIRTKIT_SEALED"


def is_sealed() -> bool:
    try:
        return os.readlink("/proc/self/exe").startswith(f"/memfd:{MEMFD_NAME}")
    except OSError:
        return False


def ensure_sealed() -> None:
    """Re-execute this process from a sealed memfd copy of the interpreter, once.

    Costs one more interpreter start (about the time of ``python -c pass``); long-lived callers
    (a benchmark, a service) pay it once.
    """
    if is_sealed() or os.environ.get("VIRTKIT_UNSEALED") == "1":
        # the marker is for this process only: a child (say a CLI run) must seal itself anew
        os.environ.pop(_ENV, None)
        return
    if os.environ.get(_ENV) == "1":
        raise ContainerError(
            "re-executing the runtime from a sealed interpreter copy failed; set VIRTKIT_UNSEALED=1 to run unprotected"
        )
    fd = os.memfd_create(MEMFD_NAME, os.MFD_ALLOW_SEALING)
    with open("/proc/self/exe", "rb") as src:
        data = src.read()
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    env = dict(os.environ)
    env[_ENV] = "1"
    # argv[0] stays the interpreter's path: Python finds its prefix (and a venv's pyvenv.cfg) from it
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(f"/proc/self/fd/{fd}", argv, env)
