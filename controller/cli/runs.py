"""The run commands: the whole demo, and the HTML report of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from controller.cli.console import err, fail, job_store, load_job_file, out, quiet_libraries
from opd.vocabulary import TokenizerMismatch
from storage import jobs
from storage.db import database_url, run_home


def demo(
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all).")] = None,
) -> None:
    """Build the tiny base model and demo data, run the demo pipeline (3 specialists, then distillation)."""
    quiet_libraries()
    from controller.demo import run_demo

    out.print(f"retort demo: run home {run_home()}, job store {database_url()}", highlight=False)
    _run_to_end("demo pipeline", lambda store, **hooks: run_demo(store, num_cpus=num_cpus, **hooks))


def run(
    file: Annotated[Path, typer.Argument(help="A pipeline YAML file (kind: pipeline).")],
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all).")] = None,
) -> None:
    """Run a pipeline here to the end (a local Ray, like `retort demo`): its table, results.json and report."""
    quiet_libraries()
    from controller.demo import run_pipeline
    from controller.pipeline import Pipeline

    spec = load_job_file(file)
    if not isinstance(spec, Pipeline):
        fail(f"{file} is a {spec.kind} spec; `retort run` runs pipeline specs (a single job: `retort run-job`)")
    out.print(f"retort run {file}: run home {run_home()}, job store {database_url()}", highlight=False)
    _run_to_end(f"pipeline {spec.name}", lambda store, **hooks: run_pipeline(store, spec, num_cpus=num_cpus,
                                                                             **hooks))


def _run_to_end(what: str, start) -> None:
    store = job_store()

    def on_event(event) -> None:
        out.print(f"  job {event.job_id}: {event.what} {escape(event.detail)}", highlight=False)

    with err.status(f"{what} running") as spinner:
        def on_tick(pipeline_id: int) -> None:
            members = jobs.children(store, pipeline_id)
            spinner.update("  ".join(f"{m.name}: {m.progress or m.state}" for m in members))

        try:
            result = start(store, on_event=on_event, on_tick=on_tick)
        except TokenizerMismatch as exc:  # found when the pipeline is queued, before anything runs
            fail(f"{what}: {exc}")
    table = Table(title=f"{what} {result.pipeline_id} ({result.state}): held-out score per domain")
    for column in ("domain", "base", "SFT", "GRPO", "student"):
        table.add_column(column, justify="right")
    for domain, row in result.domains.items():
        table.add_row(domain, *(f"{row[k]:.3f}" if k in row else "–" for k in ("base", "sft", "grpo", "student")))
    out.print(table)
    for name, phases in result.judges.items():
        out.print(judge_summary(name, phases), highlight=False)
    out.print(f"wall time {result.wall_s / 60:.1f} min", highlight=False)
    out.print(f"results: {result.results_path}", highlight=False)
    out.print(f"report: {result.report_path}", highlight=False)
    if result.state != "succeeded":
        fail(f"the {what} {result.state}; see `retort status {result.pipeline_id}`")


def judge_summary(name: str, phases: dict[str, dict[str, float]]) -> str:
    """One line for a specialist that judges: its judge's accuracy and parse failures after each phase."""
    return f"judge {name}: " + ", ".join(
        f"{phase} accuracy {row['judge/accuracy']:.3f} (parse failures {row['judge/parse_failure_rate']:.0%})"
        for phase, row in phases.items() if "judge/accuracy" in row)


def report(
    run: Annotated[str, typer.Argument(help="A job id, or a pipeline/job name (its newest run).")],
    output: Annotated[Path | None, typer.Option("--out", help="Where to write the HTML (default: the run's "
                                                "directory).")] = None,
) -> None:
    """Write a self-contained HTML report with plots for a pipeline, specialist or distillation run."""
    from controller.report import find_run, write_report
    from controller.worker import job_dir, pipeline_dir

    store = job_store()
    try:
        job = find_run(store, run)
    except jobs.JobNotFound:
        fail(f"no job with id or name {run!r} in the job store (see `retort status`)")
    if output is None:
        if job.kind == "pipeline":
            output = pipeline_dir(job) / "report.html"
        else:
            parent = jobs.get(store, job.parent_id) if job.parent_id else None
            output = job_dir(job, parent) / "report.html"
    path = write_report(store, job, output)
    out.print(f"report: {path}", highlight=False)

