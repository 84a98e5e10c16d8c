"""Run crun's own integration suite (``tests/test_*.py`` of a crun checkout) against OCI runtimes.

A measurement done by hand, not part of ``make test``: it fetches nothing and builds nothing. It
takes the path of a crun source checkout (``tests/`` is copied to a temporary directory at run
time, and removed afterwards; nothing of it enters this repository), the path of the suite's
``init`` helper already built from that checkout, and one or more runtimes to compare, all run in
the same invocation on the same host::

    flock /tmp/virtkit-cgroup-tests.lock python3 tools/crun_suite.py \\
        --checkout ~/src/crun --init ~/src/crun/tests/init \\
        --runtime crun=/usr/bin/crun --runtime virtkit=.venv/bin/virtkit-runtime

It prints, per test file, how many tests passed, were skipped and failed for each runtime, then
every test whose result differs between the runtimes, and writes the whole result as JSON
(``--json FILE``). The suite reports in TAP (``ok N - name``, ``ok N - name #SKIP``, ``not ok``).

crun 1.8 refuses a hybrid cgroup layout while any controller is attached to cgroup2 ("cgroups in
hybrid mode not supported"); on such a host (this project's machines: hugetlb on cgroup2) the
script mounts hugetlb as a v1 hierarchy for the whole run, so every runtime sees the same host,
and hands it back to cgroup2 afterwards (``--no-hugetlb-v1`` leaves the host as it is).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

HUGETLB_MOUNT = "/sys/fs/cgroup/hugetlb"
UNIFIED_CONTROLLERS = "/sys/fs/cgroup/unified/cgroup.controllers"
TAP_LINE = re.compile(r"^(ok|not ok) \d+ - (\S+)( #\s*SKIP.*?)?( # [\d.]+s)?$")


def _hugetlb_on_v2() -> bool:
    try:
        with open(UNIFIED_CONTROLLERS) as f:
            return "hugetlb" in f.read().split()
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def hugetlb_on_v1(enabled: bool) -> Iterator[None]:
    """Mount hugetlb as a v1 hierarchy for the duration (see the module docstring)."""
    if not enabled or not _hugetlb_on_v2():
        yield
        return
    made_dir = not os.path.isdir(HUGETLB_MOUNT)
    os.makedirs(HUGETLB_MOUNT, exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", HUGETLB_MOUNT], check=True)
    try:
        yield
    finally:
        _give_back_hugetlb()
        # an empty directory left on /sys/fs/cgroup's tmpfs looks like a hierarchy to podman,
        # which then makes directories and a 'tasks' file in it
        if made_dir and not os.path.ismount(HUGETLB_MOUNT):
            with contextlib.suppress(OSError):
                os.rmdir(HUGETLB_MOUNT)


def _give_back_hugetlb() -> None:
    """A v1 hierarchy outlives its unmount while it has child cgroups (a leaked or dying one):
    remove the empty children through a fresh mount, unmount, and retry until it is back."""
    for _ in range(60):
        subprocess.run(["umount", HUGETLB_MOUNT], check=False, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        if _hugetlb_on_v2():
            break
        subprocess.run(
            ["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", HUGETLB_MOUNT],
            check=False,
            stderr=subprocess.DEVNULL,
        )
        children = [os.path.join(t, d) for t, ds, _ in os.walk(HUGETLB_MOUNT) for d in ds]
        for d in sorted(children, key=lambda p: -p.count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(d)
    else:
        subprocess.run(["umount", HUGETLB_MOUNT], check=False, stderr=subprocess.DEVNULL)
        print(
            "crun_suite: warning: hugetlb did not return to cgroup2 (a cgroup is still busy there); "
            f"mount it at {HUGETLB_MOUNT}, remove what is below, and unmount it",
            file=sys.stderr,
        )


CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_dirs() -> set[str]:
    """Every cgroup directory on the host (all hierarchies)."""
    out: set[str] = set()
    for top, dirs, _files in os.walk(CGROUP_ROOT):
        for d in dirs:
            out.add(os.path.join(top, d))
    return out


def _ours(path: str) -> bool:
    """A cgroup the suite's containers make: its ids and cgroupsPaths start with 'test' (and one
    test freezes into '/frozen')."""
    rel = os.path.relpath(path, CGROUP_ROOT).split("/")[1:]
    return any(part.startswith("test") or part == "frozen" for part in rel)


def clean_cgroups(before: set[str]) -> list[str]:
    """Kill what a failed test left in the cgroups it made, and remove them; return their paths."""
    left = sorted((d for d in cgroup_dirs() - before if _ours(d)), key=lambda d: -d.count("/"))
    for d in left:
        with contextlib.suppress(OSError), open(os.path.join(d, "freezer.state"), "w") as f:
            f.write("THAWED")
        with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.freeze"), "w") as f:
            f.write("0")
        with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.procs")) as f:
            for pid in f.read().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), 9)
    for d in left:
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
    return left


def run_file(workdir: str, test_file: str, runtime: str, init: str, timeout: float) -> dict[str, str]:
    """Run one test file of the suite; map test name -> 'pass' | 'skip' | 'fail'."""
    env = dict(os.environ, OCI_RUNTIME=runtime, INIT=init, LANG="C")
    env.pop("RUN_TESTS", None)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join("tests", test_file)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        err = f"timed out after {timeout}s"
    results: dict[str, str] = {}
    for line in out.splitlines():
        m = TAP_LINE.match(line.strip())
        if m:
            results[m.group(2)] = "fail" if m.group(1) == "not ok" else ("skip" if m.group(3) else "pass")
    if not results and err:
        results[f"{test_file}:(no TAP output)"] = "fail"
    with open(os.path.join(workdir, f"{test_file}.{os.path.basename(runtime)}.log"), "w") as f:
        f.write(out + "\n--- stderr ---\n" + err)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", required=True, help="a crun source checkout (its tests/ is copied to a temp dir)")
    ap.add_argument("--init", required=True, help="the suite's init helper, already built")
    ap.add_argument("--runtime", action="append", required=True, metavar="NAME=PATH", help="repeatable")
    ap.add_argument("--tests", nargs="*", default=None, help="test files (default: every tests/test_*.py)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test file and runtime")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep-logs", default=None, metavar="DIR", help="copy each file's TAP log here")
    ap.add_argument("--no-hugetlb-v1", action="store_true", help="do not move hugetlb to a v1 hierarchy")
    args = ap.parse_args()

    runtimes: list[tuple[str, str]] = []
    for spec in args.runtime:
        name, sep, path = spec.partition("=")
        if not sep or not os.access(path, os.X_OK):
            ap.error(f"--runtime {spec!r}: want NAME=PATH of an executable")
        runtimes.append((name, os.path.abspath(path)))
    src = os.path.join(args.checkout, "tests")
    if not os.path.isfile(os.path.join(src, "tests_utils.py")):
        ap.error(f"{args.checkout} has no tests/tests_utils.py: not a crun checkout")
    init = os.path.abspath(args.init)
    if not os.access(init, os.X_OK):
        ap.error(f"--init {args.init}: not an executable")

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(f"crun_suite: stopped by signal {signum}")  # runs the cleanups below

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workdir = tempfile.mkdtemp(prefix="crun-suite-")
    try:
        shutil.copytree(src, os.path.join(workdir, "tests"), symlinks=True)
        files = args.tests or sorted(f for f in os.listdir(src) if f.startswith("test_") and f.endswith(".py"))
        table: dict[str, dict[str, dict[str, str]]] = {}
        with hugetlb_on_v1(not args.no_hugetlb_v1):
            for test_file in files:
                for name, path in runtimes:
                    before = cgroup_dirs()
                    res = run_file(workdir, test_file, path, init, args.timeout)
                    leaked = clean_cgroups(before)
                    if leaked:
                        print(f"  ({name} left {len(leaked)} cgroup directories; removed)", flush=True)
                    table.setdefault(test_file, {})[name] = res
                    n = {k: sum(1 for v in res.values() if v == k) for k in ("pass", "skip", "fail")}
                    print(
                        f"{test_file:28} {name:10} pass {n['pass']:3}  skip {n['skip']:3}  fail {n['fail']:3}",
                        flush=True,
                    )
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for f in os.listdir(workdir):
                if f.endswith(".log"):
                    shutil.copy(os.path.join(workdir, f), args.keep_logs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    for name, _ in runtimes:
        totals = {"pass": 0, "skip": 0, "fail": 0}
        for per in table.values():
            for v in per.get(name, {}).values():
                totals[v] += 1
        print(f"total {name:10} pass {totals['pass']:4}  skip {totals['skip']:4}  fail {totals['fail']:4}")
    print("\ndifferences:")
    for test_file, per in table.items():
        names = sorted({t for res in per.values() for t in res})
        for t in names:
            outcome = {rt: per[rt].get(t, "absent") for rt, _ in runtimes}
            if len(set(outcome.values())) > 1:
                print(f"  {test_file}:{t}: " + ", ".join(f"{k} {v}" for k, v in outcome.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
