"""Where a distillation step's time goes, for any distillation spec whose teachers have checkpoints.

    python benchmarks/bench_distill_step.py SPEC [--from-step 400] [--steps 20] [--out DIR]

Builds the run's `Distiller` in a scratch directory (the student from `student.init`, the teachers from their
`checkpoint`s), runs one step to warm up, then `--steps` steps from `--from-step` (the off-policy share and the
learning rate are those of that step) and prints one JSON object: seconds per step and the mean of each
`time/*` metric the run logs (generate, wal, batch_other: tools and tokenising, teacher, loss, optimizer, push).
The student stays near its initial weights, so an agent domain's untrained student writes few calls: tool time
is what a real run's early steps see, not its late ones. To compare two versions of the code, run this at each
(`git stash` or a worktree) on the same machine, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as a run has it
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="a distillation spec (kind: distillation) with teacher checkpoints")
    parser.add_argument("--from-step", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="keep the scratch run here (default: a temp dir)")
    args = parser.parse_args()

    from controller.specs import load_any
    from opd.config import DistillationRun
    from opd.train import Distiller

    spec = load_any(args.spec)
    if not isinstance(spec, DistillationRun):
        raise SystemExit(f"{args.spec}: expected a distillation spec (kind: distillation)")
    scratch = Path(tempfile.mkdtemp(prefix="bench-distill-")) if args.out is None else args.out
    shutil.rmtree(scratch / "run", ignore_errors=True)
    distiller = Distiller(spec, scratch / "run")
    distiller.setup()
    distiller.step(args.from_step)  # warm-up: first-call costs (vLLM's graph, allocators) stay out of the figures
    sums: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(args.from_step + 1, args.from_step + 1 + args.steps):
        for name, value in distiller.step(step).items():
            if name.startswith("time/"):
                sums[name] = sums.get(name, 0.0) + value
    wall = time.perf_counter() - started
    print(json.dumps({"spec": str(args.spec), "from_step": args.from_step, "steps": args.steps,
                      "s_per_step": round(wall / args.steps, 4),
                      **{name: round(value / args.steps, 4) for name, value in sorted(sums.items())}}))
    if args.out is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
