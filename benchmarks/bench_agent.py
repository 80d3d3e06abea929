"""The agent on the demo's agent domain: the tiny base against the same model after SFT on tool-call
demonstrations and after GRPO over its own multi-turn trajectories (the math verifier on the final answer),
each answering the held-out problems as trajectories through the sandboxed `python` tool (greedy, the same
prompts and budget), and without the tool; then the agent loop's throughput: trajectories per second and the
share of their wall time spent in tools. With `--distill-steps N`, a student that starts from the base is then
distilled from the last phase's model over its own trajectories (forward KL over the whole vocabulary, the
demonstrations as the off-policy share, the tools' results context only) and scored like its teacher.

    python benchmarks/bench_agent.py [--sft-steps 2000] [--grpo-steps 10] [--distill-steps 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class TimedEnvironment:
    """The wall time the agent loop waits for its tools (a batch's calls run concurrently)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def run(self, calls, on_result=None):
        started = time.monotonic()
        try:
            return self.inner.run(calls, on_result)
        finally:
            self.seconds += time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=2000)
    parser.add_argument("--grpo-steps", type=int, default=10, help="0: no GRPO phase")
    parser.add_argument("--distill-steps", type=int, default=0, help="0: no distillation phase")
    parser.add_argument("--eval-prompts", type=int, default=40)
    parser.add_argument("--turn-tokens", type=int, default=80)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-agent-"))

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from opd.config import DistillationRun
    from opd.train import Distiller
    from rewards.evaluation import evaluate
    from rewards.registry import build_reward
    from rewards.spec import RewardRef
    from rewards.tools import ToolBox, ToolRef
    from rollout.agent import AgentRequest, TrajectoryLog, run_agent
    from rollout.engine import VLLMEngine
    from specialists.base_model import init_base_model
    from specialists.config import SpecialistJob
    from specialists.domains import write_demo_data
    from specialists.grpo import run_grpo
    from specialists.sft import run_sft

    base = init_base_model(out / "base", seed=0)
    data = write_demo_data(out / "data", n_train=3000, n_eval=args.eval_prompts, n_rl=600)["agent"]
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "agent", "domain": "agent", "base_model": str(base), "seed": 0,
        "datasets": {"train": str(data / "train.jsonl"), "rl": str(data / "rl.jsonl"),
                     "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": args.sft_steps, "batch_size": 32, "max_length": 160, "learning_rate": 3e-3,
                "warmup_ratio": 0.05, "save_steps": 100_000, "gradient_checkpointing": False},
        "grpo": {"enabled": args.grpo_steps > 0, "max_steps": max(args.grpo_steps, 1), "learning_rate": 1e-4,
                 "batch_size": 32, "num_generations": 8, "max_completion_length": 3 * args.turn_tokens,
                 "temperature": 1.0, "save_steps": 100_000, "gradient_checkpointing": False},
        "rewards": [{"name": "math"}], "tools": [{"name": "python"}],
        "agent": {"max_turns": 3, "max_concurrency": args.max_concurrency}})
    started = time.monotonic()
    final = run_sft(spec, str(base), out / "sft")
    sft_s = time.monotonic() - started

    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(final)
    reward = build_reward([RewardRef(name="math")])
    tools = ToolBox([ToolRef(name="python", args={"timeout_s": 2.0})], max_concurrency=args.max_concurrency)
    engine = VLLMEngine(str(base))
    phases, grpo_s = [("base", base), ("sft", final)], None
    if args.grpo_steps:
        started = time.monotonic()
        phases.append(("grpo", run_grpo(spec, str(final), out / "grpo", engine)))
        grpo_s = time.monotonic() - started
    scores = {}
    for phase, checkpoint in phases:  # every phase's weights into the engine (GRPO left its own policy's there)
        engine.load_weights(load_file(Path(checkpoint) / "model.safetensors").items())
        with_tools = evaluate(engine, tokenizer, rows, reward, max_new_tokens=args.turn_tokens, environment=tools,
                              max_turns=3, log=out / f"eval-calls-{phase}.jsonl")
        without = evaluate(engine, tokenizer, rows, reward, max_new_tokens=args.turn_tokens)
        scores[phase] = {"score_with_tools": round(with_tools.score, 4), "score_without_tools": round(without.score, 4),
                         **{k: round(v, 4) for k, v in with_tools.tools.items()}}

    distill = None
    if args.distill_steps:
        teacher = phases[-1][1]
        run = DistillationRun.model_validate({
            "kind": "distillation", "name": "agent-student", "seed": 0, "student": {"init": str(base)},
            "teachers": [{"index": 0, "name": "agent", "checkpoint": str(teacher)}],
            "mixture": [{"domain": "agent", "prompts": [str(data / "train.jsonl"), str(data / "rl.jsonl")],
                         "eval_prompts": str(data / "eval.jsonl"), "teacher": 0, "rewards": [{"name": "math"}],
                         "eval": {"max_prompts": len(rows), "max_new_tokens": args.turn_tokens},
                         "tools": [{"name": "python", "args": {"timeout_s": 2.0}}],
                         "agent": {"max_turns": 3, "max_concurrency": args.max_concurrency}}],
            "divergence": "forward_kl", "steps": args.distill_steps, "batch_size": 32, "learning_rate": 3e-3,
            "lr_schedule": "cosine", "warmup_steps": 20, "off_policy_fraction": 0.75,
            "off_policy_fraction_end": 0.25, "chunk_size": 512, "eval_every": args.distill_steps,
            "save_every": args.distill_steps})
        started = time.monotonic()
        table = Distiller(run, out / "distill", engine=engine).train().table["agent"]
        distill = {"steps": args.distill_steps, "distill_s": round(time.monotonic() - started, 1),
                   "teacher": phases[-1][0], "teacher_score": round(table["teacher"], 4),
                   "student_score": round(table["after"], 4),
                   "student_over_teacher": round(table["after"] / table["teacher"], 3) if table["teacher"] else None}

    # throughput: the last phase's trajectories on the held-out prompts, sampled, calls run (not replayed)
    log = TrajectoryLog(out / "throughput-calls.jsonl")
    timed = TimedEnvironment(tools)
    requests = [AgentRequest(f"t{i}", row["prompt"], seed=i) for i, row in enumerate(rows)]
    started = time.monotonic()
    done = run_agent(engine, tokenizer, requests, timed, log, max_turns=3, max_tokens=3 * args.turn_tokens,
                     turn_tokens=args.turn_tokens, temperature=1.0)
    wall = time.monotonic() - started
    log.close()
    tool_s = sum(result.duration_s for t in done for _, result in t.calls)
    print(json.dumps({
        "sft_steps": args.sft_steps, "sft_s": round(sft_s, 1), "grpo_steps": args.grpo_steps,
        "grpo_s": grpo_s and round(grpo_s, 1), "distillation": distill, "eval_prompts": len(rows), "scores": scores,
        "throughput": {"trajectories": len(done), "wall_s": round(wall, 2),
                       "trajectories_per_s": round(len(done) / wall, 2), "tool_calls": log.executed,
                       "tool_seconds_summed": round(tool_s, 2), "tool_wall_s": round(timed.seconds, 2),
                       "tool_share_of_wall": round(timed.seconds / wall, 3),
                       "max_concurrency": args.max_concurrency},
        "out": str(out)}, indent=2))


if __name__ == "__main__":
    main()
