"""``make bench`` / ``python -m bench [SUITE...] [--quick]``: run benchmark suites, write
tables, JSON and plots under bench/results/."""

from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {
    "vmm": "bench.vmm",
    "paravirt": "bench.paravirt",
    "containers": "bench.containers",
    "containers_overhead": "bench.containers_overhead",
    "failover": "bench.failover",
    "service": "bench.service",
    "linux": "bench.linux",
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"suites to run: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}: choose from {', '.join(SUITES)}")
    selected = args.suites or list(SUITES)
    # Every `virtkit` a suite starts loads the package from its .pyc files; with
    # PYTHONDONTWRITEBYTECODE set (as on our machines) a module edited since the last `make setup`
    # would be compiled again at each start and the boot figures would measure the compiler.
    import compileall
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package in ("virtkit", "bench"):
        compileall.compile_dir(root / package, quiet=1)
    if any(s.startswith("containers") for s in selected):
        # The container library re-executes its process from a sealed copy of the interpreter
        # (virtkit/container/sealexe.py); do it now, before any suite ran, not half-way through.
        from virtkit.container.sealexe import ensure_sealed

        ensure_sealed()
    import json

    from bench import readme
    from bench.common import RESULTS, conditions_after, conditions_before

    for name in selected:
        print(f"== {name}", flush=True)
        cond = conditions_before()
        importlib.import_module(SUITES[name]).run(quick=args.quick)  # type: ignore[attr-defined]
        cond = conditions_after(cond)
        # every result says what the machine was doing meanwhile: a figure from a busy machine
        # is kept, but marked as such (here, in its JSON and in the README)
        path = RESULTS / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            data["conditions"] = cond
            path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        if cond["busy"]:
            others = ", ".join(f"{p['name']} ({p['cpu_share']:.0%})" for p in cond["others_before"]) or "none seen"
            print(
                f"bench: warning: {name} ran on a busy machine (load {cond['load_before'][0]:.2f} on "
                f"{cond['cpu_count']} cores; other processes: {others}): its figures are pessimistic",
                file=sys.stderr,
            )
    readme.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
