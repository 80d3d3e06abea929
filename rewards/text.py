"""Completions arrive as plain strings or as chat messages (TRL's conversational format)."""

from __future__ import annotations

from typing import Any


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
