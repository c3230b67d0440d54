"""`make bench`: run every benchmark module ``bench/bench_*.py`` (or the ones named) one after another.

    python -m bench.run              # all of them
    python -m bench.run spine vqa    # bench_spine and bench_vqa only

Each runs in its own process (so their argument parsing and peak-RSS accounting stay separate) and
records its figures in ``bench/RESULTS.md`` under its own heading. Benchmarks are run at MIMIC scale and
take minutes; they are not part of ``make test``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    available = sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py"))
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    failed = []
    for name in names or available:
        print(f"== bench_{name}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", f"bench.bench_{name}"], cwd=BENCH.parent).returncode
        print(f"== bench_{name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
