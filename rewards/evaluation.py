"""Held-out evaluation: greedy answers from a rollout engine, scored by a reward.

Used after each specialist phase and during distillation, so both report the same
number: the mean reward (a missing verdict counts as 0) and the share of prompts
whose reward reaches `success_threshold`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rollout.engine import Engine, GenerationRequest, encode_prompt


@dataclass(frozen=True)
class EvalResult:
    score: float  # mean reward, None counted as 0
    accuracy: float  # share of prompts with reward >= success_threshold
    n: int
    completions: list[str]


def evaluate(engine: Engine, tokenizer: Any, rows: Sequence[dict[str, Any]], reward: Callable[..., list],
             *, max_new_tokens: int, success_threshold: float = 1.0, chat_template: bool = True) -> EvalResult:
    """Greedy-decode every row's prompt and score the answers with `reward` (TRL's call shape)."""
    requests = [GenerationRequest(f"eval-{i}", encode_prompt(tokenizer, row["prompt"], chat_template),
                                  max_new_tokens, temperature=0.0) for i, row in enumerate(rows)]
    tokens: dict[str, list[int]] = {r.id: [] for r in requests}
    for step in engine.generate(requests):
        for chunk in step:
            tokens[chunk.id] += chunk.token_ids
    completions = [tokenizer.decode(tokens[r.id], skip_special_tokens=True) for r in requests]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k not in ("prompt", "completion")}
    values = [v or 0.0 for v in reward([row["prompt"] for row in rows], completions, **columns)]
    solved = sum(v >= success_threshold for v in values)
    return EvalResult(score=sum(values) / len(values), accuracy=solved / len(values), n=len(values),
                      completions=completions)
