"""GRPO step time and generation throughput: Retort's rollout service on vLLM vs TRL's own generation.

Same model (the tiny base after a short SFT on the demo math domain), same data,
same batch: TRL's GRPOTrainer once with `rollout_func` generating through the
WAL-backed rollout service on vLLM, once with TRL's built-in transformers generation
(use_vllm=False). Prints one JSON object.

    python benchmarks/bench_grpo.py [--steps 10] [--batch 32] [--generations 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.registry import build_reward_funcs
    from rollout.engine import VLLMEngine
    from rollout.service import RolloutService
    from specialists.base_model import init_base_model
    from specialists.config import SpecialistJob
    from specialists.domains import write_demo_data
    from specialists.grpo import grpo_dataset, make_rollout_func
    from specialists.sft import run_sft
    from storage.specfile import resolve_precision

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    base = init_base_model(work / "base")
    data = write_demo_data(work / "data", n_train=1000, n_eval=10)["math"]
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "bench", "domain": "math", "base_model": str(base),
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": 30, "learning_rate": 3e-3, "batch_size": 32, "max_length": 64},
        "grpo": {"max_steps": args.steps, "batch_size": args.batch, "num_generations": args.generations,
                 "max_completion_length": args.max_tokens, "learning_rate": 1e-4},
        "rewards": [{"name": "math"}],
    })
    model = str(run_sft(spec, str(base), work / "sft"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    funcs, weights = build_reward_funcs(spec.rewards)
    dataset = grpo_dataset(spec.datasets.train, "prompt")
    timing = {"service": [0.0, 0], "trl": [0.0, 0]}

    class TimedTRL(GRPOTrainer):
        """TRL's own generation path, timed (tokens counted from what it returns)."""

        def _generate_single_turn(self, *a, **kw):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            timing["trl"][0] += time.perf_counter() - start
            timing["trl"][1] += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

    def config(name: str) -> GRPOConfig:
        g = spec.grpo
        return GRPOConfig(output_dir=str(work / name), max_steps=g.max_steps, learning_rate=g.learning_rate,
                          per_device_train_batch_size=g.batch_size, num_generations=g.num_generations,
                          max_completion_length=g.max_completion_length, temperature=1.0, reward_weights=weights,
                          save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
                          disable_tqdm=True, logging_steps=1, seed=0,
                          bf16=resolve_precision(spec.precision) == "bf16", fp16=False)  # not TRL's default

    engine = VLLMEngine(model, seed=0)
    service = RolloutService(engine, work / "rollouts")
    rollout = make_rollout_func(service, tokenizer, spec)

    def timed_rollout(prompts, trainer):
        start = time.perf_counter()
        out = rollout(prompts, trainer)
        timing["service"][0] += time.perf_counter() - start
        timing["service"][1] += sum(len(c) for c in out["completion_ids"])
        return out

    results = {}
    for name, trainer in (
        ("service_vllm", GRPOTrainer(model=model, reward_funcs=funcs, args=config("service"), train_dataset=dataset,
                                     processing_class=tokenizer, rollout_func=timed_rollout)),
        ("trl_generate", TimedTRL(model=model, reward_funcs=funcs, args=config("trl"), train_dataset=dataset,
                                  processing_class=tokenizer)),
    ):
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        results[name] = {"step_s": round((time.perf_counter() - start) / args.steps, 4)}
    for name, key in (("service_vllm", "service"), ("trl_generate", "trl")):
        seconds, tokens = timing[key]
        results[name]["generation_tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
        results[name]["generated_tokens"] = tokens
    print(json.dumps({
        "steps": args.steps, "batch": args.batch, "generations": args.generations, "max_tokens": args.max_tokens,
        **results,
        "step_speedup": round(results["trl_generate"]["step_s"] / results["service_vllm"]["step_s"], 3),
        "generation_speedup": round(results["service_vllm"]["generation_tokens_per_s"]
                                    / results["trl_generate"]["generation_tokens_per_s"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
