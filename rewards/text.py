"""Completions arrive as plain strings or as chat messages (TRL's conversational format)."""

from __future__ import annotations

import re
from typing import Any, Literal


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, a message dict, or a list of messages (last one wins)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, list | tuple) and completion:
        return completion_text(completion[-1])
    return ""


def column(columns: dict[str, Any], name: str, n: int, reward: str) -> list[Any]:
    """One dataset column for all n completions, with an error that names the missing field."""
    if name not in columns:
        raise KeyError(f"reward {reward!r} needs the dataset column {name!r}; the batch has {sorted(columns)}")
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return values


AnswerFormat = Literal["whole", "last_line", "answer_tags", "boxed"]
ANSWER_FORMATS = ("Where a chat model's final answer sits in its completion: whole (the completion, stripped), "
                  "last_line (its last non-empty line), answer_tags (inside the last <answer>…</answer>) or "
                  "boxed (inside the last \\boxed{…}).")

_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{…}``, braces balanced (answers such as ``\\frac{1}{2}`` nest)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def extract_answer(completion: str, answer_format: AnswerFormat) -> str | None:
    """The final answer in `completion` (see ANSWER_FORMATS), stripped; None when the format finds none."""
    if answer_format == "whole":
        return completion.strip()
    if answer_format == "last_line":
        lines = [line for line in completion.splitlines() if line.strip()]
        return lines[-1].strip() if lines else None
    if answer_format == "answer_tags":
        found = _ANSWER_TAGS.findall(completion)
        return found[-1].strip() if found else None
    boxed = _last_boxed(completion)
    return None if boxed is None else boxed.strip()
