"""vLLM engine start and generation speed, compiled (torch.compile) against eager, side by side in one run.

Every specialist job and every distillation run starts an engine on a checkpoint path
nobody has compiled before, and vLLM's compile cache is keyed by that path; so each
start here gets a fresh cache, as a job does. A third start compiles the same path
again over the cache the first one left (a rerun of the same job). Each start is a
subprocess, so imports and caches do not leak from one to the next. Prints one JSON object.

    python benchmarks/bench_engine_start.py [--threads 1] [--prompts 64] [--max-tokens 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def child(model: str, eager: bool, prompts: int, max_tokens: int, repeats: int) -> dict[str, float]:
    """One engine start and its generation speed (run in a subprocess of its own)."""
    started = time.perf_counter()
    from vllm import SamplingParams

    from rollout.engine import VLLMEngine

    engine = VLLMEngine(model, enforce_eager=eager)
    ready = time.perf_counter()
    batch = [{"prompt_token_ids": [1, 5 + i % 50, 7, 9, 11]} for i in range(prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, seed=0)
    engine.llm.generate(batch, params, use_tqdm=False)  # the first batch pays one-off costs
    first = time.perf_counter()
    for _ in range(repeats):
        engine.llm.generate(batch, params, use_tqdm=False)
    done = time.perf_counter()
    return {"start_s": round(ready - started, 2), "first_batch_s": round(first - ready, 3),
            "tokens_per_s": round(repeats * prompts * max_tokens / (done - first))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a specialist job has 1)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        model, mode = args.child
        print(json.dumps(child(model, mode == "eager", args.prompts, args.max_tokens, args.repeats)))
        return

    from specialists.base_model import init_base_model

    work = Path(tempfile.mkdtemp(prefix="bench-engine-start-"))
    model = str(init_base_model(work / "base"))
    results: dict[str, dict[str, float]] = {}
    for name, mode, cache in (("compiled_fresh_cache", "compiled", "a"), ("eager", "eager", "b"),
                              ("compiled_warm_cache", "compiled", "a")):
        env = {**os.environ, "VLLM_CACHE_ROOT": str(work / f"cache-{cache}"), "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                              os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, __file__, "--child", model, mode, "--threads", str(args.threads),
                              "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                              "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    compiled, eager = results["compiled_fresh_cache"], results["eager"]
    print(json.dumps({"threads": args.threads, "prompts": args.prompts, "max_tokens": args.max_tokens, **results,
                      "start_saved_s": round(compiled["start_s"] - eager["start_s"], 1),
                      "eager_vs_compiled_tokens_per_s": round(eager["tokens_per_s"] / compiled["tokens_per_s"], 3)},
                     indent=2))


if __name__ == "__main__":
    main()
