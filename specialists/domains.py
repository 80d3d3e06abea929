"""The three demo domains, generated deterministically, small enough to learn on two CPU cores.

Each domain is a JSONL training set and a held-out evaluation set of rows with a
``prompt``, the SFT target ``completion``, and what its reward checks:

- ``math``: arithmetic without words ("Compute 7+5."); ``answer`` for the math reward.
- ``code``: a short Python function from a one-line specification; ``tests``
  (assertions) for the sandboxed code reward.
- ``instruct``: format-following requests (case, repetition, reversal, structure);
  ``answer`` holds the exact expected output for programmatic checks.

Evaluation prompts never appear in the training set. Users bring their own
domains the same way: JSONL or Parquet files read with the `datasets` library.

    retort data demo [--out DIR]
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

Row = dict[str, object]


def math_row(rng: random.Random) -> Row:
    # Single-digit sums and differences: 155 distinct problems, so held-out ones are pairs the
    # model never saw and must compute; a 2-layer char model learns them on a CPU in about a
    # minute (two-digit operands need far longer than the demo's 15 minutes).
    op = rng.choice("+-")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b
    return {"prompt": f"Compute {a}{op}{b}.", "completion": str(value), "answer": str(value)}


CODE_TASKS: list[tuple[str, str, Callable[[int, int], int]]] = [
    ("returns x plus {k}", "x + {k}", lambda x, k: x + k),
    ("returns x minus {k}", "x - {k}", lambda x, k: x - k),
    ("returns x times {k}", "x * {k}", lambda x, k: x * k),
    ("returns the square of x plus {k}", "x * x + {k}", lambda x, k: x * x + k),
    ("returns {k} minus x", "{k} - x", lambda x, k: k - x),
    ("returns x divided by {k}, rounded down", "x // {k}", lambda x, k: x // k),
    ("returns the remainder of x divided by {k}", "x % {k}", lambda x, k: x % k),
]


def code_row(rng: random.Random) -> Row:
    spec, body, func = rng.choice(CODE_TASKS)
    k = rng.randint(1, 40)
    tests = [f"assert f({x}) == {func(x, k)}" for x in (0, 1, 2, 5, -3)]
    return {"prompt": f"Write a Python function f(x) that {spec.format(k=k)}.",
            "completion": f"def f(x):\n    return {body.format(k=k)}", "tests": tests}


WORDS = ["cat", "dog", "sun", "sky", "tree", "bird", "fish", "moon", "star", "rain", "wind", "leaf", "rock", "sand",
         "wave", "fire", "snow", "lake", "hill", "road"]


def instruct_row(rng: random.Random) -> Row:
    word = rng.choice(WORDS) + rng.choice(["", "s", "y"])
    kind = rng.randrange(5)
    if kind == 0:
        prompt, answer = f"Write the word {word} in capital letters.", word.upper()
    elif kind == 1:
        n = rng.randint(2, 4)
        prompt, answer = f"Repeat the word {word} {n} times, separated by spaces.", " ".join([word] * n)
    elif kind == 2:
        prompt, answer = f"Write the word {word} backwards.", word[::-1]
    elif kind == 3:
        prompt, answer = f"Spell the word {word} with dashes between the letters.", "-".join(word)
    else:
        letter = rng.choice(string.ascii_lowercase[:8])
        prompt, answer = f"Write the word {word} and then the letter {letter}.", f"{word} {letter}"
    return {"prompt": prompt, "completion": answer, "answer": answer}


DOMAINS: dict[str, Callable[[random.Random], Row]] = {"math": math_row, "code": code_row, "instruct": instruct_row}


def generate(domain: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Deterministic train and held-out rows; no held-out prompt occurs in training."""
    make = DOMAINS[domain]
    rng = random.Random(f"{domain}-{seed}")
    eval_rows: dict[str, Row] = {}
    for _ in range(100 * n_eval):
        if len(eval_rows) == n_eval:
            break
        row = make(rng)
        eval_rows.setdefault(str(row["prompt"]), row)
    else:
        raise ValueError(f"domain {domain!r} has too few distinct prompts for {n_eval} held-out ones")
    train: list[Row] = []
    while len(train) < n_train:
        row = make(rng)
        if row["prompt"] not in eval_rows:
            train.append(row)
    return train, list(eval_rows.values())


def write_demo_data(out: str | Path, n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> dict[str, Path]:
    """Write <out>/<domain>/{train,eval}.jsonl for every demo domain; returns the domain directories."""
    written = {}
    for domain in DOMAINS:
        train, held_out = generate(domain, n_train, n_eval, seed)
        directory = Path(out) / domain
        directory.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train), ("eval", held_out)):
            (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        written[domain] = directory
    return written
