"""Security defaults: capabilities, no_new_privs, seccomp, and the sealed interpreter (CVE-2019-5736)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from virtkit.host.caps import CAPABILITIES, DOCKER_DEFAULT

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


def _caps(out: str, field: str) -> int:
    for line in out.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"{field} not in {out!r}")


def test_docker_default_capabilities_and_nnp(run_container: Any, bundle: Any) -> None:
    status, out = run_container("caps", bundle(["cat", "/proc/self/status"]))
    assert status == 0
    expect = sum(1 << CAPABILITIES[c] for c in DOCKER_DEFAULT)
    assert _caps(out, "CapEff") == expect
    assert _caps(out, "CapBnd") == expect
    assert _caps(out, "CapInh") == 0 and _caps(out, "CapAmb") == 0
    assert "NoNewPrivs:\t1" in out
    assert "Seccomp:\t2" in out


def test_custom_capabilities_and_non_root(run_container: Any, bundle: Any) -> None:
    caps = ["CAP_NET_BIND_SERVICE"]
    b = bundle(
        ["cat", "/proc/self/status"],
        {
            "process.capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "inheritable": caps,
                "ambient": caps,
            },
            "process.user": {"uid": 1000, "gid": 1000},
        },
    )
    status, out = run_container("caps2", b)
    assert status == 0
    bit = 1 << CAPABILITIES["CAP_NET_BIND_SERVICE"]
    assert _caps(out, "CapEff") == bit and _caps(out, "CapAmb") == bit and _caps(out, "CapBnd") == bit


def test_dropped_capability_is_enforced(run_container: Any, bundle: Any) -> None:
    # CAP_NET_ADMIN is not in Docker's set: even root in the container cannot change a link
    status, out = run_container("netadmin", bundle(["sh", "-c", "ip link set lo down 2>&1; echo rc=$?"]))
    assert "rc=0" not in out and ("not permitted" in out or "Operation not permitted" in out)


@pytest.mark.parametrize(
    "command",
    [
        "unshare -U true",
        "unshare -m true",
        "mount -t tmpfs none /mnt",
        "nsenter -t 1 -n true",
    ],
)
def test_seccomp_blocks_namespace_and_mount_calls(run_container: Any, bundle: Any, command: str) -> None:
    # give CAP_SYS_ADMIN so that only seccomp stands in the way... minus the seccomp rules it unlocks
    from virtkit.container.seccomp import default_profile

    def edit(raw: dict[str, Any]) -> None:
        caps = [*DOCKER_DEFAULT, "CAP_SYS_ADMIN"]
        raw["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
        raw["linux"]["seccomp"] = default_profile(DOCKER_DEFAULT)  # the profile of a container without it

    b = bundle(["sh", "-c", f"{command} 2>&1; echo rc=$?"], edit=edit)
    status, out = run_container("sc", b)
    assert status == 0, out
    assert "rc=0" not in out
    assert "not permitted" in out or "permission denied" in out  # EPERM, as util-linux/busybox word it


def test_without_seccomp_the_same_call_succeeds(run_container: Any, bundle: Any) -> None:
    """The control for the test above: CAP_SYS_ADMIN and no filter lets unshare through."""

    def edit(raw: dict[str, Any]) -> None:
        caps = [*DOCKER_DEFAULT, "CAP_SYS_ADMIN"]
        raw["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
        del raw["linux"]["seccomp"]

    status, out = run_container("nosc", bundle(["sh", "-c", "unshare -m true; echo rc=$?"], edit=edit))
    assert "rc=0" in out


def test_seccomp_errno_profile(run_container: Any, bundle: Any) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 28}],
        }

    status, out = run_container("errno", bundle(["sh", "-c", "mkdir /tmp/x 2>&1; echo rc=$?"], edit=edit))
    assert "No space left on device" in out


def test_seccomp_without_no_new_privs(run_container: Any, bundle: Any) -> None:
    """Without no_new_privs the filter goes in before capabilities are dropped (needs CAP_SYS_ADMIN)."""
    status, out = run_container(
        "nonnp",
        bundle(["sh", "-c", "grep -E 'NoNewPrivs|Seccomp:' /proc/self/status"], {"process.noNewPrivileges": False}),
    )
    assert status == 0
    assert "NoNewPrivs:\t0" in out and "Seccomp:\t2" in out


def test_init_runs_from_a_sealed_interpreter_copy(tmp_path: Path, bundle: Any, rt: Any) -> None:
    """CVE-2019-5736: the binary behind /proc/PID/exe of the runtime's processes in the container
    is a sealed memfd copy, which cannot be written; the host interpreter is never exposed."""
    b = bundle(["true"])
    root = rt.dirs.root
    env = dict(os.environ)
    env.pop("VIRTKIT_UNSEALED", None)
    subprocess.run(
        [sys.executable, "-m", "virtkit", "--root", root, "create", "sealed", "--bundle", str(b)],
        check=True,
        env=env,
        timeout=60,
    )
    pid = rt.state("sealed")["pid"]
    assert os.readlink(f"/proc/{pid}/exe").startswith("/memfd:virtkit-python")
    with open(f"/proc/{pid}/status") as f:
        assert "NoNewPrivs" in f.read()
    # the CVE's move: keep a handle on the binary, wait for the process to end, reopen it for writing
    handle = os.open(f"/proc/{pid}/exe", os.O_PATH)
    try:
        rt.delete("sealed", force=True)
        with pytest.raises(PermissionError):
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDWR)
            try:
                os.write(fd, b"\x7fELF-overwritten")
            finally:
                os.close(fd)
    finally:
        os.close(handle)


IO_URING_PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    char params[120] = {0};  /* struct io_uring_params */
    long fd = syscall(425 /* io_uring_setup */, 1, params);
    printf("io_uring_setup: %s\n", fd < 0 ? strerror(errno) : "ok");
    return 0;
}
"""


@pytest.fixture(scope="module")
def io_uring_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the io_uring probe")
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(IO_URING_PROBE)
    subprocess.run(["gcc", "-static", "-O", "-o", str(d / "probe"), str(d / "probe.c")], check=True, timeout=120)
    return d / "probe"


@pytest.mark.parametrize("with_seccomp", [True, False], ids=["default-profile", "no-filter-control"])
def test_io_uring_is_denied_by_the_default_profile(
    run_container: Any, bundle: Any, io_uring_probe: Path, with_seccomp: bool
) -> None:
    import shutil

    def edit(raw: dict[str, Any]) -> None:
        if not with_seccomp:
            del raw["linux"]["seccomp"]

    b = bundle(["/probe"], edit=edit)
    shutil.copy(io_uring_probe, b / "rootfs" / "probe")
    status, out = run_container("uring", b)
    assert status == 0, out
    # the control shows the kernel has io_uring, so the denial is the filter's doing
    assert out.strip() == ("io_uring_setup: Operation not permitted" if with_seccomp else "io_uring_setup: ok")
