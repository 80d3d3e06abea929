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
            raise FieldErrors([((field,), message) for field, message in problems])
        return self
