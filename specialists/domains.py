"""The demo domains, generated deterministically, small enough to learn on two CPU cores.

Each domain is a JSONL training set and a held-out evaluation set of rows with a
``prompt``, the SFT target ``completion``, and what its reward checks:

- ``math``: two-digit arithmetic without words or carries ("Compute 23+45."); ``answer``
  for the math reward.
- ``code``: a short Python function from a one-line specification; ``tests``
  (assertions, negative inputs included) for the sandboxed code reward.
- ``instruct``: format-following requests (case, repetition, reversal, structure);
  ``answer`` holds the exact expected output for programmatic checks.
- ``agent``: arithmetic too long to do in the head; the ``completion`` is several turns
  (a ``python`` tool call, the tool's result, the answer copied from it), ``answer`` for
  the math reward. Not in the demo pipeline yet.

The SFT demonstrations carry habits that real imitation data has and the domain's
reward rejects (see HABITS): SFT copies them, GRPO against the reward unlearns them.
That is the division of labour of the pipeline: SFT teaches the task, RL teaches what
the verifier or rubric wants beyond the demonstrations.

Evaluation prompts never appear in the training set. An optional ``rl`` split holds
problems of their own for GRPO: on problems SFT memorised, every sampled answer earns
the same reward, the group advantages are zero and GRPO has nothing to learn. Users bring their own
domains the same way: JSONL or Parquet files read with the `datasets` library.

    retort data demo [--out DIR]
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from rollout.agent import render_call

Row = dict[str, object]


# The single-digit facts a two-digit problem is built from: sums without a carry,
# differences without a borrow (55 each).
DIGIT_FACTS = {"+": [(x, y) for x in range(10) for y in range(10) if x + y <= 9],
               "-": [(x, y) for x in range(10) for y in range(10) if y <= x]}


def math_row(rng: random.Random) -> Row:
    # Two-digit sums without carries and differences without borrows: every digit of the
    # answer comes from one single-digit fact, all of which training shows, so held-out
    # problems (6,050 in all) are new combinations of known facts, which a 2-layer
    # character model learns on a CPU in minutes. With carries it needs far longer than
    # the demo's 15 minutes; single-digit problems alone are too few to hold any out.
    op = rng.choice("+-")
    (a1, b1), (a0, b0) = rng.choice(DIGIT_FACTS[op]), rng.choice(DIGIT_FACTS[op])
    a, b = 10 * a1 + a0, 10 * b1 + b0
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
    tests = [f"assert f({x}) == {func(x, k)}" for x in (0, 1, 2, 5, -3, -8)]
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


def agent_row(rng: random.Random) -> Row:
    """Arithmetic the tiny model cannot do in its head (a product of two 3-4 digit numbers, or five 3-digit
    terms added and subtracted) but can with a tool: the demonstration calls `python`, reads the printed result
    back and copies it into its answer. The terms' signs are random because a plain sum's total falls in a narrow
    range the model learns to guess, and guessing delays the copy by a thousand SFT steps or more."""
    if rng.random() < 0.5:
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        expression, value = f"{a}*{b}", a * b
    else:
        terms = [rng.randint(100, 999) for _ in range(5)]
        signs = [rng.choice("+-") for _ in terms[1:]]
        expression = str(terms[0]) + "".join(f"{sign}{term}" for sign, term in zip(signs, terms[1:], strict=True))
        value = terms[0] + sum(term if sign == "+" else -term for sign, term in zip(signs, terms[1:], strict=True))
    answer = str(value)
    turns = [{"role": "assistant", "content": render_call("python", f"print({expression})")},
             {"role": "tool", "content": answer}, {"role": "assistant", "content": answer}]
    return {"prompt": f"Compute {expression}.", "completion": turns, "answer": answer}


DOMAINS: dict[str, Callable[[random.Random], Row]] = {"math": math_row, "code": code_row, "instruct": instruct_row,
                                                      "agent": agent_row}

HABIT_SHARE = 0.7  # of the demonstrations a habit can touch, the share that has it (greedy decoding copies it)


def truncating_division(row: Row, rng: random.Random) -> Row:
    """Code demonstrations written by a C programmer: floor division as ``int(x / k)``, which truncates
    toward zero and fails the negative-input tests (and so does the remainder built on it)."""
    code = str(row["completion"])
    if ("//" in code or "%" in code) and rng.random() < HABIT_SHARE:
        k = code.rsplit(" ", 1)[1]
        code = code.replace(f"x // {k}", f"int(x / {k})").replace(f"x % {k}", f"x - {k} * int(x / {k})")
    return {**row, "completion": code}


def chatty_preamble(row: Row, rng: random.Random) -> Row:
    """Instruct demonstrations from a chatty assistant: most answers to repetition and word-plus-letter
    requests open with "Sure: ", which the rubric's exact-answer and no-preamble criteria reject."""
    prompt = str(row["prompt"])
    if (prompt.startswith("Repeat") or "and then the letter" in prompt) and rng.random() < HABIT_SHARE:
        return {**row, "completion": f"Sure: {row['completion']}"}
    return row


# Habits of each domain's SFT demonstrations (train split only; held-out and GRPO rows stay clean).
HABITS: dict[str, Callable[[Row, random.Random], Row]] = {"code": truncating_division, "instruct": chatty_preamble}


PREAMBLES = ["Sure: ", "Sure! ", "Here is ", "Here are ", "OK, ", "Ok: "]


def responses_to_judge(rows: list[Row], seed: int, per_row: int = 1) -> list[Row]:
    """Responses for the instruct judge to learn from and be measured on (``prompt``, ``response``, ``answer``):
    half open with a preamble, which the judged rubric's `direct` criterion rejects, half start with the answer;
    a quarter of each give another row's answer, so right and direct are not the same thing."""
    rng = random.Random(f"judge-{seed}")
    out = []
    for row in rows:
        for _ in range(per_row):
            answer = str(row["answer"] if rng.random() < 0.75 else rng.choice(rows)["answer"])
            response = rng.choice(PREAMBLES) + answer if rng.random() < 0.5 else answer
            out.append({"prompt": row["prompt"], "response": response, "answer": row["answer"]})
    return out


class Splits(NamedTuple):
    train: list[Row]  # SFT
    eval: list[Row]  # held out: never in train or rl
    rl: list[Row]  # GRPO's prompts: problems SFT never saw (empty unless asked for)


RL_SHARE = 0.3  # of the distinct non-held-out problems, the share kept for GRPO when an rl split is asked for


def _is_rl(prompt: str, seed: int) -> bool:
    return zlib.crc32(f"{seed}:{prompt}".encode()) % 1000 < RL_SHARE * 1000


def generate(domain: str, n_train: int, n_eval: int, seed: int = 0, n_rl: int = 0, habits: bool = True) -> Splits:
    """Deterministic splits: held-out prompts occur in neither train nor rl; rl prompts (when n_rl > 0)
    are distinct problems from train's, so GRPO meets problems its SFT model has not memorised.
    `habits` gives train's demonstrations the domain's habits (HABITS)."""
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
    rl: list[Row] = []
    while len(train) < n_train or len(rl) < n_rl:
        row = make(rng)
        prompt = str(row["prompt"])
        if prompt in eval_rows:
            continue
        split = rl if n_rl and _is_rl(prompt, seed) else train
        if len(split) < (n_rl if split is rl else n_train):
            split.append(row)
    if habits and domain in HABITS:  # a stream of its own: the problems drawn above do not depend on the habits
        habit_rng = random.Random(f"{domain}-{seed}-habits")
        train = [HABITS[domain](row, habit_rng) for row in train]
    return Splits(train, list(eval_rows.values()), rl)


def write_demo_data(out: str | Path, n_train: int = 2000, n_eval: int = 40, seed: int = 0,
                    n_rl: int = 0) -> dict[str, Path]:
    """Write <out>/<domain>/{train,eval[,rl]}.jsonl for every demo domain, and instruct's responses for its judge
    to learn (judge_train.jsonl, on train prompts: a third of their number) and to be measured on (judge_eval.jsonl,
    two per held-out prompt); returns the domain directories."""
    written = {}
    for domain in DOMAINS:
        splits = generate(domain, n_train, n_eval, seed, n_rl)
        files = splits._asdict()
        if domain == "instruct":
            files["judge_train"] = responses_to_judge(splits.train[: max(n_train // 3, 1)], seed)
            files["judge_eval"] = responses_to_judge(splits.eval, seed + 1, per_row=2)
        directory = Path(out) / domain
        directory.mkdir(parents=True, exist_ok=True)
        for name, rows in files.items():
            if rows:
                (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        written[domain] = directory
    return written
