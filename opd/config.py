"""The distillation run spec: one student, several teachers, a prompt mixture, a divergence.

Users write it as YAML (``kind: distillation``); see ``configs/demo/distill.yaml``.
Each mixture entry names the teacher (by index) that scores its prompts; batches
are later ordered by that index so each teacher head loads once per mini-batch.
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
    PathRefs,
    Precision,
    ReportTo,
    Resources,
    RolloutSettings,
    StrictModel,
    ranks_problem,
)


class TeacherSpec(StrictModel):
    """One teacher: a checkpoint, or (inside a pipeline) the specialist that will produce it."""

    index: int = Field(ge=0, description="Teacher index; batches are sorted by it.")
    name: Name = Field(description="Teacher name, used in metrics and reports.")
    checkpoint: ModelRef | None = Field(None, description="Teacher checkpoint (directory, URL or hub id); with "
                                        "`specialist` too, what a run submitted on its own uses.")
    specialist: Name | None = Field(None, description="Name of a specialist in the same pipeline whose final "
                                    "checkpoint this teacher is (it replaces `checkpoint` inside a pipeline).")

    @model_validator(mode="after")
    def _has_source(self) -> TeacherSpec:
        if self.checkpoint is None and self.specialist is None:
            raise ValueError(
                f"teacher {self.name!r} needs a 'checkpoint' (a model path) or a 'specialist' (a specialist's name "
                "in the same pipeline), or both"
            )
        return self


class StudentSpec(StrictModel):
    """Where the student starts."""

    init: ModelRef = Field(description="Initial student checkpoint, usually the specialists' base model.")


class MixtureEntry(StrictModel):
    """One domain of the prompt mixture and the teacher that scores it."""

    domain: Name = Field(description="Domain name, used in metrics and reports.")
    prompts: PathRefs | None = Field(None, description="Training prompts (.jsonl or .parquet) of this domain: one "
                                     "file, or a list of files read as one.")
    eval_prompts: PathRef | None = Field(None, description="Held-out prompts for per-domain evaluation.")
    reasoning_gym: ReasoningGymSource | None = Field(
        None, description="Generate `prompts` (its train and rl splits) and `eval_prompts` from a reasoning-gym task "
        "instead of naming files; the same block as the teacher specialist's `datasets.reasoning_gym` gives the same "
        "files.")
    weight: float = Field(1.0, gt=0, description="Relative share of this domain in each batch.")
    teacher: int = Field(ge=0, description="Index of the teacher for this domain's prompts.")
    rewards: list[RewardRef] = Field(default_factory=list, description="Rewards used to evaluate this domain.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="How `eval_prompts` are scored: the "
                               "prompts taken and the answer budget; in a pipeline, the same as the teacher "
                               "specialist's `eval`, so student and teacher are scored alike.")
    completion_field: str = Field("completion", description="Column with reference answers, used only for the "
                                  "off-policy share of a batch (`off_policy_fraction`).")
    tools: list[ToolRef] = Field([], description="An agent domain's tools (rewards/tools.py), as its teacher "
                                 "specialist's: the student answers in multi-turn trajectories that may call them, "
                                 "the teacher scores the student's own tokens of every turn and tool results are "
                                 "context only; its reference answers (the off-policy share) are lists of turns, "
                                 "as SFT's.")
    agent: AgentSettings = Field(default_factory=AgentSettings, description="Turns and tool concurrency (with tools).")

    fill_generated_files = model_validator(mode="before")(
        generated_files({"prompts": "train+rl", "eval_prompts": "eval"}))

    @model_validator(mode="after")
    def _has_prompts(self) -> MixtureEntry:
        if self.prompts is None:
            raise FieldErrors([(("prompts",), f"domain {self.domain!r} has no prompts: name a file, or give a "
                                "reasoning_gym block")])
        return self

    def write_generated(self) -> None:
        """Write the reasoning-gym files this entry names (a no-op for plain files, or when they exist)."""
        if self.reasoning_gym is not None and self.prompts:
            self.reasoning_gym.write(Path(self.prompts[0]).parent)


class GenerationSettings(StrictModel):
    """How the student samples its own answers."""

    max_new_tokens: int = Field(256, gt=0, description="Longest student answer in tokens (a domain with tools "
                                "answers in turns as it is scored: each turn its eval budget, up to max_turns).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    chat_template: bool = Field(True, description="Wrap prompts in the student tokenizer's chat template.")
    max_model_len: int | None = Field(None, gt=0, description="Generation context; default: the model's.")
    engine: Literal["vllm", "hf"] = Field("vllm", description=ENGINE)


class DistillationRun(StrictModel):
    """Full-vocabulary on-policy distillation of several teachers into one student."""

    kind: Literal["distillation"] = Field(description="Always 'distillation' for this kind of file.")
    name: Name = Field(description="Run name.")
    seed: int = Field(0, description="Seed for prompt sampling and generation.")
    precision: Precision = Field("auto", description=PRECISION)
    report_to: ReportTo = Field(["none"], description=REPORT_TO)
    student: StudentSpec = Field(description="The student's initialisation.")
    teachers: list[TeacherSpec] = Field(min_length=1, description="Teachers, each with a unique index.")
    mixture: list[MixtureEntry] = Field(min_length=1, description="Prompt domains, each routed to a teacher.")
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = Field(
        "reverse_kl", description="reverse_kl = KL(student‖teacher); forward_kl = KL(teacher‖student); jsd."
    )
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (TRL's convention: 0 forward, 1 reverse).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both distributions in the loss.")
    loss_normalization: Literal["token", "sequence"] = Field(
        "token", description="What a step's loss is the mean over: every token (long answers weigh most), or "
        "every sequence (each answer's own token mean, so short answers such as arithmetic results weigh as much "
        "as long ones).")
    chunk_size: int = Field(256, gt=0, description="Tokens per chunk of the fused loss; memory is O(chunk × vocab).")
    steps: int = Field(gt=0, description="Optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Prompts per optimizer step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per step.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "cosine", "warmup_stable_decay"] = Field(
        "constant", description="constant; cosine decay from the peak to 10% of it over the run; or "
        "warmup_stable_decay (transformers' name): the peak until the last `decay_steps`, then linearly to 10% of "
        "it, so a student still learning at the peak rate settles at the end instead of stopping where the "
        "rate's noise left it.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup to the peak learning rate.")
    decay_steps: int = Field(0, ge=0, description="The last steps, in which warmup_stable_decay lowers the rate.")
    off_policy_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of each batch that is the dataset's reference answers instead of the "
        "student's own samples (GKD's 1-λ); teachers still score every vocabulary entry at every position. It "
        "speeds up a student that starts far from its teachers, whose own samples are noise at first; "
        "0 is purely on-policy.")
    off_policy_fraction_end: float | None = Field(
        None, ge=0, lt=1, description="If set, the off-policy share moves linearly from off_policy_fraction at the "
        "first step to this at the last: reference answers start a distant student, its own samples finish it "
        "(late in a run, replaying the same references over-fits them).")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="Student sampling.")
    max_resident_heads: int = Field(2, ge=1, description="Teacher heads on the device at once (LRU beyond); 2 or "
                                    "more lets the next teacher's head copy while the current one's loss runs.")
    head_host_budget_gb: float | None = Field(
        None, gt=0, description="Host memory (GiB) for teacher heads, pinned on a GPU machine: each head is read "
        "from storage once per run and kept here; beyond the budget the least recently used go back to storage "
        "(read again when needed). None keeps every head.")
    max_resident_trunks: int = Field(
        0, ge=0, description="Teacher trunks kept loaded between steps (LRU beyond); 0 reads each from storage "
        "every step, as teachers too large to sit beside the student need. Trunks run in index order, so this "
        "helps only when it covers every teacher.")
    eval_every: int = Field(50, gt=0, description="Evaluate every domain every this many steps.")
    save_every: int = Field(50, gt=0, description="Checkpoint every this many steps (a killed run resumes there).")
    rollout: RolloutSettings = Field(default_factory=RolloutSettings, description=ROLLOUT)
    resources: Resources = Field(default_factory=Resources, description="What the run reserves on the cluster.")
    max_attempts: int = Field(3, ge=1, description="Runs allowed before the job is marked failed.")

    @model_validator(mode="after")
    def _teachers_and_mixture_agree(self) -> DistillationRun:
        problems: list[tuple[tuple, str]] = []
        indices = [t.index for t in self.teachers]
        names = [t.name for t in self.teachers]
        for i, teacher in enumerate(self.teachers):
            if teacher.index in indices[:i]:
                problems.append((("teachers", i, "index"),
                                 f"teacher index {teacher.index} is used by more than one teacher; indices must be "
                                 "unique"))
            if teacher.name in names[:i]:
                problems.append((("teachers", i, "name"), f"teacher name {teacher.name!r} is used more than once"))
        known = set(indices)
        for i, entry in enumerate(self.mixture):
            if entry.teacher not in known:
                problems.append((("mixture", i, "teacher"),
                                 f"mixture domain {entry.domain!r} names teacher {entry.teacher}, but the "
                                 f"teachers' indices are {sorted(known)}"))
        routed = {e.teacher for e in self.mixture}
        for i, teacher in enumerate(self.teachers):
            if teacher.index not in routed:
                problems.append((("teachers", i, "index"),
                                 f"teacher index {teacher.index} scores no mixture domain; remove the teacher or "
                                 "route a domain to it"))
        if self.generation.engine == "hf" and self.rollout.workers:
            problems.append((("rollout", "weight_sync"),
                             f"weight_sync {self.rollout.weight_sync} starts rollout workers, but generation.engine "
                             "hf generates with the student itself; use generation.engine: vllm, or weight_sync: "
                             "inprocess"))
        if problem := ranks_problem(self.resources, self.rollout):
            problems.append(problem)
        if self.lr_schedule == "warmup_stable_decay" and not 0 < self.decay_steps <= self.steps - self.warmup_steps:
            problems.append((("decay_steps",), f"lr_schedule warmup_stable_decay decays over decay_steps, which must "
                             f"be between 1 and steps - warmup_steps ({self.steps - self.warmup_steps}); got "
                             f"{self.decay_steps}"))
        elif self.decay_steps and self.lr_schedule != "warmup_stable_decay":
            problems.append((("decay_steps",), f"decay_steps is used by lr_schedule warmup_stable_decay only, and this "
                             f"run's is {self.lr_schedule}"))
        if problems:
            raise FieldErrors(problems)
        return self
