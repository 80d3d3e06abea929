"""Student and teachers must share one tokenizer: full-vocabulary distillation compares distributions id by id.

A teacher whose vocabulary differs by a single entry (151,936 against 152,064 rows, a
common mismatch between checkpoints of one family) would be compared on the wrong tokens
without any error; a different chat template or special tokens make the teacher score text
that is not what the student generated. So this is checked before anything runs, and the
message names both checkpoints and what differs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TokenizerMismatch(ValueError):
    """Student and teachers do not share one tokenizer (the message says which and how)."""


@dataclass(frozen=True)
class TokenizerFacts:
    """What distillation needs to be identical between student and teacher."""

    vocab_rows: int | None  # rows of the model's embedding / LM head (config.json vocab_size)
    vocab: dict[str, int]  # token → id
    special: dict[str, Any]  # special tokens by role, and the added ones
    chat_template: str | None


def read_facts(checkpoint: str) -> TokenizerFacts:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = Path(checkpoint) / "config.json"
    rows = json.loads(config.read_text()).get("vocab_size") if config.exists() else None
    # The padding token is left out: trainers set one where a tokenizer has none (TRL gives SmolLM2's
    # specialists one), and padded positions are masked out of the loss, so it changes no distribution.
    roles = ("bos_token", "eos_token", "unk_token")
    special = {**{k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"},
               **{f"{role}_id": getattr(tokenizer, f"{role}_id", None) for role in roles}}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(
        tokenizer.chat_template, sort_keys=True)
    return TokenizerFacts(rows, tokenizer.get_vocab(), special, template)


def differences(student: TokenizerFacts, teacher: TokenizerFacts) -> list[str]:
    """What differs, in words; empty when the two can be distilled id by id."""
    found = []
    if student.vocab_rows != teacher.vocab_rows:
        found.append(f"vocabulary size {student.vocab_rows} vs {teacher.vocab_rows} (config.json vocab_size)")
    if student.vocab != teacher.vocab:
        moved = [t for t in student.vocab.keys() & teacher.vocab.keys() if student.vocab[t] != teacher.vocab[t]]
        only = len(student.vocab.keys() ^ teacher.vocab.keys())
        found.append(f"tokenizer vocabulary: {len(student.vocab)} vs {len(teacher.vocab)} tokens, {only} in only "
                     f"one of them, {len(moved)} with different ids")
    for key in sorted(student.special.keys() | teacher.special.keys()):
        if student.special.get(key) != teacher.special.get(key):
            found.append(f"special token {key}: {student.special.get(key)!r} vs {teacher.special.get(key)!r}")
    if student.chat_template != teacher.chat_template:
        found.append("chat template")
    return found


def check_tokenizers(student: str, teachers: Mapping[str, str]) -> None:
    """Raise TokenizerMismatch naming every teacher (name → checkpoint) whose tokenizer differs from the student's."""
    mine = read_facts(student)
    problems = []
    for name, checkpoint in teachers.items():
        found = differences(mine, read_facts(checkpoint))
        if found:
            problems.append(f"teacher {name!r} ({checkpoint}) and student ({student}) differ in: "
                            + "; ".join(found))
    if problems:
        raise TokenizerMismatch("full-vocabulary distillation needs one tokenizer for student and teachers: "
                         + " | ".join(problems))
