"""GRPO of one specialist with TRL's GRPOTrainer, generating through Retort's rollout service.

TRL's `rollout_func` hook hands us each generation batch (prompts already repeated
`num_generations` times). Before generating we push the current policy's weights into
the vLLM engine (once per optimizer step), then the rollout service generates with
per-request seeds and logs every token to its WAL; TRL gets prompt ids, completion
ids and the engine's logprobs back, and scores completions with the job's rewards.

An agent specialist (a job with `tools`) generates multi-turn trajectories instead (rollout.agent.run_agent over
the same service: each turn a WAL batch, each call in the trajectory log `rollouts/calls.jsonl`). TRL gets the
whole trajectory as the completion with `env_mask` (its per-token mask: 0 for the tools' tokens, which the
loss never covers), and the rewards score the final answer (`final_answer`), not the text of the calls.

On several ranks each rank's TRL holds its own slice of the generation batch: rank 0 gathers every rank's
prompts (in rank order: the global batch one rank would hold), generates them through the one service and
its WAL, and hands each rank its slice back; the policy's FSDP2 shards are gathered into full weights for
each push. Seeds follow the prompt's place in the global batch, so N ranks sample what one rank would.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewards.registry import build_reward_funcs
from rollout.engine import Engine, HFEngine, encode_prompt
from rollout.service import RolloutRequest, RolloutService
from rollout.worker import WorkersService, open_service
from specialists.config import SpecialistJob
from specialists.fit import CpuFsdp, fit, trainer_arguments, world_size
from storage.tables import load_table


def prompt_text(prompt: Any) -> str:
    """The user's words of a TRL prompt (a string or a list of chat messages)."""
    if isinstance(prompt, list):
        return str(prompt[-1]["content"])
    return str(prompt)


def make_rollout_func(service: RolloutService | WorkersService | None, tokenizer: Any,
                      spec: SpecialistJob) -> Callable:
    """A TRL rollout_func that syncs weights into the engine and generates through the WAL-backed service
    (`service` is None on ranks > 0: rank 0 generates for them).

    Each generation batch is named by the trainer's global step and the generation call within it, and its
    seeds come from the same pair: a job restarted from a checkpoint asks for the same batches again, and
    gets a finished one from its stored results and an interrupted one continued from its committed tokens
    (regenerating it would favour the short answers that survive interruptions)."""
    settings = spec.grpo
    pushed = {"step": None, "call": 0}
    # each prompt rendered once: every step draws from the same set
    encode = functools.cache(lambda text: encode_prompt(tokenizer, text))
    agent: dict[str, Any] = {}  # the tools and the trajectory log, opened on first use (on rank 0)

    def generate(step: int, call: int, prompts: list) -> list[dict[str, list]]:
        seed = spec.seed * 1_000_003 + step * 10_007 + call * 1_009  # + request index below
        batch = f"step-{step:06d}-gen-{call:02d}"
        if spec.tools:
            return generate_trajectories(batch, seed, prompts)
        requests = [RolloutRequest(id=str(i), prompt_ids=encode(prompt_text(p)),
                                   max_tokens=settings.max_completion_length, temperature=settings.temperature,
                                   top_p=settings.top_p, seed=seed + i)
                    for i, p in enumerate(prompts)]
        rollouts = service.run_or_resume(batch, requests)
        return [{"prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids, "logprobs": r.logprobs}
                for r in rollouts]

    def generate_trajectories(batch: str, seed: int, prompts: list) -> list[dict[str, list]]:
        from rewards.tools import ToolBox
        from rollout.agent import AgentRequest, TrajectoryLog, run_agent

        if not agent:
            agent.update(tools=ToolBox(spec.tools, spec.agent.max_concurrency),
                         log=TrajectoryLog(service.run_dir / "calls.jsonl"))
        requests = [AgentRequest(str(i), prompt_text(p), seed=seed + i) for i, p in enumerate(prompts)]
        done = run_agent(service, tokenizer, requests, agent["tools"], agent["log"], max_turns=spec.agent.max_turns,
                         max_tokens=settings.max_completion_length, turn_tokens=settings.max_completion_length,
                         temperature=settings.temperature, top_p=settings.top_p, batch=batch)
        return [{"prompt_ids": list(t.prompt_ids), "completion_ids": t.token_ids, "logprobs": t.logprobs,
                 "env_mask": [int(m) for m in t.model_mask], "final_answer": t.answer} for t in done]

    def rollout_func(prompts: list, trainer: Any) -> dict[str, list]:
        step = trainer.state.global_step
        if pushed["step"] != step:  # new policy weights since the last generation
            push_weights(trainer, service, step)
            pushed.update(step=step, call=0)
        call = pushed["call"]
        pushed["call"] += 1
        if world_size() == 1:
            rollouts = generate(step, call, prompts)
        else:
            rollouts = generate_for_ranks(prompts, lambda every: generate(step, call, every))
        return {key: [r[key] for r in rollouts] for key in rollouts[0]}

    rollout_func.service = service  # its timings are where a step's generation time went
    return rollout_func


def push_weights(trainer: Any, service: RolloutService | WorkersService | None, step: int) -> None:
    """The policy's current weights into the engine, as policy version `step`. On several ranks every rank
    takes part in gathering the FSDP2 shards (a collective); rank 0, which holds the full tensors, pushes."""
    if not trainer.is_fsdp_enabled:
        model = trainer.accelerator.unwrap_model(trainer.model)
        service.load_weights(((k, v.detach()) for k, v in model.state_dict().items()), version=step)
        return
    state = trainer.accelerator.get_state_dict(trainer.model)  # full on rank 0, empty elsewhere
    if service is not None:
        service.load_weights(state.items(), version=step)


def generate_for_ranks(prompts: list, generate: Callable[[list], list]) -> list:
    """Every rank's `prompts` gathered on rank 0 in rank order, `generate`d there in one batch, and each
    rank's slice of the results sent back to it (a collective: every rank calls it with its own prompts)."""
    import torch.distributed as dist

    ranks = dist.get_world_size()
    gathered: list[list] | None = [None] * ranks if dist.get_rank() == 0 else None  # type: ignore[list-item]
    dist.gather_object(prompts, gathered, dst=0)
    slices = None
    if gathered is not None:
        results = generate([p for share in gathered for p in share])
        bounds = [0]
        for share in gathered:
            bounds.append(bounds[-1] + len(share))
        slices = [results[a:b] for a, b in itertools.pairwise(bounds)]
    mine: list = [None]
    dist.scatter_object_list(mine, slices, src=0)
    return mine[0]


def on_final_answer(func: Callable[..., list]) -> Callable[..., list]:
    """A reward of an agent's trajectories: `func` scores each one's last model turn (the `final_answer` the
    rollout_func returns beside it), not the decoded trajectory with its calls and the tools' results."""

    @functools.wraps(func)
    def reward(prompts: list, completions: list, final_answer: list[str], **columns: Any) -> list:
        return func(prompts, final_answer, **columns)

    return reward


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
    if spec.tools:  # a trajectory is scored by its final answer
        funcs = [on_final_answer(func) for func in funcs]
    config = GRPOConfig(
        **trainer_arguments(settings, out_dir, spec.seed, spec.precision), max_steps=settings.max_steps,
        num_generations=settings.num_generations, max_completion_length=settings.max_completion_length,
        temperature=settings.temperature, top_p=settings.top_p, beta=settings.beta, epsilon=settings.epsilon,
        loss_type=settings.loss_type, scale_rewards=settings.scale_rewards, reward_weights=weights, logging_steps=1,
    )
    trainer_class = type("GRPOTrainer", (CpuFsdp, GRPOTrainer), {})
    trainer = trainer_class(model=model, reward_funcs=funcs, args=config,
                          train_dataset=grpo_dataset(spec.datasets.rl or spec.datasets.train,
                                                     spec.datasets.prompt_field),
                          processing_class=tokenizer)
    if own_generation:
        return trainer, tokenizer
    if settings.engine == "hf":  # the policy itself generates: no weights to push
        engine = HFEngine.sharing(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    elif engine is None and trainer.accelerator.is_main_process:
        raise ValueError("build_grpo_trainer needs an engine unless own_generation or grpo.engine is hf")
    # in this process, or on the rollout workers; one service (and WAL writer) per job, on rank 0
    service = open_service(engine, out_dir / "rollouts") if trainer.accelerator.is_main_process else None
    trainer.rollout_func = make_rollout_func(service, tokenizer, spec)  # what TRL's rollout_func argument sets
    return trainer, tokenizer


def run_grpo(spec: SpecialistJob, model: str, out_dir: Path, engine: Engine | None,
             on_log: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """GRPO from `model` with the job's rewards; returns the final checkpoint directory. A GRM among the rewards
    adds its counters (parse failures, judge tokens and seconds per response: grm/*) to every step's log."""
    trainer, tokenizer = build_grpo_trainer(spec, model, out_dir, engine)
    rewards = [getattr(func, "__wrapped__", func) for func in trainer.reward_funcs]  # an agent's: on_final_answer
    judges = [func for func in rewards if callable(getattr(func, "metrics", None))]
    if judges and on_log is not None:
        log = on_log

        def on_log(step: int, logs: dict[str, float]) -> None:
            log(step, {**logs, **{k: v for judge in judges for k, v in judge.metrics().items()}})

    return fit(trainer, tokenizer, out_dir, on_log)
