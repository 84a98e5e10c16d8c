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
    if any(s.startswith("containers") for s in selected):
        # The container library re-executes its process from a sealed copy of the interpreter
        # (virtkit/container/sealexe.py); do it now, before any suite ran, not half-way through.
        from virtkit.container.sealexe import ensure_sealed

        ensure_sealed()
    for name in selected:
        print(f"== {name}", flush=True)
        importlib.import_module(SUITES[name]).run(quick=args.quick)  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
