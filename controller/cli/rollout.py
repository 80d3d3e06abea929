"""`retort rollout`: generate completions preemptibly, resume preempted runs from their WAL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from controller.cli.console import err, fail, job_store, out, quiet_libraries, report_problems
from storage.db import run_home
from storage.specfile import SpecError, load_spec

app = typer.Typer(help="Generate completions; resume preempted rollouts.", no_args_is_help=True)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly, resume later


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
        fail(str(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command("run")
def rollout_run(config: Annotated[Path, typer.Argument(help="A rollout YAML file (kind: rollout).")]) -> None:
    """Generate completions for a prompt file into a run directory; SIGTERM stops it resumably."""
    quiet_libraries()
    from rollout import batch_run
    from rollout.config import RolloutRunSpec
    from storage.rollouts import finish_batch, record_batch

    try:
        spec = load_spec(RolloutRunSpec, config)
        rows = batch_run.read_prompts(spec.prompts)  # fail on a bad prompt file before loading a model
    except SpecError as exc:
        report_problems(exc)
        raise typer.Exit(1) from None
    except batch_run.RunError as exc:
        fail(str(exc))
    run_id = batch_run.new_run_id(spec.name)
    run_dir = Path(spec.output_dir) if spec.output_dir else run_home() / "rollouts" / run_id
    if (run_dir / "spec.json").exists():
        fail(f"{run_dir} already holds a rollout run; resume it with `retort rollout resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    out.print(f"run id: {run_id}\nrun dir: {run_dir}", highlight=False)
    store = job_store()
    record_batch(store, run_id, str(run_dir))
    try:
        engine = batch_run.build_engine(spec)
    except batch_run.EngineError as exc:
        fail(str(exc))
    service = batch_run.make_service(spec, engine, run_dir)
    path = _drive_rollout(lambda on_step: batch_run.start(spec, run_id, service, rows, on_step), service, run_id)
    finish_batch(store, run_id, num_tokens=service.tokens_generated)
    out.print(f"done: {path}", highlight=False)


@app.command("resume")
def rollout_resume(run: Annotated[str, typer.Argument(help="The run id, or its run directory.")]) -> None:
    """Resume a preempted rollout run from its write-ahead log, then finish the batch."""
    quiet_libraries()
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
        fail(str(exc))
    out.print(f"run id: {run_id}\nrun dir: {run_dir}", highlight=False)
    service = batch_run.make_service(spec, engine, run_dir)
    path = _drive_rollout(lambda on_step: batch_run.resume(spec, service, on_step), service, run_id)
    finish_batch(job_store(), run_id, num_tokens=service.tokens_generated)
    out.print(f"done: {path}", highlight=False)



@app.command("replay")
def rollout_replay(
    log: Annotated[Path, typer.Argument(help="A trajectory log (JSONL of tool calls), or a run directory with some.")],
    trajectory: Annotated[str | None, typer.Argument(help="One trajectory's id (default: every one).")] = None,
) -> None:
    """Print agent trajectories turn by turn from their log: each call, its result, exit status, time, limits."""
    from rollout.agent import TrajectoryLog, describe

    files = sorted(log.glob("**/*calls*.jsonl")) if log.is_dir() else [log]
    if not files or not all(f.is_file() for f in files):
        fail(f"{log}: no trajectory log (a *calls*.jsonl file, or a directory holding some)")
    shown = 0
    for path in files:
        try:
            records = TrajectoryLog.read(path)
        except ValueError as exc:
            fail(f"{path}: {exc}")
        ids = [trajectory] if trajectory else list(dict.fromkeys(r["trajectory"] for r in records))
        for rid in ids:
            mine = [r for r in records if r["trajectory"] == rid]
            if not mine:
                continue
            shown += 1
            out.print(f"{path.name} · trajectory {rid}: {len(mine)} tool call(s)", highlight=False)
            for line in describe(mine):
                out.print(f"  {escape(line)}", highlight=False)
    if not shown:
        fail(f"no trajectory {trajectory!r} in {log}" if trajectory else f"{log}: no tool calls logged")
