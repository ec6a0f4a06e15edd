"""Benchmark runner: `python -m bench <name> [--quick] [--json PATH]`, or `all`.

`python -m bench all [--quick]` runs every benchmark below and writes
bench/results/<name>.json, bench/results/REPORT.md and the PNG plots (bench/report.py).

Each benchmark is a module in this package exposing ``add_arguments(parser)`` and
``run(args) -> dict``; the runner adds the common flags, prints the result table and
writes the JSON. Benchmarks measure; they never assert timing (machines are noisy).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

# name -> module under bench/
BENCHMARKS: dict[str, str] = {
    "micro": "bench.micro",
    "protocol": "bench.protocol_bench",
    "round": "bench.round_bench",
    "accuracy": "bench.accuracy_bench",
    "scale": "bench.scale_bench",
    "committee-checks": "bench.committee_checks",
    "hostile": "bench.hostile",
}


def machine_info() -> dict[str, Any]:
    """Where the figures came from: they only compare within one machine and one run."""
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(result: dict[str, Any]) -> None:
    """Print the scalar results as an aligned two-column table."""
    scalars = {k: v for k, v in result.items() if isinstance(v, int | float | str | bool)}
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run one benchmark, print and save its result."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True, metavar="BENCHMARK")
    modules = {}
    for name, module_name in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        modules[name] = module
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=module.__doc__)
        p.add_argument("--quick", action="store_true", help="smaller workload, same key sizes")
        p.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON")
        module.add_arguments(p)
    every = sub.add_parser(
        "all", help="run every benchmark; write results/*.json, REPORT.md and PNG plots"
    )
    every.add_argument("--quick", action="store_true", help="smaller workloads, same key sizes")
    every.add_argument(
        "--results", type=Path, default=Path("bench/results"), help="output directory"
    )
    every.add_argument(
        "--report-only", action="store_true", help="rebuild REPORT.md and plots from the JSONs"
    )
    args = parser.parse_args(argv)
    if args.name == "all":
        from bench.report import run_all

        report = run_all(quick=args.quick, results=args.results, report_only=args.report_only)
        print(f"wrote {report}")
        return 0
    module = modules[args.name]
    started = time.perf_counter()
    result: dict[str, Any] = module.run(args)
    result.setdefault("benchmark", args.name)
    result["quick"] = bool(args.quick)
    result["wall_seconds"] = time.perf_counter() - started
    result["machine"] = machine_info()
    result["command"] = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"bench {args.name}:")
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
