"""What runs inside a Ray worker process: one job, from its row in the job store to its results.

The controller starts `execute_job` as a Ray task (one fresh worker process per
job, so vLLM and torch state never leak between jobs). The task reads the job's
spec from the store, runs the specialist or the distillation, and keeps the
job's progress line and metrics current. It never changes the job's state: the
controller does that when the task returns or its process dies, so a state
change always comes from the one party that holds the job's lease.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from storage import jobs
from storage.db import open_store, run_dir, run_home
from storage.models import Job


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


def execute_job(db_url: str, job_id: int) -> dict[str, Any]:
    """Run one claimed job to the end; returns its held-out scores. Raises on failure."""
    store = open_store(db_url)
    job = jobs.get(store, job_id)
    pipeline = jobs.get(store, job.parent_id) if job.parent_id is not None else None
    directory = job_dir(job, pipeline)
    jobs.set_progress(store, job_id, "starting", process=this_process())
    if job.kind == "specialist":
        return _run_specialist(store, job, directory)
    if job.kind == "distillation":
        return _run_distillation(store, job, directory)
    raise ValueError(f"job {job_id} is of kind {job.kind!r}; workers run specialist and distillation jobs")


def _run_specialist(store, job: Job, directory: Path) -> dict[str, Any]:
    from specialists.config import SpecialistJob
    from specialists.job import run_specialist

    spec = SpecialistJob.model_validate(job.spec)

    def on_phase(result) -> None:
        jobs.set_progress(store, job.id, f"{result.phase} done: score {result.eval.score:.3f}")

    results = run_specialist(spec, directory, store=store, job_id=job.id, on_phase=on_phase)
    return {"run_dir": str(directory), "scores": {phase: r.eval.score for phase, r in results.items()},
            "checkpoint": results[list(results)[-1]].checkpoint}


def _run_distillation(store, job: Job, directory: Path) -> dict[str, Any]:
    from opd.config import DistillationRun
    from opd.train import Distiller

    spec = DistillationRun.model_validate(job.spec)

    def on_step(report) -> None:
        line = f"distill step {report.step}/{spec.steps} loss {report.metrics['loss']:.4f}"
        if report.scores:
            line += " " + " ".join(f"{d} {s:.2f}" for d, s in report.scores.items())
        jobs.set_progress(store, job.id, line)

    result = Distiller(spec, directory, store=store, job_id=job.id).train(on_step)
    return {"run_dir": str(result.run_dir), "table": result.table}
