"""Rollout throughput: vLLM engine vs the transformers engine, and what the WAL costs.

Side by side in one run, on the same tiny model and prompts: 256 prompts × up to
128 sampled tokens, EOS allowed (uneven lengths, as in real rollouts). Prints one
JSON object with `vllm_tokens_per_s`, `hf_tokens_per_s` (Retort's transformers
engine, which drops finished rows from the batch), `vllm_wal_tokens_per_s`, and
for reference `hf_generate_tokens_per_s` (transformers' own `generate()`, the
path TRL takes without vLLM), with the ratios. Every engine runs once per round; the ratios are the medians of
the ratios within each round, so machine drift between rounds cancels.

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


def time_hf_generate(model, requests, device: str) -> tuple[float, int]:
    """transformers' own `generate()` on the whole batch (what TRL uses without vLLM): no row dropping."""
    import torch

    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in requests], device=device)
    mask = (torch.arange(width, device=device)[None] >= torch.tensor(
        [width - len(r.prompt_ids) for r in requests], device=device)[:, None]).long()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=requests[0].max_tokens, pad_token_id=pad, eos_token_id=eos)
    elapsed = time.perf_counter() - start
    completions = out[:, width:]
    tokens = int(sum(int((row != pad).sum()) for row in completions))  # up to and including EOS
    return elapsed, tokens


class TimedEngine:
    """Wraps an engine and adds up the time spent inside it, so the service's own share can be read off."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0
        self.eos_token_id, self.max_model_len = engine.eos_token_id, engine.max_model_len

    def generate(self, requests):
        steps = self.engine.generate(requests)
        while True:
            start = time.perf_counter()
            try:
                step = next(steps)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield step


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
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="skip vLLM's torch.compile (default: eager on a CPU, compiled on a GPU)")
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
    vllm = VLLMEngine(model, dtype="bfloat16" if args.device == "cuda" else "float32", max_model_len=512,
                      enforce_eager=args.enforce_eager)
    time_engine(vllm, make_requests(tokenizer, 8, 8))  # warm-up
    runs: dict[str, list[float]] = {"hf": [], "hf_generate": [], "vllm": [], "vllm_wal": []}
    # Of each vLLM run's wall time, the part spent outside engine steps: in the bare loop, reading the
    # chunks and freeing them; in the WAL run, that plus everything the service and its WAL do.
    outside = {"vllm": [], "vllm_wal": []}
    for round_ in range(args.repeats):  # interleaved, so noise on this machine hits every engine alike
        requests = make_requests(tokenizer, args.prompts, args.max_tokens)
        s, n = time_engine(hf, requests)
        runs["hf"].append(n / s)
        s, n = time_hf_generate(hf.model, requests, args.device)
        runs["hf_generate"].append(n / s)
        # The same prompts and seeds under new ids (same tokens), back to back, in alternating order:
        # the WAL's cost is a few percent, well inside this machine's drift between runs.
        wal_requests = make_requests(tokenizer, args.prompts, args.max_tokens, offset=(round_ + 1) * args.prompts)
        for name in ("vllm", "vllm_wal") if round_ % 2 == 0 else ("vllm_wal", "vllm"):
            timed = TimedEngine(vllm)
            if name == "vllm":
                s, n = time_engine(timed, requests)
            else:
                s, n = time_service(timed, wal_requests, work / "service", f"b{round_}")
            outside[name].append(1 - timed.seconds / s)
            runs[name].append(n / s)

    def paired(numerator: str, denominator: str) -> float:
        """Median over rounds of the ratio measured within each round."""
        return statistics.median(a / b for a, b in zip(runs[numerator], runs[denominator], strict=True))

    result = {"device": args.device, "prompts": args.prompts, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "statistic": "medians of interleaved runs; ratios: median of per-round ratios"}
    for name, values in runs.items():
        result[f"{name}_tokens_per_s"] = round(statistics.median(values), 1)
    result["runs_tokens_per_s"] = {name: [round(v) for v in values] for name, values in runs.items()}
    result["vllm_over_hf"] = round(paired("vllm", "hf"), 3)
    result["vllm_over_hf_generate"] = round(paired("vllm", "hf_generate"), 3)
    result["wal_cost_fraction"] = round(1 - paired("vllm_wal", "vllm"), 4)
    # The same cost read off directly, far less noisy than a difference of two throughputs: the share of
    # wall time spent outside engine steps in the WAL run (WAL appends and commits, batch and result
    # files) less that share in the bare loop, paired within each round.
    wal_share = [w - b for w, b in zip(outside["vllm_wal"], outside["vllm"], strict=True)]
    result["wal_time_fraction"] = round(statistics.median(wal_share), 4)
    result["runs_outside_engine_fraction"] = {name: [round(x, 4) for x in values] for name, values in outside.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
