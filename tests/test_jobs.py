"""The job state machine, retries, and the atomic claim (several processes, one SQLite file)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
from pathlib import Path

import pytest

from storage import jobs
from storage.db import Store, open_store
from storage.models import JobState

LEGAL = {
    ("queued", "running"), ("queued", "cancelled"), ("queued", "failed"),  # failed: it can never start
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"), ("running", "queued"),
}


@pytest.mark.parametrize("current,target", list(itertools.product(JobState, JobState)))
def test_transition_table(current: JobState, target: JobState) -> None:
    if (current.value, target.value) in LEGAL:
        jobs.check_transition(7, current, target)
    else:
        with pytest.raises(jobs.IllegalTransition, match=f"job 7: cannot go from {current.value} to {target.value}"):
            jobs.check_transition(7, current, target)


def test_lifecycle_with_retries(any_store: Store) -> None:
    store = any_store
    job = jobs.submit(store, "specialist", "math", {"x": 1}, max_attempts=2)
    assert (job.state, job.attempts) == ("queued", 0)

    first = jobs.claim_next(store, "worker-a")
    assert (first.id, first.state, first.attempts, first.worker) == (job.id, "running", 1, "worker-a")
    assert jobs.claim_next(store, "worker-b") is None

    retried = jobs.fail_or_retry(store, job.id, "worker died", worker="worker-a")
    assert (retried.state, retried.worker, retried.error) == ("queued", None, "attempt 1/2: worker died")

    second = jobs.claim_next(store, "worker-b")
    assert (second.attempts, second.worker) == (2, "worker-b")
    with pytest.raises(jobs.IllegalTransition, match="no longer held by worker-a"):
        jobs.transition(store, job.id, JobState.SUCCEEDED, worker="worker-a")  # a stale worker cannot finish it

    failed = jobs.fail_or_retry(store, job.id, "out of memory", worker="worker-b")
    assert (failed.state, failed.error) == ("failed", "attempt 2/2: out of memory")
    assert failed.finished_at is not None
    with pytest.raises(jobs.IllegalTransition, match="none: failed is final"):
        jobs.transition(store, job.id, JobState.RUNNING)


def test_claim_filters_by_kind_and_order(any_store: Store) -> None:
    store = any_store
    a = jobs.submit(store, "distillation", "student", {})
    b = jobs.submit(store, "specialist", "math", {})
    c = jobs.submit(store, "specialist", "code", {})
    assert jobs.claim_next(store, "w", kinds=["specialist"]).id == b.id
    assert jobs.claim_next(store, "w").id == a.id
    assert jobs.claim_next(store, "w").id == c.id


def test_cancel_and_unknown_job(any_store: Store) -> None:
    store = any_store
    job = jobs.submit(store, "specialist", "math", {})
    assert jobs.transition(store, job.id, JobState.CANCELLED).state == "cancelled"
    assert jobs.claim_next(store, "w") is None
    with pytest.raises(jobs.JobNotFound, match="no job with id 999"):
        jobs.get(store, 999)


def test_checkpoints_and_metrics(any_store: Store) -> None:
    store = any_store
    job = jobs.submit(store, "specialist", "math", {})
    assert jobs.latest_checkpoint(store, job.id) is None
    jobs.record_checkpoint(store, job.id, "sft", 10, "/ckpt/10")
    jobs.record_checkpoint(store, job.id, "grpo", 5, "/ckpt/g5")
    jobs.record_metrics(store, job.id, "sft", 10, {"loss": 1.5, "eval/accuracy": 0.25})
    jobs.record_metrics(store, job.id, "grpo", 5, {"loss": 0.5})
    assert jobs.latest_checkpoint(store, job.id).path == "/ckpt/g5"
    assert jobs.latest_checkpoint(store, job.id, phase="sft").step == 10
    assert jobs.latest_metrics(store, job.id) == {"loss": 0.5, "eval/accuracy": 0.25}
    assert [c.phase for c in jobs.get(store, job.id).checkpoints] == ["sft", "grpo"]


def test_reopening_keeps_data_and_schema(retort_home: Path) -> None:
    first = open_store()
    job = jobs.submit(first, "specialist", "math", {"k": [1, 2]})
    first.engine.dispose()
    again = open_store()  # migrations are a no-op now
    assert jobs.get(again, job.id).spec == {"k": [1, 2]}
    assert (retort_home / "retort.db").exists()
    with again.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def _claim_until_empty(url: str, worker: str, results) -> None:  # runs in a child process
    store = open_store(url)
    claimed = []
    while (job := jobs.claim_next(store, worker)) is not None:
        claimed.append(job.id)
        jobs.transition(store, job.id, JobState.SUCCEEDED, worker=worker)
    results.put((worker, claimed))


def test_claim_is_atomic_across_processes(db_url: str) -> None:
    url = db_url
    store = open_store(url)
    ids = [jobs.submit(store, "specialist", f"job{i}", {}).id for i in range(120)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_claim_until_empty, args=(url, f"w{i}", results)) for i in range(4)]
    for w in workers:
        w.start()
    claimed = dict(results.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    every_claim = [job_id for ids_ in claimed.values() for job_id in ids_]
    assert sorted(every_claim) == ids  # every job claimed exactly once: no duplicates, none lost
    assert sum(1 for ids_ in claimed.values() if ids_) >= 2  # the workers really raced
    assert {j.state for j in jobs.list_jobs(store)} == {"succeeded"}
    assert {j.attempts for j in jobs.list_jobs(store)} == {1}


def test_claiming_one_specific_job(any_store: Store) -> None:
    first = jobs.submit(any_store, "distillation", "a", {})
    second = jobs.submit(any_store, "distillation", "b", {})
    assert jobs.claim(any_store, second.id, "cli").state == "running"
    with pytest.raises(jobs.IllegalTransition, match=f"job {second.id}: cannot claim it, it is running"):
        jobs.claim(any_store, second.id, "other")
    assert jobs.claim_next(any_store, "w").id == first.id


def test_background_writes_keep_their_order_and_report_a_failure_at_flush(store) -> None:
    from storage.db import BackgroundWrites

    job = jobs.submit(store, "distillation", "bg", {})
    writes = BackgroundWrites()
    for step in range(5):
        writes.submit(jobs.record_metrics, store, job.id, "distill", step, {"loss": float(step)})
    writes.flush()
    assert jobs.latest_metrics(store, job.id) == {"loss": 4.0}  # all five written, in order
    writes.submit(jobs.record_metrics, store, 10**9, "distill", 0, {"loss": 1.0})  # no such job: a foreign key
    writes.submit(jobs.record_metrics, store, job.id, "distill", 9, {"loss": 9.0})  # dropped after the failure
    with pytest.raises(RuntimeError, match="a job-store write failed"):
        writes.flush()
    assert jobs.latest_metrics(store, job.id) == {"loss": 4.0}
    with pytest.raises(RuntimeError):
        writes.submit(jobs.record_metrics, store, job.id, "distill", 10, {"loss": 10.0})
