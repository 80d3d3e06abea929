"""A specialist job: held-out score of the base, SFT, score, GRPO, score; checkpoints and metrics stored.

    retort submit configs/demo/specialists/math.yaml     # queue it
    retort run-job ID                                    # run it in the foreground (until the controller exists)

One vLLM engine serves the whole job: it scores the base, takes the SFT weights to
score them, then generates GRPO's rollouts (weights pushed every step) and scores the
result. Each phase writes ``<run_dir>/<phase>/final``; a job started again skips
finished phases and resumes an interrupted one from its last trainer checkpoint.

On several trainer ranks (`resources.workers`) every rank calls `run_specialist`: all of them train (FSDP2),
rank 0 alone owns the engine, evaluates, and writes the job store and `final.json`; the others wait for it
between phases, and take its word for which phases are done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grm.judging import measure
from rewards.evaluation import EvalResult, evaluate
from rewards.registry import build_reward
from rewards.tools import ToolBox
from rollout.agent import check_turn_budget
from rollout.engine import Engine
from rollout.worker import start_engine, stop_engine
from specialists.config import SpecialistJob
from specialists.fit import world_size
from specialists.grpo import run_grpo
from specialists.sft import run_sft
from storage import jobs
from storage.db import BackgroundWrites, Store
from storage.specfile import precision_dtype
from storage.tables import load_table
from storage.trackers import Trackers


@dataclass
class PhaseResult:
    phase: str
    checkpoint: str
    eval: EvalResult


def _load(engine: Engine, checkpoint: str) -> None:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        state.update(load_file(path))
    engine.load_weights(state.items())


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def agree(value: Any) -> Any:
    """Rank 0's `value`, on every rank (what it decided is what all do); also where the others wait for it."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_specialist(spec: SpecialistJob, run_dir: Path, *, store: Store | None = None, job_id: int | None = None,
                   engine: Engine | None = None,
                   on_phase: Callable[[PhaseResult], None] | None = None) -> dict[str, PhaseResult]:
    """Run (or resume) every enabled phase; returns the held-out results per phase (base, sft, grpo)."""
    from transformers import AutoTokenizer

    lead = rank() == 0
    if not lead:
        return _follow(spec, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.datasets.write_generated()
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    rows = list(load_table(spec.datasets.eval, [spec.datasets.prompt_field]))[:spec.eval.max_prompts]
    if spec.tools and spec.datasets.train:  # before the engine starts: the demonstrations' turns fit eval's budget
        demonstrations = load_table(spec.datasets.train, [spec.datasets.completion_field])
        check_turn_budget(tokenizer, demonstrations[spec.datasets.completion_field], spec.eval.max_new_tokens,
                          source=spec.datasets.train, setting="eval.max_new_tokens")
    own_engine = engine is None  # ours to stop at the end (rollout workers outlive nothing of ours)
    engine = engine or start_engine(spec.rollout, spec.base_model, seed=spec.seed,
                                    dtype=precision_dtype(spec.precision), run_dir=run_dir)
    # held-out answers are scored by eval.rewards when given, else by the training rewards; a GRM reward with
    # `judge: self` judges with this engine
    reward = build_reward(spec.eval.rewards or spec.rewards, engine=engine)
    tools = ToolBox(spec.tools, spec.agent.max_concurrency) if spec.tools else None  # an agent answers in turns
    judging = spec.judging
    judging_rubric = spec.judging_rubric()
    judging_rows = list(load_table(judging.eval, [judging.prompt_field, judging.response_field])) if judging else []

    trackers = Trackers(spec.report_to, run_dir, spec.name, spec.model_dump(mode="json"))
    writes = BackgroundWrites()

    def record(phase: str, step: int, values: dict[str, float]) -> None:
        if values:
            trackers.log(phase, step, values)
        if store is not None and job_id is not None and values:  # off the training step's critical path
            writes.submit(jobs.record_metrics, store, job_id, phase, step, dict(values))
            writes.submit(jobs.set_progress, store, job_id, f"{phase} step {step}")

    def finish(phase: str, checkpoint: str) -> PhaseResult:
        _load(engine, checkpoint)
        result = evaluate(engine, tokenizer, rows, reward, max_new_tokens=spec.eval.max_new_tokens,
                          success_threshold=spec.eval.success_threshold, environment=tools,
                          max_turns=spec.agent.max_turns, log=run_dir / f"eval-calls-{phase}.jsonl")
        record(phase, 0, {"eval/score": result.score, "eval/accuracy": result.accuracy,
                          **{f"eval/{k}": v for k, v in result.tools.items()}})
        if judging is not None:  # the policy as a judge, at this phase's weights
            judge_quality[phase] = measure(engine, judging_rubric, judging_rows, prompt_field=judging.prompt_field,
                                           response_field=judging.response_field, max_tokens=judging.max_tokens)
            record(phase, 0, judge_quality[phase])
        writes.flush()  # the phase's metrics are stored before its checkpoint and results
        if store is not None and job_id is not None and phase != "base":
            jobs.record_checkpoint(store, job_id, phase, 0, checkpoint)
        phase_result = PhaseResult(phase, checkpoint, result)
        if on_phase is not None:
            on_phase(phase_result)
        return phase_result

    judge_quality: dict[str, dict[str, float]] = {}
    try:
        results = {"base": finish("base", spec.base_model)}
        current = spec.base_model
        if spec.sft.enabled:
            final = run_dir / "sft" / "final"
            if not agree(final.exists()):
                run_sft(spec, current, run_dir / "sft", on_log=lambda step, logs: record("sft", step, logs))
            results["sft"] = finish("sft", str(final))
            current = str(final)
        if spec.grpo.enabled:
            final = run_dir / "grpo" / "final"
            if not agree(final.exists()):
                _load(engine, current)
                run_grpo(spec, current, run_dir / "grpo", engine, on_log=lambda step, logs: record("grpo", step, logs))
            results["grpo"] = finish("grpo", str(final))
            current = str(final)
        (run_dir / "final.json").write_text(json.dumps({
            "checkpoint": current, "scores": {p: r.eval.score for p, r in results.items()},
            "accuracy": {p: r.eval.accuracy for p, r in results.items()},
            **({"judge": judge_quality} if judge_quality else {})}, indent=2))
    finally:
        trackers.close()
        writes.flush(raise_errors=False)
        if own_engine:
            stop_engine(engine)
    return results


def _follow(spec: SpecialistJob, run_dir: Path) -> dict[str, PhaseResult]:
    """A rank > 0: train each phase rank 0 says is unfinished, beside it; no engine, no evaluation, no store."""
    current = spec.base_model
    for phase, enabled, train in (("sft", spec.sft.enabled, lambda model: run_sft(spec, model, run_dir / "sft")),
                                  ("grpo", spec.grpo.enabled,
                                   lambda model: run_grpo(spec, model, run_dir / "grpo", None))):
        if not enabled:
            continue
        if not agree(None):
            train(current)
        current = str(run_dir / phase / "final")
    return {}
