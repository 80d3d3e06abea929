"""How a job spec names a reward: a registry name, a weight, and the reward's own arguments."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from storage.specfile import FieldErrors, Name, PathRef, StrictModel


class RewardRef(StrictModel):
    """One reward of a job; several are combined as a weighted sum."""

    name: Name = Field(description="Registry name of the reward (e.g. 'math', 'code', 'format', 'grm').")
    weight: float = Field(1.0, description="Weight of this reward in the job's weighted sum.")
    rubric: PathRef | None = Field(None, description="Rubric YAML for the 'grm' reward, relative to this file.")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the reward (see `rewards/registry.py`)."
    )

    @model_validator(mode="after")
    def _known_reward(self) -> RewardRef:
        from rewards.registry import check_ref  # the registry imports this module

        problems = check_ref(self)
        if problems:
            raise FieldErrors(problems)
        return self


class EvalSettings(StrictModel):
    """How a domain's held-out prompts are scored: greedy answers under one token budget, the mean reward.

    A specialist and the student of a distillation score a domain with the same settings (a pipeline checks
    it), so the table's ratios compare like with like."""

    max_prompts: int | None = Field(None, gt=0, description="Evaluate on at most this many held-out prompts.")
    max_new_tokens: int = Field(256, gt=0, description="Longest evaluated answer in tokens (greedy decoding).")
    success_threshold: float = Field(
        1.0, description="A prompt counts as solved (accuracy) when its reward is at least this."
    )
    rewards: list[RewardRef] | None = Field(
        None, description="Score held-out answers with these rewards instead of the job's own (default): e.g. a "
        "rubric's programmatic truth when training is rewarded by a judge, so that a self-judging run is not graded "
        "by itself and runs with different training rewards compare on one scale.")
