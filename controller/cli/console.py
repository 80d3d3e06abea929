"""What every `retort` command shares: its two consoles, one-line failures, the job store, spec loading.

Every user mistake (a bad YAML file, an unknown job id, an unreachable database)
ends in a one-line message naming the file, line, field or value, and exit code
1; never a library traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import ArgumentError, OperationalError

from controller.specs import load_job_spec
from storage.db import Store, database_url, open_store
from storage.specfile import SpecError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def job_store() -> Store:
    url = database_url()
    try:
        return open_store(url)
    except (ArgumentError, OperationalError) as exc:
        fail(f"cannot open the job store at {url!r} (set RETORT_DB_URL or RETORT_HOME): {exc.args[0]}")


def report_problems(exc: SpecError) -> None:
    for problem in exc.problems:
        err.print(f"[red]✗[/] {escape(str(problem))}", highlight=False)


def load_job_file(file: Path):
    """A submittable spec, or every problem printed with its file and line and exit 1."""
    try:
        return load_job_spec(file)
    except SpecError as exc:
        report_problems(exc)
        raise typer.Exit(1) from None


def quiet_libraries() -> None:
    """vLLM and transformers log and draw progress bars of their own; ours is enough."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

