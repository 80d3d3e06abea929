"""Format rewards: a regular expression, an exact answer, a length window."""

from __future__ import annotations

import re
from typing import Any

from rewards.text import column, completion_text


def regex_reward(pattern: str, full_match: bool = False, ignore_case: bool = False):
    """1.0 when the completion matches `pattern` (anywhere, or whole with full_match), else 0.0."""
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    check = compiled.fullmatch if full_match else compiled.search

    def regex(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        return [float(check(completion_text(c).strip() if full_match else completion_text(c)) is not None)
                for c in completions]

    return regex


def exact_match_reward(answer_field: str = "answer", normalize: bool = True):
    """1.0 when the completion equals the gold answer (case- and space-insensitive with normalize)."""

    def norm(text: str) -> str:
        return " ".join(text.split()).lower() if normalize else text

    def exact_match(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        golds = column(columns, answer_field, len(completions), "exact_match")
        return [None if gold is None else float(norm(completion_text(c)) == norm(str(gold)))
                for c, gold in zip(completions, golds, strict=True)]

    return exact_match


def length_reward(min_chars: int = 0, max_chars: int | None = None):
    """1.0 when the completion's length in characters is within [min_chars, max_chars], else 0.0."""

    def length(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        sizes = [len(completion_text(c)) for c in completions]
        return [float(size >= min_chars and (max_chars is None or size <= max_chars)) for size in sizes]

    return length
