"""Running one job, from its row in the job store to its results: in a Ray worker, or in the foreground.

The controller starts `execute_job` as a Ray task (one fresh worker process per
job, so vLLM and torch state never leak between jobs). The task reads the job's
spec from the store, runs the specialist or the distillation, and keeps the
job's progress line and metrics current. It never changes the job's state: the
controller does that when the task returns or its process dies, so a state
change always comes from the one party that holds the job's lease.

`run_in_foreground` is the same job body for `retort run-job` and `retort
distill`, with the controller's part done in this process: take over a job whose
holder died, claim it, renew its lease, and move it to succeeded, back to the
queue, or failed. Both paths hold the run directory's one-writer lock
(`storage.runlock`) while the job writes there.
"""

from __future__ import annotations

import _thread
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.controller import holder_is_dead, worker_name
from storage import jobs
from storage.db import Store, open_store, run_dir, run_home
from storage.models import Job, JobState
from storage.runlock import RunLock


def pipeline_dir(pipeline: Job) -> Path:
    """One directory per pipeline run, so two runs of a pipeline never share (or resume) checkpoints."""
    return run_home() / "runs" / "pipeline" / f"{pipeline.name}-{pipeline.id}"


def job_dir(job: Job, pipeline: Job | None = None) -> Path:
    """Where a job's artifacts live: inside its pipeline's directory, or its own run directory."""
    if pipeline is not None:
        return pipeline_dir(pipeline) / job.name
    return run_dir(job.kind, job.name)


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Hooks:
    """What a foreground command shows while its job runs: each specialist phase's result, each
    distillation step's report."""

    on_phase: Callable[[Any], None] | None = None
    on_step: Callable[[Any], None] | None = None


class JobCancelled(RuntimeError):
    """The job was cancelled (or taken over by a controller) while this process ran it."""


class JobInterrupted(RuntimeError):
    """Ctrl-C: the job went back to the queue and resumes from its last checkpoint when run again."""


def execute_job(db_url: str, job_id: int) -> dict[str, Any]:
    """Run one claimed job to the end; returns its held-out scores. Raises on failure (the Ray task)."""
    store = open_store(db_url)
    job = jobs.get(store, job_id)
    directory = job_directory(store, job)
    with RunLock(directory, holder=f"job {job_id} ({this_process()})"):
        return _run(store, job, directory, Hooks())


def job_directory(store: Store, job: Job) -> Path:
    """The job's run directory: inside its pipeline's directory, or its own."""
    return job_dir(job, jobs.get(store, job.parent_id) if job.parent_id is not None else None)


def run_in_foreground(store: Store, job_id: int, role: str, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run a queued job (or one whose holder died) in this process, doing what the controller does around a
    Ray task. Raises `JobCancelled` when a user cancels it meanwhile, `JobInterrupted` on Ctrl-C, `RunDirLocked`
    when another process writes in its run directory, and the job's own error when it fails."""
    job = jobs.get(store, job_id)
    if job.state == JobState.RUNNING.value and holder_is_dead(job.worker):  # its runner was killed: take over
        jobs.fail_or_retry(store, job_id, f"worker {job.worker} died", worker=job.worker)
    worker, directory = worker_name(role), job_directory(store, job)
    with RunLock(directory, holder=f"job {job_id} ({worker})"):
        jobs.claim(store, job_id, worker=worker)  # IllegalTransition: not queued (running elsewhere, final)
        lease = jobs.Lease(store, job_id, worker, on_lost=_interrupt_on_lost())  # cancel → KeyboardInterrupt
        try:
            with _lease_loss_interrupts(), lease:
                result = _run(store, jobs.get(store, job_id), directory, hooks or Hooks())
        except KeyboardInterrupt:
            if lease.lost:
                raise JobCancelled(f"job {job_id} was cancelled (or taken over) while it ran here; stopped") from None
            jobs.transition(store, job_id, JobState.QUEUED, error="interrupted in the foreground", worker=worker)
            raise JobInterrupted(f"job {job_id} interrupted: it is queued again and resumes from its last "
                                 "checkpoint when run again") from None
        except Exception as exc:
            try:
                jobs.fail_or_retry(store, job_id, f"{type(exc).__name__}: {exc}", worker=worker)
            except jobs.IllegalTransition:
                raise JobCancelled(f"job {job_id} was cancelled while it ran here") from exc
            raise
        try:
            jobs.transition(store, job_id, JobState.SUCCEEDED, worker=worker)
        except jobs.IllegalTransition:
            raise JobCancelled(f"job {job_id} was cancelled as it finished; its results are in the run "
                               "directory but the job stays cancelled") from None
    return result


# A lost lease (the job cancelled or taken over) stops the job by raising KeyboardInterrupt in the main thread.
# Not through SIGINT: `_thread.interrupt_main()` does nothing while SIGINT is ignored, as it is for everything a
# non-interactive shell starts in the background (`retort run-job 1 &` in a script), and such a run would then
# never stop. A signal of its own, with a Python handler while the job runs, works whatever SIGINT does.
LEASE_LOST = signal.SIGUSR2


def _raise_lease_lost(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("the job's lease was lost")


def _interrupt_on_lost() -> Callable[[], None]:
    if threading.current_thread() is threading.main_thread():
        return lambda: _thread.interrupt_main(LEASE_LOST)
    return _thread.interrupt_main  # signal handlers can only be set from the main thread


@contextmanager
def _lease_loss_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(LEASE_LOST, _raise_lease_lost)
    try:
        yield
    finally:
        signal.signal(LEASE_LOST, previous)


def _run(store: Store, job: Job, directory: Path, hooks: Hooks) -> dict[str, Any]:
    jobs.set_progress(store, job.id, "starting", process=this_process())
    if job.kind == "specialist":
        return _run_specialist(store, job, directory, hooks)
    if job.kind == "distillation":
        return _run_distillation(store, job, directory, hooks)
    raise ValueError(f"job {job.id} is of kind {job.kind!r}; workers run specialist and distillation jobs")


def on_ranks(resources: Any, lead: Callable[[], Any], follower: Callable[..., Any], follower_args: tuple) -> Any:
    """`lead()` in this process, as today, for a one-rank job; with `resources.workers` > 1 as rank 0 of that
    many trainer ranks, the others running `follower(*follower_args)` (controller.ranks)."""
    if resources.workers == 1:
        return lead()
    from controller import ranks

    bundle = {"CPU": resources.cpus, "GPU": resources.gpus}
    if resources.memory_gb:
        bundle["memory"] = resources.memory_gb * 2**30
    return ranks.run_ranks(resources.workers, lead, follower, follower_args, bundle=bundle)


def _run_specialist(store: Store, job: Job, directory: Path, hooks: Hooks) -> dict[str, Any]:
    from specialists.config import SpecialistJob
    from specialists.job import run_specialist

    spec = SpecialistJob.model_validate(job.spec)

    def on_phase(result) -> None:
        jobs.set_progress(store, job.id, f"{result.phase} done: score {result.eval.score:.3f}")
        if hooks.on_phase is not None:
            hooks.on_phase(result)

    lead = lambda: run_specialist(spec, directory, store=store, job_id=job.id, on_phase=on_phase)  # noqa: E731
    results = on_ranks(spec.resources, lead, run_specialist, (spec, directory))
    return {"run_dir": str(directory), "scores": {phase: r.eval.score for phase, r in results.items()},
            "checkpoint": results[list(results)[-1]].checkpoint}


def _run_distillation(store: Store, job: Job, directory: Path, hooks: Hooks) -> dict[str, Any]:
    from opd.config import DistillationRun
    from opd.train import Distiller, distill

    spec = DistillationRun.model_validate(job.spec)

    shown = {"at": 0.0}

    def on_step(report) -> None:
        # `retort status` reads this line: once a second is enough, and a store write per step is not free
        if report.scores or report.step == spec.steps or time.monotonic() - shown["at"] >= 1.0:
            line = f"distill step {report.step}/{spec.steps} loss {report.metrics['loss']:.4f}"
            if report.scores:
                line += " " + " ".join(f"{d} {s:.2f}" for d, s in report.scores.items())
            jobs.set_progress(store, job.id, line)
            shown["at"] = time.monotonic()
        if hooks.on_step is not None:
            hooks.on_step(report)

    lead = lambda: Distiller(spec, directory, store=store, job_id=job.id).train(on_step)  # noqa: E731
    result = on_ranks(spec.resources, lead, distill, (spec, directory))
    return {"run_dir": str(result.run_dir), "table": result.table}
