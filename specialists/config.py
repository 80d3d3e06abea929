"""The specialist job spec: one domain, one base model, SFT then GRPO against the domain's rewards.

Users write it as YAML (``kind: specialist``); see ``configs/demo/specialists/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rewards.reasoning_gym import ReasoningGymSource, generated_files
from rewards.spec import EvalSettings, RewardRef
from rewards.tools import AgentSettings, ToolRef
from storage.specfile import (
    ENGINE,
    PRECISION,
    REPORT_TO,
    ROLLOUT,
    FieldErrors,
    ModelRef,
    Name,
    PathRef,
    Precision,
    ReportTo,
    Resources,
    RolloutSettings,
    StrictModel,
    ranks_problem,
)


class DatasetSpec(StrictModel):
    """Where a domain's prompts come from: JSONL or Parquet files read with the `datasets` library, or a
    reasoning-gym task whose files are written when the job starts."""

    train: PathRef | None = Field(None, description="Training prompts (.jsonl or .parquet), relative to this file "
                                  "or a URL.")
    eval: PathRef | None = Field(None, description="Held-out evaluation prompts, same format as `train`.")
    rl: PathRef | None = Field(
        None, description="GRPO's prompts (default: `train`). Prompts SFT never saw keep GRPO's groups mixed "
        "(some answers right, some wrong), which is where it has something to learn; on prompts SFT memorised "
        "every sample earns the same reward and the advantages are zero.")
    reasoning_gym: ReasoningGymSource | None = Field(
        None, description="Generate train/rl/eval from a reasoning-gym task instead of naming files (the files "
        "land under <RETORT_HOME>/data/reasoning-gym/; `retort data reasoning-gym` writes the same ones).")
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    completion_field: str = Field("completion", description="Column holding the SFT target answer.")

    fill_generated_files = model_validator(mode="before")(
        generated_files({"train": "train", "eval": "eval", "rl": "rl"}))

    @model_validator(mode="after")
    def _has_files(self) -> DatasetSpec:
        missing = [name for name in ("train", "eval") if getattr(self, name) is None]
        if missing:
            raise FieldErrors([((name,), f"no {name} file: name one, or give a reasoning_gym block")
                               for name in missing])
        return self

    def write_generated(self) -> None:
        """Write the reasoning-gym files this spec names (a no-op for plain files, or when they exist)."""
        if self.reasoning_gym is not None:
            self.reasoning_gym.write(Path(str(self.train)).parent)


class JudgingSpec(StrictModel):
    """The specialist as its own rubric judge (DeepSeek-V4's actor-as-GRM): judging examples built from the rubric
    and responses whose criteria can be checked join its SFT demonstrations, and its judging is measured on
    held-out responses before and after every phase. A `grm` reward without a judge of its own then judges with
    the policy's engine, at the current step's weights."""

    rubric: PathRef = Field(description="A rubric with judge criteria whose truth is a programmatic criterion "
                            "(`truth:`) or a label:<criterion> column of the responses.")
    train: PathRef | None = Field(None, description="Responses (.jsonl or .parquet) whose judging examples are "
                                  "mixed into SFT's training set (none: judging is measured, not trained).")
    eval: PathRef = Field(description="Held-out responses the judge is measured on (accuracy against the truth, "
                          "rank correlation, parse failures, cost).")
    prompt_field: str = Field("prompt", description="Column holding the prompt the response answers.")
    response_field: str = Field("response", description="Column holding the response to judge.")
    max_tokens: int = Field(32, gt=0, description="Longest verdict in tokens when measuring (greedy).")


GRADIENT_CHECKPOINTING = (
    "Recompute activations in the backward pass instead of keeping them (TRL's default): saves memory on large "
    "models at the cost of a second forward; a model as small as the demo's trains about a fifth faster without it."
)


class SFTSettings(StrictModel):
    """Supervised fine-tuning with TRL's SFTTrainer; the loss covers the completion only."""

    enabled: bool = Field(True, description="Run this phase; false skips straight to GRPO.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(8, gt=0, description="Sequences per device per step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    max_length: int = Field(1024, gt=0, description="Longest prompt + completion in tokens; longer ones are cut.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps with learning-rate warmup.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every this many steps (a killed job resumes there).")
    gradient_checkpointing: bool = Field(True, description=GRADIENT_CHECKPOINTING)


class GRPOSettings(StrictModel):
    """Group Relative Policy Optimization with TRL's GRPOTrainer, generating through the rollout service."""

    enabled: bool = Field(True, description="Run this phase; false stops after SFT.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps with learning-rate warmup (the "
                                "optimizer starts cold: a first full-size Adam step moves every weight by the "
                                "learning rate).")
    batch_size: int = Field(16, gt=0, description="Completions per device per step; a multiple of num_generations.")
    num_generations: int = Field(8, description="Completions sampled per prompt (the group); at least 2.")
    max_completion_length: int = Field(256, gt=0, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold of the rollouts.")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference model; 0 disables the reference.")
    epsilon: float = Field(0.2, gt=0, description="PPO-style clipping range of the policy ratio.")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field("dapo", description="TRL's loss normalization.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, the batch, or not at all."
    )
    save_steps: int = Field(50, gt=0, description="Checkpoint every this many steps (a killed job resumes there).")
    gradient_checkpointing: bool = Field(True, description=GRADIENT_CHECKPOINTING)
    engine: Literal["vllm", "hf"] = Field("vllm", description=ENGINE.replace("student", "policy"))

    @model_validator(mode="after")
    def _group_fits_batch(self) -> GRPOSettings:
        if self.num_generations < 2:
            raise FieldErrors([(("num_generations",),
                                f"GRPO needs at least 2 generations per prompt to compare them; num_generations "
                                f"is {self.num_generations}. Set num_generations: 2 or more.")])
        if self.batch_size % self.num_generations:
            raise FieldErrors([(("batch_size",),
                                f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                                f"({self.num_generations}) so every group fits in one batch")])
        return self


class SpecialistJob(StrictModel):
    """Train one domain specialist: a copy of the base model, SFT then GRPO, evaluated after each."""

    kind: Literal["specialist"] = Field(description="Always 'specialist' for this kind of file.")
    name: Name = Field(description="Job name, unique within a pipeline; teachers refer to it.")
    domain: Name = Field(description="The domain this specialist masters (e.g. math, code, instruct).")
    base_model: ModelRef = Field(description="Starting checkpoint: a local directory or a hub id.")
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    precision: Precision = Field("auto", description=PRECISION)
    report_to: ReportTo = Field(["none"], description=REPORT_TO)
    datasets: DatasetSpec = Field(description="Training and evaluation prompts.")
    sft: SFTSettings = Field(default_factory=SFTSettings, description="The SFT phase.")
    grpo: GRPOSettings = Field(default_factory=GRPOSettings, description="The GRPO phase.")
    rewards: list[RewardRef] = Field(min_length=1, description="Rewards by registry name; weighted sum.")
    judging: JudgingSpec | None = Field(None, description="Train and measure the policy as a rubric judge.")
    tools: list[ToolRef] = Field([], description="An agent's tools by registry name (rewards/tools.py): its answers "
                                 "are multi-turn trajectories that may call them.")
    agent: AgentSettings = Field(default_factory=AgentSettings, description="Turns and tool concurrency (with tools).")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Held-out evaluation.")
    rollout: RolloutSettings = Field(default_factory=RolloutSettings, description=ROLLOUT)
    resources: Resources = Field(default_factory=Resources, description="What the job reserves on the cluster.")
    max_attempts: int = Field(3, ge=1, description="Runs allowed before the job is marked failed.")

    @model_validator(mode="after")
    def _has_work(self) -> SpecialistJob:
        if not (self.sft.enabled or self.grpo.enabled):
            raise ValueError("both sft.enabled and grpo.enabled are false: the job would do nothing")
        if self.grpo.engine == "hf" and self.rollout.workers:
            raise FieldErrors([(("rollout", "weight_sync"),
                                f"weight_sync {self.rollout.weight_sync} starts rollout workers, but grpo.engine hf "
                                "generates with the trainer's own model; use grpo.engine: vllm, or weight_sync: "
                                "inprocess")])
        if problem := ranks_problem(self.resources, self.rollout):
            raise FieldErrors([problem])
        if self.judging is not None:
            self._check_judging_rubric()
        if self.resources.workers > 1 and self.grpo.enabled and (where := self._self_judging_reward()) is not None:
            raise FieldErrors([(("rewards", where, "args", "judge"),
                                f"judge: self needs the policy's engine in every trainer rank, but with "
                                f"resources.workers {self.resources.workers} only rank 0 holds it (each rank scores "
                                "its own slice): give the grm reward a separate judge (judge: <checkpoint path>), "
                                "or train on one rank")])
        return self

    def _self_judging_reward(self) -> int | None:
        """The index of a `grm` reward whose rubric has judge criteria and whose judge is the policy, if any."""
        from grm.prompt import judge_criteria
        from grm.rubric import Rubric
        from storage.specfile import SpecError, load_spec

        for i, ref in enumerate(self.rewards):
            if ref.name != "grm" or ref.rubric is None or ref.args.get("judge", "self") != "self" \
                    or ref.args.get("model"):
                continue
            try:
                if judge_criteria(load_spec(Rubric, str(ref.rubric))):
                    return i
            except SpecError:
                continue  # the reward itself reports its rubric's problems when it is built
        return None

    def _check_judging_rubric(self) -> None:
        from grm.prompt import judge_criteria
        from storage.specfile import SpecError

        try:
            rubric = self.judging_rubric()
        except (SpecError, FileNotFoundError) as exc:
            raise FieldErrors([(("judging", "rubric"), f"{self.judging.rubric}: {exc}")]) from None
        if not judge_criteria(rubric):
            raise FieldErrors([(("judging", "rubric"), f"rubric {rubric.name!r} has no judge criteria: there is "
                                "nothing to judge")])

    def judging_rubric(self):
        """The judging block's rubric (loaded), or None without one."""
        from grm.rubric import Rubric
        from storage.specfile import load_spec

        return None if self.judging is None else load_spec(Rubric, str(self.judging.rubric))
