"""SFT of one specialist with TRL's SFTTrainer; the loss covers the completion only.

Rows are ``{"prompt", "completion"}`` (plus any reward columns, dropped here); they are
turned into TRL's conversational prompt-completion format, so the model's chat
template frames them exactly as generation will. A killed run resumes from its last
checkpoint under ``out_dir``.

With a `judging` block, judging examples (the judge prompt of each response the block names and the verdict its
truth gives, `grm.judging`) join the demonstrations, so one checkpoint answers and judges. They are several times
longer than the demo's task rows, so each batch then holds one kind (`OneKindBatches`): a task batch is not padded
to a judge prompt's length. (Grouping by length instead makes batches of one task type each, whose alternating
gradients kept the demo's tiny model from learning anything.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from specialists.config import SpecialistJob
from specialists.fit import CpuFsdp, fit, trainer_arguments
from storage.tables import load_table


def conversation(prompt: str, completion: str | list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """One pair in TRL's conversational prompt-completion format. A completion may be several turns already
    (an agent's: its calls, the tools' results, its answer)."""
    turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return {"prompt": [{"role": "user", "content": prompt}], "completion": turns}


def has_tool_turns(data) -> bool:
    """Whether any demonstration holds a tool turn, which is context to learn from, never a target."""
    return any(turn["role"] == "tool" for row in data["completion"] for turn in row)


def conversational(path: str, prompt_field: str, completion_field: str):
    """A `datasets` Dataset of TRL conversational prompt-completion pairs from JSONL or Parquet."""
    data = load_table(path, [prompt_field, completion_field])
    return data.map(lambda row: conversation(row[prompt_field], row[completion_field]),
                    remove_columns=data.column_names)


class OneKindBatches:
    """Indices for batches drawn from one part of the dataset each (`parts`: the row indices of each), each part in
    a random order and the batches shuffled together; a part's last batch is filled up from its own start. Seeded
    by seed and epoch (the Trainer sets the epoch), so a resumed run sees the same order."""

    def __init__(self, parts: list[list[int]], batch_size: int, seed: int):
        self.parts, self.batch_size, self.seed, self.epoch = [p for p in parts if p], batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(-(-len(p) // self.batch_size) * self.batch_size for p in self.parts)

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = []
        for part in self.parts:
            order = [part[i] for i in torch.randperm(len(part), generator=generator).tolist()]
            order += [order[i % len(order)] for i in range(-len(order) % self.batch_size)]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[i]


class JudgingMix:
    """Trainer mixin: batches of task demonstrations and batches of judging examples (the rows whose `judging`
    column is true, after TRL's preparation has dropped any), never the two together."""

    def _get_train_sampler(self, train_dataset=None):
        flags = self.train_dataset["judging"]
        parts = [[i for i, f in enumerate(flags) if not f], [i for i, f in enumerate(flags) if f]]
        return OneKindBatches(parts, self._train_batch_size, self.args.seed)


def judging_demonstrations(spec: SpecialistJob, tokenizer: Any):
    """The judging block's training responses as conversational judging examples (None without them); refuses a
    judge prompt longer than `sft.max_length`, which TRL would cut before its verdict."""
    from datasets import Dataset

    from grm.judging import judging_rows

    if spec.judging is None or spec.judging.train is None:
        return None
    judging = spec.judging
    rows = list(load_table(judging.train, [judging.prompt_field, judging.response_field]))
    examples = judging_rows(spec.judging_rubric(), rows, prompt_field=judging.prompt_field,
                            response_field=judging.response_field, seed=spec.seed)
    longest = conversation(**max(examples, key=lambda e: len(e["prompt"]) + len(e["completion"])))
    length = len(tokenizer.apply_chat_template(longest["prompt"] + longest["completion"], tokenize=True,
                                               return_dict=True)["input_ids"])
    if length > spec.sft.max_length:
        raise ValueError(f"judging.train: the longest judging example is {length} tokens, more than sft.max_length "
                         f"({spec.sft.max_length}), which would cut its verdict off: raise sft.max_length to at "
                         f"least {length}, or use judge_prompt: compact in the rubric")
    return Dataset.from_list(examples).map(lambda row: {**conversation(row["prompt"], row["completion"]),
                                                        "judging": True})


def build_sft_trainer(spec: SpecialistJob, model: str, out_dir: Path):
    """TRL's SFTTrainer for the job's training set (and judging examples), and its tokenizer."""
    from datasets import concatenate_datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    settings = spec.sft
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = conversational(spec.datasets.train, spec.datasets.prompt_field, spec.datasets.completion_field)
    judging = judging_demonstrations(spec, tokenizer)
    if judging is not None:
        data = concatenate_datasets([data.map(lambda _: {"judging": False}), judging])
    config = SFTConfig(
        **trainer_arguments(settings, out_dir, spec.seed, spec.precision), num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1, gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length, lr_scheduler_type="cosine", logging_steps=10, completion_only_loss=True,
        assistant_only_loss=has_tool_turns(data),  # the loss on the model's turns only, not the tools' results
    )
    mixins = (CpuFsdp,) if judging is None else (JudgingMix, CpuFsdp)
    trainer_class = type("SFTTrainer", (*mixins, SFTTrainer), {})
    return trainer_class(model=model, args=config, train_dataset=data, processing_class=tokenizer), tokenizer


def run_sft(spec: SpecialistJob, model: str, out_dir: Path,
            on_log: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Fine-tune `model` on the job's training set; returns the final checkpoint directory."""
    trainer, tokenizer = build_sft_trainer(spec, model, out_dir)
    return fit(trainer, tokenizer, out_dir, on_log)
