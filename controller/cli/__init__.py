"""The `retort` command line: validate specs, submit jobs, watch them, build base models.

One module per command group (`jobs`, `runs`, `base`, `data`, `rollout`, `rubric`);
`console` holds what they share. This module only wires them into one Typer app.
"""

from __future__ import annotations

import typer

from controller.cli import base, data, jobs, rollout, rubric, runs
from controller.cli.rollout import EXIT_PREEMPTED

app = typer.Typer(
    help="Retort: train domain specialists (SFT + GRPO) and distill them into one student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for name, command in (
    ("validate", jobs.validate), ("submit", jobs.submit), ("pipeline", jobs.pipeline), ("status", jobs.status),
    ("cancel", jobs.cancel), ("run-job", jobs.run_job), ("distill", jobs.distill),
    ("controller", jobs.run_controller), ("demo", runs.demo), ("run", runs.run), ("report", runs.report),
):
    app.command(name)(command)
for name, group in (("base", base.app), ("rollout", rollout.app), ("rubric", rubric.app), ("data", data.app)):
    app.add_typer(group, name=name)

__all__ = ["EXIT_PREEMPTED", "app", "main"]


def main() -> None:
    app()
