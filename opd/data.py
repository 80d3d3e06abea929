"""Prompt data for distillation: each domain's prompts, sampled by mixture weight, tagged with a teacher.

Files are read with the `datasets` library (JSONL or Parquet); every column besides
the prompt travels with the sample, so rewards can use it (e.g. `answer`, `tests`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from opd.config import MixtureEntry
from storage.tables import load_table


@dataclass(frozen=True)
class Sample:
    domain: str
    teacher_index: int
    prompt: str
    columns: dict[str, Any]


def read_rows(path: str | list[str], prompt_field: str = "prompt") -> list[dict[str, Any]]:
    """All rows of a JSONL or Parquet prompt file (or of several, in order); each needs a string `prompt_field`."""
    if isinstance(path, list):
        return [row for one in path for row in read_rows(one, prompt_field)]
    rows = list(load_table(path, [prompt_field]))
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get(prompt_field), str):
            raise ValueError(f"{path}: row {number} has no string {prompt_field!r} field")
    return rows


def allocate(weights: list[float], total: int) -> list[int]:
    """Split `total` samples across domains by weight (largest remainder, so the counts add up)."""
    scaled = [w / sum(weights) * total for w in weights]
    counts = [int(x) for x in scaled]
    for i in sorted(range(len(weights)), key=lambda i: scaled[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts


def sample_batch(mixture: list[MixtureEntry], rows: dict[str, list[dict[str, Any]]], batch_size: int,
                 seed: int) -> list[Sample]:
    """One step's prompts: per-domain counts by weight, rows drawn with a per-step seed (reproducible)."""
    rng = random.Random(seed)
    batch = []
    for entry, count in zip(mixture, allocate([e.weight for e in mixture], batch_size), strict=True):
        for row in rng.choices(rows[entry.domain], k=count):
            batch.append(Sample(entry.domain, entry.teacher, row["prompt"],
                                {k: v for k, v in row.items() if k != "prompt"}))
    return batch


def off_policy_indices(batch_size: int, fraction: float, seed: int) -> set[int]:
    """Which samples of a batch use the dataset's reference answer instead of the student's own (reproducible)."""
    return set(random.Random(seed).sample(range(batch_size), round(batch_size * fraction)))
