"""Rollout throughput: vLLM engine vs the transformers engine, and what the WAL costs.

Side by side in one run, on the same tiny model and prompts: 256 prompts × up to
128 sampled tokens, EOS allowed (uneven lengths, as in real rollouts). Prints one
JSON object with `vllm_tokens_per_s`, `hf_tokens_per_s`, `vllm_wal_tokens_per_s`
and their ratios. vLLM runs are repeated, interleaved with the WAL runs, and the
median is reported so machine noise hits both sides alike.

    python benchmarks/bench_rollout.py [--prompts 256] [--max-tokens 128] [--device cuda] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def make_requests(tokenizer, n: int, max_tokens: int, offset: int = 0):
    from rollout.service import RolloutRequest

    requests = []
    for i in range(n):
        text = f"<|user|>Question {i}: what is {i % 97} + {(i * 7) % 89}? Answer briefly.\n<|assistant|>"
        requests.append(RolloutRequest(id=f"p{offset + i}", prompt_ids=tuple(tokenizer(text)["input_ids"]),
                                       max_tokens=max_tokens, temperature=1.0, seed=i))
    return requests


def time_engine(engine, requests) -> tuple[float, int]:
    from rollout.engine import GenerationRequest

    reqs = [GenerationRequest(r.id, r.prompt_ids, r.max_tokens, r.temperature, r.top_p, r.seed) for r in requests]
    start, tokens = time.perf_counter(), 0
    for step in engine.generate(reqs):
        tokens += sum(len(c.token_ids) for c in step)
    return time.perf_counter() - start, tokens


def time_service(engine, requests, run_dir: Path, batch: str) -> tuple[float, int]:
    from rollout.service import RolloutService

    service = RolloutService(engine, run_dir)  # default commit mode: group commit
    start = time.perf_counter()
    rollouts = service.run(batch, requests)
    return time.perf_counter() - start, sum(len(r.completion_ids) for r in rollouts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", help="checkpoint to use (default: a freshly built tiny model)")
    parser.add_argument("--enforce-eager", action="store_true", help="skip vLLM's torch.compile")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from rollout.engine import HFEngine, VLLMEngine
    from specialists.base_model import init_base_model

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    model = args.model or str(init_base_model(work / "model", seed=0))
    tokenizer = AutoTokenizer.from_pretrained(model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    hf = HFEngine(model, device=args.device, dtype=dtype)
    time_engine(hf, make_requests(tokenizer, 8, 8))  # warm-up
    hf_s, hf_tokens = time_engine(hf, make_requests(tokenizer, args.prompts, args.max_tokens))
    del hf

    vllm = VLLMEngine(model, dtype="bfloat16" if args.device == "cuda" else "float32", max_model_len=512,
                      enforce_eager=args.enforce_eager)
    time_engine(vllm, make_requests(tokenizer, 8, 8))  # warm-up
    plain, logged = [], []
    for round_ in range(args.repeats):
        s, n = time_engine(vllm, make_requests(tokenizer, args.prompts, args.max_tokens))
        plain.append(n / s)
        requests = make_requests(tokenizer, args.prompts, args.max_tokens, offset=round_ * args.prompts)
        s, n = time_service(vllm, requests, work / "service", f"b{round_}")
        logged.append(n / s)

    result = {
        "device": args.device,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "hf_tokens": hf_tokens,
        "hf_tokens_per_s": round(hf_tokens / hf_s, 1),
        "vllm_tokens_per_s": round(statistics.median(plain), 1),
        "vllm_wal_tokens_per_s": round(statistics.median(logged), 1),
        "vllm_runs_tokens_per_s": [round(x, 1) for x in plain],
        "vllm_wal_runs_tokens_per_s": [round(x, 1) for x in logged],
    }
    result["vllm_over_hf"] = round(result["vllm_tokens_per_s"] / result["hf_tokens_per_s"], 3)
    result["wal_cost_fraction"] = round(1 - result["vllm_wal_tokens_per_s"] / result["vllm_tokens_per_s"], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
