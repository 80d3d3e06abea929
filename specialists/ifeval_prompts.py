"""Instruction-following prompts with verifiable constraints, the Tulu-3 way: a task plus constraints.

Each prompt is a short writing task followed by one or two of IFEval's instructions (word
counts, case, JSON, an end phrase, a postscript, …), worded by IFEval's own checkers
(`build_description`), so the ``ifeval`` reward scores answers with IFEval's code. Rows are in
IFEval's format: ``prompt``, ``instruction_id_list`` and ``kwargs`` (one dict per instruction).
Constraints that conflict (all lowercase and all capitals; JSON and a title) are not combined.

    retort data ifeval --out DIR [--size N] [--eval N] [--seed S]
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

TASKS = ["Write a short note to a friend about {topic}.", "Describe {topic} in a few sentences.",
         "Give advice to someone who is new to {topic}.", "Explain what makes {topic} interesting.",
         "Write a short story that involves {topic}.", "List a few facts about {topic}."]
TOPICS = ["the weather", "gardening", "the moon", "rivers", "bicycles", "baking bread", "the ocean", "libraries",
          "city parks", "trains", "winter", "music lessons", "bees", "a mountain hike", "the night sky"]
WORDS = ["river", "stone", "light", "window", "garden", "morning", "bridge", "silver", "forest", "candle"]
END_PHRASES = ["Is there anything else I can help with?", "Any other questions?", "That is all."]

Sampler = Callable[[random.Random], dict[str, Any]]

# Instruction id → its arguments, drawn explicitly (never by the checker's own module-level random).
INSTRUCTIONS: dict[str, Sampler] = {
    "change_case:english_lowercase": lambda rng: {},
    "change_case:english_capital": lambda rng: {},
    "punctuation:no_comma": lambda rng: {},
    "detectable_format:json_format": lambda rng: {},
    "detectable_format:title": lambda rng: {},
    "startend:quotation": lambda rng: {},
    "startend:end_checker": lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
    "detectable_content:postscript": lambda rng: {"postscript_marker": rng.choice(["P.S.", "P.P.S"])},
    "detectable_format:number_bullet_lists": lambda rng: {"num_bullets": rng.randint(2, 5)},
    "keywords:existence": lambda rng: {"keywords": rng.sample(WORDS, 2)},
    "keywords:forbidden_words": lambda rng: {"forbidden_words": rng.sample(WORDS, 2)},
    "length_constraints:number_words": lambda rng: {"num_words": rng.choice([20, 40, 60, 100]),
                                                    "relation": rng.choice(["less than", "at least"])},
}
CONFLICTS = [{"change_case:english_lowercase", "change_case:english_capital"},
             {"detectable_format:json_format", "detectable_format:title"},
             {"detectable_format:json_format", "startend:quotation"},
             {"detectable_format:json_format", "startend:end_checker"},
             {"detectable_format:json_format", "detectable_content:postscript"},
             {"detectable_format:json_format", "detectable_format:number_bullet_lists"},
             {"startend:quotation", "startend:end_checker"},
             {"startend:quotation", "detectable_content:postscript"},
             {"keywords:existence", "keywords:forbidden_words"}]


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """IFEval's own wording of one instruction with these arguments."""
    from rewards.ifeval import registry

    return registry()[instruction_id](instruction_id).build_description(**kwargs)


def ifeval_row(rng: random.Random) -> dict[str, Any]:
    """One prompt: a task and one or two compatible constraints."""
    task = rng.choice(TASKS).format(topic=rng.choice(TOPICS))
    chosen = [rng.choice(sorted(INSTRUCTIONS))]
    if rng.random() < 0.5:
        others = [i for i in sorted(INSTRUCTIONS) if i not in chosen and {chosen[0], i} not in CONFLICTS]
        chosen.append(rng.choice(others))
    kwargs = [INSTRUCTIONS[i](rng) for i in chosen]
    prompt = " ".join([task, *(describe(i, kw) for i, kw in zip(chosen, kwargs, strict=True))])
    return {"prompt": prompt, "instruction_id_list": chosen, "kwargs": kwargs}


def write_ifeval_prompts(directory: str | Path, n_train: int, n_eval: int, seed: int = 0) -> dict[str, Path]:
    """<directory>/{train,eval}.jsonl with distinct prompts (none in both); returns the files."""
    rng = random.Random(f"ifeval-{seed}")
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(50 * (n_train + n_eval)):
        if len(rows) == n_train + n_eval:
            break
        row = ifeval_row(rng)
        rows.setdefault(row["prompt"], row)
    else:
        raise ValueError(f"only {len(rows)} distinct prompts could be made; ask for fewer than {n_train + n_eval}")
    ordered = list(rows.values())
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    files = {"eval": target / "eval.jsonl", "train": target / "train.jsonl"}
    for file, part in zip(files.values(), (ordered[:n_eval], ordered[n_eval:]), strict=True):
        file.write_text("".join(json.dumps(r) + "\n" for r in part))
    return files
