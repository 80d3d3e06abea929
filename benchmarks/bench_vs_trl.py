"""Retort against TRL on identical work, side by side: seconds per training step, where Retort's go, and scores.

    python benchmarks/bench_vs_trl.py [--rounds 3] [--caps 4,48] [--distill-steps 60] [--grpo-steps 12]

Four pairings, each at every completion cap, in alternating order within a round (Retort first in odd rounds,
TRL first in even ones), every run in a fresh process:

- distillation: `retort distill FILE` (the CLI, its job store and WAL included) against TRL's
  `DistillationTrainer` — one teacher (the tiny base after a short math SFT), the tiny base as student, forward
  KL, batch 64, learning rate 3e-3 cosine, temperature 1, fp32, on-policy only;
- GRPO: Retort's specialist GRPO (TRL's `GRPOTrainer` generating through Retort's WAL-backed rollout service on
  vLLM, `specialists.grpo.build_grpo_trainer`) against `GRPOTrainer` with its own generation — the math SFT
  model as policy, the math verifier as reward, 8 prompts × 8 generations per step.

A step's time is the median gap between consecutive optimizer steps, the first two and the last left out
(warm-up, and the final evaluation and save). Retort's breakdown comes from its own step metrics
(`time/*`: generation in the engine, WAL and batch files, weight push, teacher pass, loss, optimizer; the rest is
bookkeeping). Every final model is then scored by one evaluator (greedy, the math verifier, held-out prompts), so
speed is never bought with learning. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = Path(__file__).resolve().parents[1]
DISTILL_BATCH, LEARNING_RATE, GRPO_PROMPTS, GENERATIONS = 64, 3e-3, 8, 8
BREAKDOWN = ("generate", "wal", "push", "teacher", "loss", "optimizer")


def step_seconds(stamps: list[float]) -> float:
    """Median gap between consecutive step ends, leaving out the first two steps and the last."""
    gaps = [b - a for a, b in itertools.pairwise(stamps[1:-1])]
    return statistics.median(gaps) if gaps else float("nan")


# --- the shared inputs ---------------------------------------------------------------------------------------


def prepare(work: Path) -> dict[str, str]:
    """The tiny base, the demo's math data, and a math SFT of the base (distillation teacher and GRPO policy)."""
    from specialists.base_model import init_base_model
    from specialists.config import SpecialistJob
    from specialists.domains import write_demo_data
    from specialists.sft import run_sft

    base = init_base_model(work / "base")
    data = write_demo_data(work / "data", n_train=2000, n_eval=40)["math"]
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "bench-sft", "domain": "math", "base_model": str(base), "precision": "fp32",
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": 600, "learning_rate": 3e-3, "batch_size": 64, "max_length": 64, "warmup_ratio": 0.05,
                "gradient_checkpointing": False},
        "grpo": {"enabled": False}, "rewards": [{"name": "math"}],
    })
    sft = run_sft(spec, str(base), work / "sft")
    return {"base": str(base), "sft": str(sft), "train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}


def grpo_spec(paths: dict[str, str], cap: int, steps: int, engine: str = "vllm"):
    from specialists.config import SpecialistJob

    return SpecialistJob.model_validate({
        "kind": "specialist", "name": "bench-grpo", "domain": "math", "base_model": paths["sft"], "precision": "fp32",
        "datasets": {"train": paths["train"], "eval": paths["eval"]}, "sft": {"enabled": False},
        "grpo": {"max_steps": steps, "batch_size": GRPO_PROMPTS * GENERATIONS, "num_generations": GENERATIONS,
                 "max_completion_length": cap, "learning_rate": 1e-4, "temperature": 1.0,
                 "gradient_checkpointing": False, "engine": engine},
        "rewards": [{"name": "math"}],
    })


# --- one run each, in its own process ------------------------------------------------------------------------


def retort_distill(paths: dict[str, str], cap: int, steps: int, out: Path, engine: str = "vllm") -> dict:
    """`retort distill FILE` as a user runs it; step times and breakdown from its metrics.jsonl."""
    import yaml

    name = f"bench-cap{cap}"
    spec = {
        "kind": "distillation", "name": name, "seed": 0, "precision": "fp32",
        "student": {"init": paths["base"]},
        "teachers": [{"index": 0, "name": "math", "checkpoint": paths["sft"]}],
        "mixture": [{"domain": "math", "prompts": paths["train"], "eval_prompts": paths["eval"], "teacher": 0,
                     "rewards": [{"name": "math"}], "eval": {"max_new_tokens": 8}}],
        "divergence": "forward_kl", "steps": steps, "batch_size": DISTILL_BATCH, "learning_rate": LEARNING_RATE,
        "lr_schedule": "cosine", "generation": {"max_new_tokens": cap, "temperature": 1.0, "engine": engine},
        "eval_every": steps, "save_every": steps, "max_resident_trunks": 1,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RETORT_HOME": str(out / "home")}
    subprocess.run([sys.executable, "-m", "controller.cli", "distill", str(out / "distill.yaml")], env=env,
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    run_dir = next((out / "home" / "runs").glob(f"*/{name}*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1]
    middle = rows[2:-1]
    return {"step_s": step_seconds([r["time"] for r in rows]),
            "tokens_per_step": statistics.mean(r["metrics"]["tokens"] for r in rows),
            "breakdown_s": {k: statistics.median(r["metrics"][f"time/{k}"] for r in middle) for k in BREAKDOWN},
            "model": str(sorted((run_dir / "checkpoints").glob("step-*"))[-1])}


def trl_distill(paths: dict[str, str], cap: int, steps: int, out: Path) -> dict:
    """TRL's DistillationTrainer with its own (transformers) generation on the same work."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    stamps, tokens, seconds = [], [], []

    class Stamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(paths["base"], padding_side="left")
    data = load_dataset("json", data_files=paths["train"], split="train")
    data = data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]},
                    remove_columns=[c for c in data.column_names if c != "prompt"])
    config = DistillationConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=DISTILL_BATCH, learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine", beta=0.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=cap,
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
    trainer = DistillationTrainer(model=paths["base"], teacher_model=paths["sft"], args=config, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[Stamps()])
    trainer.remove_callback(PrinterCallback)
    original = trainer._generate

    def counted(prompts):
        started = time.perf_counter()
        result = original(prompts)
        seconds.append(time.perf_counter() - started)
        tokens.append(sum(len(c) for c in result[1]))
        return result

    trainer._generate = counted
    trainer.train()
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    return {"step_s": step_seconds(stamps), "tokens_per_step": statistics.mean(tokens), "model": str(out / "final"),
            "breakdown_s": {"generate": statistics.median(seconds[2:-1])}}


def _grpo(paths: dict[str, str], cap: int, steps: int, out: Path, retort: bool, engine: str = "vllm") -> dict:
    from transformers import PrinterCallback, TrainerCallback

    from rollout.engine import VLLMEngine
    from specialists.grpo import build_grpo_trainer

    stamps, tokens, timings, seconds = [], [], [], []
    spec = grpo_spec(paths, cap, steps, engine)
    vllm = VLLMEngine(paths["sft"], seed=0) if retort and engine == "vllm" else None
    trainer, tokenizer = build_grpo_trainer(spec, paths["sft"], out, vllm, own_generation=not retort)
    service = trainer.rollout_func.service if retort else None

    class Stamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            if service is not None:
                timings.append(service.timings_snapshot())

    trainer.add_callback(Stamps())
    trainer.remove_callback(PrinterCallback)
    generate = trainer._generate_single_turn

    def counted(*a, **kw):
        started = time.perf_counter()
        result = generate(*a, **kw)
        seconds.append(time.perf_counter() - started)
        tokens.append(sum(len(c) for c in result[0]))
        return result

    trainer._generate_single_turn = counted
    if retort:  # the rollout_func path: count what the service returned
        rollout = trainer.rollout_func

        def counted_rollout(prompts, trainer_):
            result = rollout(prompts, trainer_)
            tokens.append(sum(len(c) for c in result["completion_ids"]))
            return result

        trainer.rollout_func = counted_rollout
    trainer.train()
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    result = {"step_s": step_seconds(stamps), "tokens_per_step": statistics.mean(tokens), "model": str(out / "final")}
    if seconds:  # TRL's own generation
        result["breakdown_s"] = {"generate": statistics.median(seconds[2:-1])}
    if timings:
        deltas = [b.since(a) for a, b in itertools.pairwise(timings[1:-1])]
        result["breakdown_s"] = {"generate": statistics.median(d.engine for d in deltas),
                                 "wal": statistics.median(d.wal + d.files for d in deltas),
                                 "push": statistics.median(d.push for d in deltas)}
    return result


def retort_grpo(paths, cap, steps, out):
    return _grpo(paths, cap, steps, out, retort=True)


def trl_grpo(paths, cap, steps, out):
    return _grpo(paths, cap, steps, out, retort=False)


def retort_hf_distill(paths, cap, steps, out):
    return retort_distill(paths, cap, steps, out, engine="hf")


def retort_hf_grpo(paths, cap, steps, out):
    return _grpo(paths, cap, steps, out, retort=True, engine="hf")


RUNS = {"retort_distill": retort_distill, "retort_hf_distill": retort_hf_distill, "trl_distill": trl_distill,
        "retort_grpo": retort_grpo, "retort_hf_grpo": retort_hf_grpo, "trl_grpo": trl_grpo}
CONTENDERS = ("retort", "retort_hf", "trl")


def score(model: str, eval_path: str) -> float:
    """One evaluator for every model: greedy answers to the held-out math prompts, the math verifier."""
    from transformers import AutoTokenizer

    from rewards.evaluation import evaluate
    from rewards.registry import build_reward
    from rewards.spec import RewardRef
    from rollout.engine import HFEngine
    from storage.tables import load_table

    rows = list(load_table(eval_path, ["prompt"]))
    return evaluate(HFEngine(model), AutoTokenizer.from_pretrained(model), rows,
                    build_reward([RewardRef(name="math")]), max_new_tokens=8).score


# --- the driver ----------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    paths = json.loads(Path(args.paths).read_text())
    result = RUNS[args.child](paths, args.cap, args.steps, Path(args.out))
    print("RESULT " + json.dumps(result))


def run_child(work: Path, name: str, cap: int, steps: int, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--paths", str(work / "paths.json"), "--cap", str(cap),
               "--steps", str(steps), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"{name} (cap {cap}) failed with exit code {done.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--caps", default="4,48", help="completion caps, comma-separated")
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--grpo-steps", type=int, default=12)
    parser.add_argument("--only", choices=["distill", "grpo"], help="one of the two pairings")
    parser.add_argument("--child", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from rich.console import Console
    from rich.progress import Progress

    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    paths = prepare(work)
    (work / "paths.json").write_text(json.dumps(paths))
    caps = [int(c) for c in args.caps.split(",")]
    kinds = [k for k in ("distill", "grpo") if args.only in (None, k)]
    steps = {"distill": args.distill_steps, "grpo": args.grpo_steps}
    runs: dict[str, list[dict]] = {}
    with Progress(console=Console(stderr=True)) as progress:  # stdout is the JSON
        task = progress.add_task("runs", total=args.rounds * len(caps) * len(kinds) * len(CONTENDERS))
        for round_ in range(args.rounds):
            order = CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]
            for kind in kinds:
                for cap in caps:
                    for who in order:
                        key = f"{kind}_cap{cap}"
                        progress.update(task, description=f"round {round_ + 1}: {who} {kind}, cap {cap}")
                        result = run_child(work, f"{who}_{kind}", cap, steps[kind], work / f"r{round_}-{who}-{key}")
                        result["score"] = score(result.pop("model"), paths["eval"])
                        runs.setdefault(f"{key}_{who}", []).append(result)
                        progress.advance(task)
    report: dict = {"rounds": args.rounds, "distill_steps": args.distill_steps, "grpo_steps": args.grpo_steps,
                    "distill_batch": DISTILL_BATCH, "grpo_batch": f"{GRPO_PROMPTS}x{GENERATIONS}", "results": {}}
    for kind in kinds:
        for cap in caps:
            key = f"{kind}_cap{cap}"
            trl = runs[f"{key}_trl"]
            entry = {"trl_step_s": round(statistics.median(r["step_s"] for r in trl), 4),
                     "trl_step_s_by_round": [round(r["step_s"], 4) for r in trl],
                     "trl_tokens_per_step": round(statistics.mean(r["tokens_per_step"] for r in trl), 1),
                     "trl_score": [round(r["score"], 3) for r in trl]}
            for who in CONTENDERS:
                results = runs[f"{key}_{who}"]
                step = statistics.median(r["step_s"] for r in results)
                parts = {k: round(statistics.median(r["breakdown_s"][k] for r in results), 4)
                         for k in results[0]["breakdown_s"]}
                parts["other"] = round(step - sum(parts.values()), 4)
                entry[f"{who}_breakdown_s"] = parts
                if who == "trl":
                    continue
                entry.update({
                    f"{who}_step_s": round(step, 4),
                    f"{who}_step_s_by_round": [round(r["step_s"], 4) for r in results],
                    # each round's ratio (the runs of a round ran back to back), then their median
                    f"{who}_over_trl": round(statistics.median(
                        a["step_s"] / b["step_s"] for a, b in zip(results, trl, strict=True)), 3),
                    f"{who}_tokens_per_step": round(statistics.mean(r["tokens_per_step"] for r in results), 1),
                    f"{who}_score": [round(r["score"], 3) for r in results]})
            report["results"][key] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
