"""Container runtime latency: virtkit against crun and runc, on the same bundle, in one run.

    python -m bench.containers [--runs N] [--quick]

Each run is create + start + wait + delete of a busybox ``/bin/true`` container with the same
``config.json`` (virtkit's default: Docker's capabilities, seccomp profile, masked paths, six
namespaces, a device cgroup). Measured per path: the median and 90th percentile of the wall time,
and the peak RSS of the runtime process (``wait4``):

* ``crun run`` and ``runc run``: each runtime's one-shot CLI;
* ``virtkit oci run --rm``: virtkit's one-shot CLI, as it ships (it re-executes once from a sealed
  copy of the interpreter: the CVE-2019-5736 defence), and the same with ``VIRTKIT_UNSEALED=1``
  to show what that costs;
* ``virtkit warm``: a long-lived Python process that sealed itself once and calls the runtime as a
  library (``Runtime.create/start/wait/delete``): the path a service or an orchestrator uses.

crun refuses this machine's hybrid cgroup layout ("cgroups in hybrid mode not supported") while a
controller (hugetlb) is still attached to cgroup2: the benchmark mounts hugetlb as a v1 hierarchy
for crun's runs only and unmounts it afterwards, which hands the controller back to cgroup2.
Nothing here asserts a time; results go to bench/results/containers.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HUGETLB_MOUNT = "/sys/fs/cgroup/hugetlb"


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """(seconds, peak RSS KiB of the process tree it waited for, exit status)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}: {err.strip()[:300]}")
    return elapsed, usage.ru_maxrss, p.returncode


def make_bundle(base: Path) -> Path:
    from virtkit.container.image import ensure_busybox
    from virtkit.container.spec import default_spec

    image = Path(ensure_busybox(str(base / "images")))
    bundle = base / "bundle"
    bundle.mkdir()
    shutil.copytree(image / "rootfs", bundle / "rootfs", symlinks=True)
    (bundle / "config.json").write_text(json.dumps(default_spec(["/bin/true"]), indent=1))
    return bundle


@contextlib.contextmanager
def hugetlb_on_v1() -> Iterator[bool]:
    """Mount hugetlb as a v1 hierarchy (so no controller is left on cgroup2) for crun."""
    try:
        with open("/sys/fs/cgroup/unified/cgroup.controllers") as f:
            on_v2 = "hugetlb" in f.read().split()
    except FileNotFoundError:
        on_v2 = False
    if not on_v2:
        yield False
        return
    made_dir = not os.path.isdir(HUGETLB_MOUNT)
    os.makedirs(HUGETLB_MOUNT, exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", HUGETLB_MOUNT], check=True)
    try:
        yield True
    finally:
        # The kernel keeps a v1 hierarchy alive if it still has (dying) child cgroups when it is
        # unmounted, and then never hands hugetlb back to cgroup2. crun's last cgroup may still be
        # dying right after its run: unmount, and if the controller is not back, mount and unmount
        # again once the children are gone.
        for _ in range(50):
            subprocess.run(["umount", HUGETLB_MOUNT], check=False, stderr=subprocess.DEVNULL)
            time.sleep(0.1)
            with open("/sys/fs/cgroup/unified/cgroup.controllers") as f:
                if "hugetlb" in f.read().split():
                    break
            subprocess.run(
                ["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", HUGETLB_MOUNT],
                check=False,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.1)
        else:
            print(f"warning: hugetlb did not return to cgroup2; check {HUGETLB_MOUNT}", file=sys.stderr)
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(HUGETLB_MOUNT)


def _peak_rss(cmd: list[str], env: dict[str, str] | None) -> int:
    """Peak RSS (KiB) of the runtime process as GNU time reports it: its parent is small, so the
    figure is the runtime's own and not that of a forked copy of this benchmark."""
    if not os.path.exists("/usr/bin/time"):
        return 0
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    try:
        return int(out.stderr.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def summarize(name: str, times: list[float], rss: list[int]) -> dict[str, Any]:
    times.sort()
    return {
        "path": name,
        "runs": len(times),
        "median_ms": statistics.median(times) * 1000,
        "p90_ms": times[int(0.9 * (len(times) - 1))] * 1000,
        "min_ms": times[0] * 1000,
        "peak_rss_kib": max(rss) if rss else None,
    }


def warm_worker(bundle: str, root: str) -> None:
    """Runs in its own process, sealed once: the runtime as a library. Reads a container id per line
    on stdin, answers with the seconds create+start+wait+delete took; its peak RSS at EOF."""
    from virtkit.container.sealexe import ensure_sealed

    ensure_sealed()
    import resource

    from virtkit.container.runtime import Runtime

    rt = Runtime(root)
    for line in sys.stdin:
        cid = line.strip()
        t0 = time.perf_counter()
        rt.create(cid, bundle)
        rt.start(cid)
        info = rt.wait(cid)
        rt.delete(cid)
        elapsed = time.perf_counter() - t0
        if info.get("exitStatus") != 0:
            raise RuntimeError(f"warm run {cid}: {info}")
        print(elapsed, flush=True)
    print(f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)


class Warm:
    def __init__(self, bundle: Path, root: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.containers", "--warm-worker", str(bundle), str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def __call__(self, cid: str) -> tuple[float, int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(cid + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the warm worker died")
        return float(line), 0

    def close(self) -> int:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.close()
        rss = 0
        for line in self.proc.stdout:
            if line.startswith("rss "):
                rss = int(line.split()[1])
        self.proc.wait()
        return rss


def run(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    if os.geteuid() != 0:
        print("containers: needs root (namespaces, cgroups); skipped")
        return {}
    runs = runs or (10 if quick else 40)
    base = Path(tempfile.mkdtemp(prefix="virtkit-bench-"))
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        bundle = make_bundle(base)
        py = sys.executable
        # an installed package has bytecode; with PYTHONDONTWRITEBYTECODE=1 (as here) a source tree
        # would be compiled again by every one-shot CLI run, which is not what a user pays
        subprocess.run([py, "-m", "compileall", "-q", str(ROOT / "virtkit")], check=True, stdout=subprocess.DEVNULL)
        env_sealed = {k: v for k, v in os.environ.items() if k != "VIRTKIT_UNSEALED"}
        env_unsealed = dict(env_sealed, VIRTKIT_UNSEALED="1")
        vroot = str(base / "virtkit")

        def virtkit(cid: str) -> list[str]:
            return [py, "-m", "virtkit", "--root", vroot, "oci", "run", cid, "--bundle", str(bundle), "--rm"]

        # every path, its command builder and environment; runs are interleaved round-robin so that
        # a change in the machine's load (other work on this 2-core host) hits every path alike
        paths: list[tuple[str, Any, dict[str, str] | None]] = []
        versions = {}
        for tool in ("crun", "runc"):
            if shutil.which(tool) is None:
                notes.append(f"{tool} is not installed: skipped")
                continue
            versions[tool] = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
            troot = str(base / tool)

            def cmd(cid: str, tool: str = tool, troot: str = troot) -> list[str]:
                return [tool, "--root", troot, "run", "-b", str(bundle), cid]

            paths.append((f"{tool} run", cmd, None))
        paths.append(("virtkit oci run (CLI, sealed)", virtkit, env_sealed))
        paths.append(("virtkit oci run (CLI, unsealed)", virtkit, env_unsealed))
        warm = Warm(bundle, base / "warm", env_sealed)
        paths.append(("virtkit warm (library, sealed once)", warm, None))
        times: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        rss: dict[str, int] = {}
        with hugetlb_on_v1() as moved:
            if moved:
                notes.append(
                    "crun needs no controller left on cgroup2: hugetlb was mounted as a v1 hierarchy "
                    "for the whole run and handed back to cgroup2 afterwards"
                )
            for i in range(runs + 2):
                for name, build, env in paths:
                    cid = f"b{os.getpid()}-{name.split()[0]}-{i}"
                    if isinstance(build, Warm):
                        t, _ = build(cid)
                    else:
                        t, _, _ = _timed(build(cid), env)
                    if i >= 2:  # two warm-up rounds: page cache, pyc files
                        times[name].append(t)
            # peak RSS of each runtime process, measured by GNU time in separate runs
            for name, build, env in paths:
                if isinstance(build, Warm):
                    continue
                rss[name] = _peak_rss(build(f"rss{os.getpid()}-{name.split()[0]}"), env)
        rss[paths[-1][0]] = warm.close()
        results.extend(summarize(name, times[name], [rss.get(name, 0)]) for name, _, _ in paths)
        startup = [_timed([py, "-c", "pass"])[0] for _ in range(10)]
        notes.append(f"python -c pass alone: median {statistics.median(startup) * 1000:.1f} ms")
    finally:
        shutil.rmtree(base, ignore_errors=True)

    from virtkit.doctor import probe

    record = {
        "suite": "containers",
        "bundle": "busybox /bin/true, virtkit default spec",
        "runs": runs,
        "results": results,
        "notes": notes,
        "versions": versions,
        "host": {k: probe().get(k) for k in ("kernel", "cpu_model", "cpu_count", "kvm_flavor")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows = [
        [
            r["path"],
            f"{r['median_ms']:.1f}",
            f"{r['p90_ms']:.1f}",
            f"{r['min_ms']:.1f}",
            f"{(r['peak_rss_kib'] or 0) / 1024:.1f}",
        ]
        for r in results
    ]
    table = ["| path | median ms | p90 ms | min ms | peak RSS MiB |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    md = (
        f"## Container runtimes: create+start+wait+delete of /bin/true ({runs} runs each)\n\n"
        + "\n".join(table)
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "containers.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "containers.md").write_text(md)
    print(md)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.containers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warm-worker", nargs=2, metavar=("BUNDLE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm_worker:
        warm_worker(args.warm_worker[0], args.warm_worker[1])
        return 0
    run(quick=args.quick, runs=args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
