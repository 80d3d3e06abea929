"""The job commands: validate and queue specs, watch and cancel jobs, run one in the foreground, run the
controller."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from controller.cli.console import err, fail, job_store, load_job_file, out, quiet_libraries, report_problems
from controller.specs import load_any
from storage import jobs
from storage.db import database_url
from storage.specfile import SpecError


def validate(files: Annotated[list[Path], typer.Argument(help="YAML files of any kind.")]) -> None:
    """Check YAML files (specialist, distillation, pipeline, rubric); exit 1 listing every problem."""
    bad = 0
    for file in files:
        try:
            spec = load_any(file)
        except SpecError as exc:
            report_problems(exc)
            bad += 1
            continue
        out.print(f"[green]✓[/] {file}: {spec.kind} {spec.name!r}", highlight=False)
    if bad:
        err.print(f"{bad} of {len(files)} file(s) have problems", highlight=False)
        raise typer.Exit(1)


def submit(file: Annotated[Path, typer.Argument(help="A specialist, distillation or pipeline YAML file.")]) -> None:
    """Validate a job file and store it as a queued job; prints the job id."""
    from controller.pipeline import Pipeline, check_tokenizers_here
    from opd.config import DistillationRun

    spec = load_job_file(file)
    if isinstance(spec, Pipeline):  # a pipeline row alone would have no members to run
        _queue_pipeline(spec)
        return
    if isinstance(spec, DistillationRun):
        try:
            check_tokenizers_here(spec)
        except ValueError as exc:
            fail(f"{file}: {exc}")
    max_attempts = getattr(spec, "max_attempts", 1)
    job = jobs.submit(job_store(), spec.kind, spec.name, spec.model_dump(mode="json"), max_attempts=max_attempts)
    out.print(f"queued {spec.kind} job {job.id} ({spec.name})", highlight=False)
    out.print(job.id)


def _jobs_table(rows: list, title: str = "jobs", last_metrics: dict[int, str] | None = None) -> Table:
    table = Table(title=title)
    columns = ["id", "kind", "name", "state", "attempts", "progress", "updated", "error"]
    for column in columns + (["last metrics"] if last_metrics is not None else []):
        table.add_column(column, overflow="fold")
    colors = {"queued": "cyan", "running": "yellow", "succeeded": "green", "failed": "red", "cancelled": "dim"}
    for job in rows:
        table.add_row(
            str(job.id), job.kind, job.name, f"[{colors.get(job.state, 'white')}]{job.state}[/]",
            f"{job.attempts}/{job.max_attempts}", job.progress or "", job.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            (job.error or "")[:60], *([last_metrics.get(job.id, "")] if last_metrics is not None else []),
        )
    return table


KEY_METRICS = ("loss", "reward", "reward_std", "eval/score", "eval/accuracy")


def status(
    job_id: Annotated[int | None, typer.Argument(help="Show this job in detail.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many jobs.")] = 50,
) -> None:
    """List jobs with their state, or show one job in detail (spec, checkpoints, metrics)."""
    store = job_store()
    if job_id is None:
        rows = jobs.list_jobs(store, limit=limit)
        if not rows:
            out.print("no jobs yet: queue one with `retort submit FILE`")
            return
        out.print(_jobs_table(rows))
        return
    try:
        job = jobs.get(store, job_id)
    except jobs.JobNotFound as exc:
        fail(str(exc))
    out.print(_jobs_table([job]))
    members = jobs.children(store, job_id)
    if members:
        last = {}
        for member in members:
            latest = jobs.latest_metrics(store, member.id)
            shown = {k: v for k, v in latest.items() if k in KEY_METRICS or k.startswith("eval/")}
            last[member.id] = "  ".join(f"{k} {v:.3g}" for k, v in list(shown.items())[:6])
        out.print(_jobs_table(members, title=f"pipeline {job.name}: members", last_metrics=last))
    if job.error:
        out.print(Panel(job.error, title="error", border_style="red"))
    out.print(Panel(Syntax(yaml.safe_dump(job.spec, sort_keys=False), "yaml"), title="spec"))
    if job.checkpoints:
        table = Table(title="checkpoints")
        for column in ("phase", "step", "path"):
            table.add_column(column)
        for ckpt in job.checkpoints:
            table.add_row(ckpt.phase, str(ckpt.step), ckpt.path)
        out.print(table)
    latest = jobs.latest_metrics(store, job_id)
    if latest:
        out.print(Panel(json.dumps(latest, indent=2), title="latest metrics"))


def run_job(job_id: Annotated[int, typer.Argument(help="A queued specialist job.")]) -> None:
    """Run a specialist job in the foreground (base, SFT, GRPO, a score after each); again after a kill, it resumes."""
    from controller.worker import Hooks, job_directory

    quiet_libraries()
    store = job_store()
    try:
        job = jobs.get(store, job_id)
    except jobs.JobNotFound as exc:
        fail(str(exc))
    if job.kind != "specialist":
        fail(f"job {job_id} is a {job.kind} job; `retort run-job` runs specialist jobs "
             "(run distillation with `retort distill FILE`)")
    out.print(f"specialist job {job_id} ({job.spec['domain']}): {job_directory(store, job)}", highlight=False)
    table = Table(title=f"specialist {job.name}: held-out {job.spec['domain']}")
    for column in ("phase", "score", "accuracy", "checkpoint"):
        table.add_column(column)
    with err.status("training") as status:
        def on_phase(result) -> None:
            status.update(f"{result.phase} done: score {result.eval.score:.3f}")
            table.add_row(result.phase, f"{result.eval.score:.3f}", f"{result.eval.accuracy:.3f}", result.checkpoint)

        _run_here(store, job_id, "run-job", Hooks(on_phase=on_phase))
    out.print(table)


EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


def _run_here(store, job_id: int, role: str, hooks) -> dict:
    """The job through the one foreground runner (`controller.worker.run_in_foreground`), its refusals and a
    user's mistakes as one-line errors."""
    from controller.worker import JobCancelled, JobInterrupted, run_in_foreground
    from storage.runlock import RunDirLocked

    try:
        return run_in_foreground(store, job_id, role, hooks)
    except (jobs.IllegalTransition, RunDirLocked, JobCancelled) as exc:
        fail(str(exc))
    except JobInterrupted as exc:
        err.print(f"[yellow]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (FileNotFoundError, ValueError, KeyError) as exc:  # a missing file or bad data the job found
        fail(str(exc))


def cancel(job_id: Annotated[int, typer.Argument(help="The job to cancel.")]) -> None:
    """Cancel a queued or running job."""
    store = job_store()
    try:
        members = jobs.children(store, job_id)
        for member in members:  # a pipeline: its unfinished members first, so none starts meanwhile
            if member.state not in {s.value for s in jobs.FINAL_STATES}:
                jobs.transition(store, member.id, jobs.JobState.CANCELLED)
        job = jobs.transition(store, job_id, jobs.JobState.CANCELLED)
    except (jobs.JobNotFound, jobs.IllegalTransition) as exc:
        fail(str(exc))
    out.print(f"job {job.id} ({job.name}) cancelled"
              + (f" with its {len(members)} member job(s)" if members else ""), highlight=False)
    out.print("a running job stops within a few seconds, when its controller or foreground command renews its lease",
              highlight=False)


def pipeline(file: Annotated[Path, typer.Argument(help="A pipeline YAML file (kind: pipeline).")]) -> None:
    """Queue a pipeline: its specialists, then its distillation over them; `retort controller` runs it."""
    from controller.pipeline import Pipeline

    spec = load_job_file(file)
    if not isinstance(spec, Pipeline):
        fail(f"{file} is a {spec.kind} spec; `retort pipeline` queues pipeline specs (use `retort submit`)")
    _queue_pipeline(spec)


def _queue_pipeline(spec) -> None:
    from controller.pipeline import submit_pipeline

    try:
        parent, members = submit_pipeline(job_store(), spec)
    except ValueError as exc:
        fail(str(exc))
    out.print(f"queued pipeline {parent.id} ({spec.name}): "
              + ", ".join(f"{m.kind} {m.name} = job {m.id}" for m in members), highlight=False)
    out.print(parent.id)


def run_controller(
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray (default: all); "
                                                 "ignored when RAY_ADDRESS joins a cluster.")] = None,
    lease: Annotated[float, typer.Option(min=5, help="Seconds without a heartbeat before a running job "
                                         "is recovered from a dead controller.")] = 30.0,
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Exit once nothing is queued or running.")] = False,
) -> None:
    """Run queued jobs on Ray until stopped (Ctrl-C); RAY_ADDRESS joins a cluster, else a local Ray starts."""
    from controller.controller import Controller

    quiet_libraries()
    store = job_store()
    colors = {"launched": "cyan", "succeeded": "green", "failed": "red", "retried": "yellow",
              "recovered": "yellow", "cancelled": "dim", "running": "cyan"}

    def on_event(event) -> None:
        color = colors.get(event.what, "white")
        out.print(f"job {event.job_id}: [{color}]{event.what}[/] {escape(event.detail)}", highlight=False)

    ctl = Controller(store, database_url(), lease_s=lease, on_event=on_event)
    ctl.connect(num_cpus=num_cpus)
    out.print(f"controller {ctl.worker} on {database_url()}", highlight=False)

    def idle() -> bool:
        return until_idle and not ctl.running and not jobs.list_jobs(
            store, states=[jobs.JobState.QUEUED, jobs.JobState.RUNNING], limit=1)

    try:
        ctl.run(until=idle)
    except KeyboardInterrupt:
        ctl.shutdown()
        out.print("controller stopped; its running jobs went back to the queue")


def distill(
    file: Annotated[Path, typer.Argument(help="A distillation YAML file (kind: distillation).")],
    queue: Annotated[bool, typer.Option("--queue", help="Queue it for `retort controller` instead.")] = False,
) -> None:
    """Run on-policy distillation in the foreground, or --queue it; the same file again resumes its job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from controller.worker import Hooks, job_directory
    from opd.config import DistillationRun

    quiet_libraries()
    spec = load_job_file(file)
    if not isinstance(spec, DistillationRun):
        fail(f"{file} is a {spec.kind} spec; `retort distill` runs distillation specs (kind: distillation)")
    store = job_store()
    job = _distillation_job(store, spec)
    if queue:
        out.print(f"queued distillation job {job.id} ({spec.name}); `retort controller` runs it", highlight=False)
        return
    out.print(f"distillation job {job.id}: {job_directory(store, job)}", highlight=False)
    with Progress(TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("distill", total=spec.steps, info="setting up")

        def on_step(report) -> None:
            info = f"loss {report.metrics['loss']:.4f}"
            if report.scores:
                info += "  " + " ".join(f"{d} {s:.2f}" for d, s in report.scores.items())
            progress.update(task, completed=report.step, info=info)

        result = _run_here(store, job.id, "distill", Hooks(on_step=on_step))
    table = Table(title=f"distillation {spec.name}: held-out score per domain")
    for column in ("domain", "teacher", "student before", "student after"):
        table.add_column(column)
    for domain, row in result["table"].items():
        table.add_row(domain, f"{row['teacher']:.3f}", f"{row['before']:.3f}", f"{row['after']:.3f}")
    out.print(table)
    out.print(f"results: {Path(result['run_dir']) / 'results.json'}", highlight=False)


def _distillation_job(store, spec):
    """The unfinished job of this run, if there is one (run again after a kill, it resumes), else a new one.

    Jobs of one name share a run directory, so an unfinished one with another spec is refused: two jobs
    writing one directory would mix their checkpoints."""
    wanted = spec.model_dump(mode="json")
    existing = jobs.find_unfinished(store, "distillation", spec.name)
    if existing is None:
        return jobs.submit(store, "distillation", spec.name, wanted, max_attempts=spec.max_attempts)
    if existing.spec != wanted:
        fail(f"distillation job {existing.id} ({spec.name!r}) is {existing.state} with another spec, and runs of "
             f"one name share a run directory: cancel it (`retort cancel {existing.id}`) or rename this run")
    out.print(f"resuming distillation job {existing.id} ({existing.state}, attempt {existing.attempts} of "
              f"{existing.max_attempts})", highlight=False)
    return existing
