"""How many sandboxed snippets per second this machine runs, one at a time and concurrently.

Each snippet is a small, real program (a function and three assertions, as the code
reward runs them). Prints one JSON object.

    python benchmarks/bench_sandbox.py [--snippets 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from rewards import sandbox

SNIPPET = "def f(x):\n    return x * x + {n}\nassert f(2) == 4 + {n}\nassert f(0) == {n}\nprint(f(3))\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snippets", type=int, default=64)
    args = parser.parse_args()
    snippets = [SNIPPET.format(n=n) for n in range(args.snippets)]
    sandbox.run(snippets[0])  # warm-up: probes the isolation mode

    start = time.perf_counter()
    serial = [sandbox.run(s) for s in snippets]
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    parallel = sandbox.run_many(snippets)
    parallel_s = time.perf_counter() - start
    assert all(r.status == "passed" for r in serial + parallel), "a benchmark snippet failed"
    print(json.dumps({
        "isolation": serial[0].isolation,
        "cores": os.cpu_count(),
        "snippets": args.snippets,
        "serial_snippets_per_s": round(args.snippets / serial_s, 1),
        "concurrent_snippets_per_s": round(args.snippets / parallel_s, 1),
        "mean_latency_ms": round(1000 * sum(r.duration_s for r in serial) / len(serial), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
