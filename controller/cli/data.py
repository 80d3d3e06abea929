"""`retort data`: write datasets (the demo's domains)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controller.cli.console import fail, out
from specialists.demo_sizes import DEMO_ROWS
from storage.db import run_home

app = typer.Typer(help="Generate datasets: the demo's domains.", no_args_is_help=True)


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
    """Write the demo domains (math, code, instruct) as JSONL files: train (SFT), rl (GRPO), eval (held out)."""
    from specialists.domains import write_demo_data

    try:
        written = write_demo_data(directory or run_home() / "demo" / "data", train, held_out, seed, rl)
    except ValueError as exc:
        fail(str(exc))
    for domain, path in written.items():
        out.print(f"{domain}: " + ", ".join(str(p) for p in sorted(path.glob("*.jsonl"))), highlight=False)

