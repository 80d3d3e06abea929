"""The rollout run spec: generate completions for a prompt file, preemptibly.

Users write it as YAML (``kind: rollout``) and run ``retort rollout run FILE``;
see ``configs/examples/rollout.yaml``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from storage.specfile import PRECISION, ModelRef, Name, PathRef, Precision, StrictModel


class SamplingSettings(StrictModel):
    """How completions are sampled; request i is seeded with `seed + i`."""

    max_tokens: int = Field(128, gt=0, description="Longest completion in tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Base seed; prompt i samples with seed + i, so reruns reproduce.")


class WALSettings(StrictModel):
    """When logged tokens become durable; see rollout/wal.py for the format."""

    mode: Literal["group", "every_record", "none"] = Field(
        "group", description="group: fsync every interval_ms or max_records; every_record; none: at the end only."
    )
    interval_ms: float = Field(50.0, gt=0, description="Group commit interval in milliseconds.")
    max_records: int = Field(512, gt=0, description="Group commit after this many records at the latest.")
    segment_mb: float = Field(64.0, gt=0, description="Start a new segment file past this size.")


class RolloutRunSpec(StrictModel):
    """A batch generation job that a user can preempt and resume."""

    kind: Literal["rollout"] = Field(description="Always 'rollout' for this kind of file.")
    name: Name = Field(description="Run name; the run id is this plus a timestamp.")
    model: ModelRef = Field(description="Checkpoint to generate with: a local directory or a hub id.")
    prompts: PathRef = Field(description="JSONL file, one object with 'id' and 'prompt' per line.")
    chat_template: bool = Field(False, description="Wrap each prompt in the tokenizer's chat template.")
    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm (default) or hf (plain transformers).")
    precision: Precision = Field("auto", description=PRECISION)
    max_model_len: int | None = Field(None, gt=0, description="Context length; default: the model's.")
    enforce_eager: bool | None = Field(
        None, description="vLLM: skip torch.compile (starts faster; on GPUs steps slower without CUDA graphs). "
        "Default: eager on a CPU, where compiling costs 20-30 s a model and gains nothing measurable.")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="Sampling settings.")
    wal: WALSettings = Field(default_factory=WALSettings, description="Write-ahead log commit settings.")
    stale_policy: Literal["continue", "discard"] = Field(
        "continue", description="On resume under newer weights: keep committed tokens, or regenerate."
    )
    output_dir: PathRef | None = Field(None, description="Run directory; default <RETORT_HOME>/rollouts/<run id>.")
