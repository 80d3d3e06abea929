"""GRPO of one specialist with TRL's GRPOTrainer, generating through Retort's rollout service.

TRL's `rollout_func` hook hands us each generation batch (prompts already repeated
`num_generations` times). Before generating we push the current policy's weights into
the vLLM engine (once per optimizer step), then the rollout service generates with
per-request seeds and logs every token to its WAL; TRL gets prompt ids, completion
ids and the engine's logprobs back, and scores completions with the job's rewards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewards.registry import build_reward_funcs
from rollout.engine import Engine, HFEngine, encode_prompt
from rollout.service import RolloutRequest, RolloutService
from rollout.worker import WorkersService, open_service
from specialists.config import SpecialistJob
from specialists.fit import fit, trainer_arguments
from storage.tables import load_table


def prompt_text(prompt: Any) -> str:
    """The user's words of a TRL prompt (a string or a list of chat messages)."""
    if isinstance(prompt, list):
        return str(prompt[-1]["content"])
    return str(prompt)


def make_rollout_func(service: RolloutService | WorkersService, tokenizer: Any, spec: SpecialistJob) -> Callable:
    """A TRL rollout_func that syncs weights into the engine and generates through the WAL-backed service.

    Each generation batch is named by the trainer's global step and the generation call within it, and its
    seeds come from the same pair: a job restarted from a checkpoint asks for the same batches again, and
    gets a finished one from its stored results and an interrupted one continued from its committed tokens
    (regenerating it would favour the short answers that survive interruptions)."""
    settings = spec.grpo
    pushed = {"step": None, "call": 0}
    # each prompt rendered once: every step draws from the same set
    encode = functools.cache(lambda text: encode_prompt(tokenizer, text))

    def rollout_func(prompts: list, trainer: Any) -> dict[str, list]:
        step = trainer.state.global_step
        if pushed["step"] != step:  # new policy weights since the last generation
            model = trainer.accelerator.unwrap_model(trainer.model)
            service.load_weights(((k, v.detach()) for k, v in model.state_dict().items()), version=step)
            pushed.update(step=step, call=0)
        call = pushed["call"]
        pushed["call"] += 1
        seed = spec.seed * 1_000_003 + step * 10_007 + call * 1_009  # + request index below
        requests = [RolloutRequest(id=str(i), prompt_ids=encode(prompt_text(p)),
                                   max_tokens=settings.max_completion_length, temperature=settings.temperature,
                                   top_p=settings.top_p, seed=seed + i)
                    for i, p in enumerate(prompts)]
        rollouts = service.run_or_resume(f"step-{step:06d}-gen-{call:02d}", requests)
        return {"prompt_ids": [r.prompt_ids for r in rollouts], "completion_ids": [r.completion_ids for r in rollouts],
                "logprobs": [r.logprobs for r in rollouts]}

    rollout_func.service = service  # its timings are where a step's generation time went
    return rollout_func


def grpo_dataset(path: str, prompt_field: str):
    """Conversational prompts plus every other column (the rewards read them: answer, tests, …)."""
    data = load_table(path, [prompt_field])
    drop = [c for c in ("completion",) if c in data.column_names]
    return data.map(lambda row: {"prompt": [{"role": "user", "content": row[prompt_field]}]}, remove_columns=drop)


def build_grpo_trainer(spec: SpecialistJob, model: str, out_dir: Path, engine: Engine | None, *,
                       own_generation: bool = False):
    """TRL's GRPOTrainer with the job's rewards, generating through a rollout service on `engine` (on the policy
    itself with `grpo.engine: hf`); and its tokenizer.

    `own_generation` leaves generation to TRL itself (no engine, no service): the same trainer, config, data
    and rewards, which is what `benchmarks/bench_vs_trl.py` compares against."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    settings = spec.grpo
    tokenizer = AutoTokenizer.from_pretrained(model)
    funcs, weights = build_reward_funcs(spec.rewards, engine=engine)
    config = GRPOConfig(
        **trainer_arguments(settings, out_dir, spec.seed, spec.precision), max_steps=settings.max_steps,
        num_generations=settings.num_generations, max_completion_length=settings.max_completion_length,
        temperature=settings.temperature, top_p=settings.top_p, beta=settings.beta, epsilon=settings.epsilon,
        loss_type=settings.loss_type, scale_rewards=settings.scale_rewards, reward_weights=weights, logging_steps=1,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=config,
                          train_dataset=grpo_dataset(spec.datasets.rl or spec.datasets.train,
                                                     spec.datasets.prompt_field),
                          processing_class=tokenizer)
    if own_generation:
        return trainer, tokenizer
    if settings.engine == "hf":  # the policy itself generates: no weights to push
        engine = HFEngine.sharing(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    elif engine is None:
        raise ValueError("build_grpo_trainer needs an engine unless own_generation or grpo.engine is hf")
    service = open_service(engine, out_dir / "rollouts")  # in this process, or on the rollout workers
    trainer.rollout_func = make_rollout_func(service, tokenizer, spec)  # what TRL's rollout_func argument sets
    return trainer, tokenizer


def run_grpo(spec: SpecialistJob, model: str, out_dir: Path, engine: Engine,
             on_log: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """GRPO from `model` with the job's rewards; returns the final checkpoint directory."""
    trainer, tokenizer = build_grpo_trainer(spec, model, out_dir, engine)
    return fit(trainer, tokenizer, out_dir, on_log)
