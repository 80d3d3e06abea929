"""SFT of one specialist with TRL's SFTTrainer; the loss covers the completion only.

Rows are ``{"prompt", "completion"}`` (plus any reward columns, dropped here); they are
turned into TRL's conversational prompt-completion format, so the model's chat
template frames them exactly as generation will. A killed run resumes from its last
checkpoint under ``out_dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from specialists.config import SpecialistJob
from specialists.fit import CpuFsdp, fit, trainer_arguments
from storage.tables import load_table


def conversational(path: str, prompt_field: str, completion_field: str):
    """A `datasets` Dataset of TRL conversational prompt-completion pairs from JSONL or Parquet."""
    data = load_table(path, [prompt_field, completion_field])
    return data.map(lambda row: {"prompt": [{"role": "user", "content": row[prompt_field]}],
                                 "completion": [{"role": "assistant", "content": row[completion_field]}]},
                    remove_columns=data.column_names)


def build_sft_trainer(spec: SpecialistJob, model: str, out_dir: Path):
    """TRL's SFTTrainer for the job's training set, and its tokenizer."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    settings = spec.sft
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = conversational(spec.datasets.train, spec.datasets.prompt_field, spec.datasets.completion_field)
    config = SFTConfig(
        **trainer_arguments(settings, out_dir, spec.seed, spec.precision), num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1, gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length, lr_scheduler_type="cosine", logging_steps=10, completion_only_loss=True,
    )
    trainer_class = type("SFTTrainer", (CpuFsdp, SFTTrainer), {})
    return trainer_class(model=model, args=config, train_dataset=data, processing_class=tokenizer), tokenizer


def run_sft(spec: SpecialistJob, model: str, out_dir: Path,
            on_log: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Fine-tune `model` on the job's training set; returns the final checkpoint directory."""
    trainer, tokenizer = build_sft_trainer(spec, model, out_dir)
    return fit(trainer, tokenizer, out_dir, on_log)
