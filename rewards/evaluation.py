"""Held-out evaluation: greedy answers from a rollout engine, scored by a reward.

Used after each specialist phase and during distillation, so both report the same
number: the mean reward (a missing verdict counts as 0) and the share of prompts
whose reward reaches `success_threshold`. With an `environment` (an agent's tools) each
prompt is a multi-turn trajectory (rollout.agent), scored on its final answer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.agent import AgentRequest, Environment, TrajectoryLog, run_agent
from rollout.engine import Engine, GenerationRequest, encode_prompt, generate_whole


@dataclass(frozen=True)
class EvalResult:
    score: float  # mean reward, None counted as 0
    accuracy: float  # share of prompts with reward >= success_threshold
    n: int
    completions: list[str]
    tools: dict[str, float] = field(default_factory=dict)  # an agent's: calls, malformed calls, turns per prompt


def evaluate(engine: Engine, tokenizer: Any, rows: Sequence[dict[str, Any]], reward: Callable[..., list],
             *, max_new_tokens: int, success_threshold: float = 1.0, chat_template: bool = True,
             environment: Environment | None = None, max_turns: int = 4, log: str | Path | None = None) -> EvalResult:
    """Greedy-decode every row's prompt and score the answers with `reward` (TRL's call shape). With an
    `environment`, each answer is an agent's last turn, after up to `max_turns` turns of `max_new_tokens`
    each (its calls logged to `log`, a file of its own when not given)."""
    if environment is not None:
        return _evaluate_agent(engine, tokenizer, rows, reward, environment, max_new_tokens=max_new_tokens,
                               success_threshold=success_threshold, max_turns=max_turns, log=log)
    requests = [GenerationRequest(f"eval-{i}", encode_prompt(tokenizer, row["prompt"], chat_template),
                                  max_new_tokens, temperature=0.0) for i, row in enumerate(rows)]
    whole = generate_whole(engine, requests)
    completions = [tokenizer.decode(whole[r.id].token_ids, skip_special_tokens=True) for r in requests]
    return _score(rows, completions, reward, success_threshold)


def _score(rows: Sequence[dict[str, Any]], completions: list[str], reward: Callable[..., list],
           success_threshold: float, tools: dict[str, float] | None = None) -> EvalResult:
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k not in ("prompt", "completion")}
    values = [v or 0.0 for v in reward([row["prompt"] for row in rows], completions, **columns)]
    solved = sum(v >= success_threshold for v in values)
    return EvalResult(score=sum(values) / len(values), accuracy=solved / len(values), n=len(values),
                      completions=completions, tools=tools or {})


def _evaluate_agent(engine: Engine, tokenizer: Any, rows: Sequence[dict[str, Any]], reward: Callable[..., list],
                    environment: Environment, *, max_new_tokens: int, success_threshold: float, max_turns: int,
                    log: str | Path | None) -> EvalResult:
    requests = [AgentRequest(f"eval-{i}", row["prompt"]) for i, row in enumerate(rows)]
    with tempfile.TemporaryDirectory() as scratch:
        calls = TrajectoryLog(log or Path(scratch) / "eval-calls.jsonl")
        try:
            done = run_agent(engine, tokenizer, requests, environment, calls, max_turns=max_turns,
                             max_tokens=max_turns * max_new_tokens, turn_tokens=max_new_tokens, temperature=0.0)
        finally:
            calls.close()
    n = len(done)
    tools = {"calls_per_prompt": sum(len(t.calls) for t in done) / n,
             "malformed_call_rate": sum(t.malformed_calls for t in done) / max(sum(len(t.calls) for t in done), 1),
             "turns_per_prompt": sum(t.turns for t in done) / n}
    return _score(rows, [t.answer for t in done], reward, success_threshold, tools)
