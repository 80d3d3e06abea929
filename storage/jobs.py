"""The job state machine and the job store's operations.

    queued ──claim──▶ running ──▶ succeeded
       │                 │──────▶ failed     (error stored; past max_attempts)
       │                 │──────▶ queued     (retry: attempts < max_attempts)
       ├──────────────▶ cancelled ◀──────────┘
       └──────────────▶ failed               (it can never start: a pipeline dependency failed,
                                              or it needs more than the whole cluster has)

A running job's holder renews its lease (`heartbeat`); a job whose lease ran out
is recovered by a controller (`expired`), so a dead holder never strands it.

Every state change is a compare-and-set (``UPDATE … WHERE id = ? AND state = ?``)
in its own short transaction, so two workers or two controllers racing for the
same job can never both win: the loser sees zero rows updated. Claiming is one
``UPDATE … WHERE id = (SELECT … LIMIT 1 [FOR UPDATE SKIP LOCKED]) AND state =
'queued'`` statement: atomic under SQLite's write lock and PostgreSQL's row locks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, update

from storage.db import Store
from storage.models import Checkpoint, Job, JobState, Metric, utcnow

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),  # failed: cannot start
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
FINAL_STATES = frozenset(s for s, targets in TRANSITIONS.items() if not targets)


class JobNotFound(LookupError):
    def __init__(self, job_id: int):
        super().__init__(f"no job with id {job_id} in the job store (see `retort status` for the list)")


class IllegalTransition(RuntimeError):
    """A state change the state machine forbids, or one that lost a race to another worker."""


def check_transition(job_id: int, current: JobState, target: JobState) -> None:
    """Raise IllegalTransition unless `current → target` is a legal move."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or f"none: {current.value} is final"
        raise IllegalTransition(
            f"job {job_id}: cannot go from {current.value} to {target.value} (allowed from {current.value}: {allowed})"
        )


def submit(
    store: Store,
    kind: str,
    name: str,
    spec: Mapping[str, Any],
    *,
    max_attempts: int = 3,
    parent_id: int | None = None,
) -> Job:
    """Store a new queued job and return it."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    with store.session() as session, session.begin():
        job = Job(kind=kind, name=name, spec=dict(spec), max_attempts=max_attempts, parent_id=parent_id,
                  state=JobState.QUEUED.value, attempts=0)
        session.add(job)
    return job


def get(store: Store, job_id: int) -> Job:
    """One job with its checkpoints and metrics loaded."""
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        _ = job.checkpoints, job.metrics  # load now; the session closes below
        return job


def list_jobs(store: Store, *, states: Iterable[JobState] | None = None, limit: int | None = None) -> list[Job]:
    """Jobs, newest first."""
    query = select(Job).order_by(Job.id.desc())
    if states is not None:
        query = query.where(Job.state.in_([s.value for s in states]))
    if limit is not None:
        query = query.limit(limit)
    with store.session() as session:
        return list(session.scalars(query))


def claim_next(store: Store, worker: str, kinds: Iterable[str] | None = None) -> Job | None:
    """Atomically move the oldest queued job (of `kinds`, if given) to running for `worker`.

    Returns the claimed job, or None when nothing is queued. Safe to call from
    many processes at once: each queued job is handed to exactly one caller.
    """
    candidate = select(Job.id).where(Job.state == JobState.QUEUED.value)
    if kinds is not None:
        candidate = candidate.where(Job.kind.in_(list(kinds)))
    candidate = candidate.order_by(Job.id).limit(1).with_for_update(skip_locked=True).scalar_subquery()
    now = utcnow()
    claim = (
        update(Job)
        .where(Job.id == candidate, Job.state == JobState.QUEUED.value)
        .values(state=JobState.RUNNING.value, worker=worker, attempts=Job.attempts + 1,
                started_at=now, updated_at=now, heartbeat_at=now, finished_at=None, progress=None)
        .returning(Job.id)
    )
    while True:
        with store.session() as session, session.begin():
            job_id = session.execute(claim).scalar_one_or_none()
            if job_id is not None:
                return session.get(Job, job_id)
            # Nothing claimed: either the queue is empty, or (PostgreSQL, READ COMMITTED)
            # another worker took our candidate between the subquery and the update.
            remaining = select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED.value)
            if kinds is not None:
                remaining = remaining.where(Job.kind.in_(list(kinds)))
            if session.execute(remaining).scalar_one() == 0:
                return None


def claim(store: Store, job_id: int, worker: str) -> Job:
    """Move one specific queued job to running for `worker` (a foreground run); atomic like claim_next."""
    now = utcnow()
    cas = (update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
           .values(state=JobState.RUNNING.value, worker=worker, attempts=Job.attempts + 1, started_at=now,
                   updated_at=now, heartbeat_at=now, finished_at=None, progress=None))
    with store.session() as session, session.begin():
        changed = session.execute(cas).rowcount
    if changed != 1:
        job = get(store, job_id)
        held = f", held by {job.worker}" if job.state == JobState.RUNNING.value and job.worker else ""
        raise IllegalTransition(f"job {job_id}: cannot claim it, it is {job.state}{held} (not queued)")
    return get(store, job_id)


def transition(
    store: Store,
    job_id: int,
    target: JobState,
    *,
    error: str | None = None,
    worker: str | None = None,
) -> Job:
    """Move a job to `target` if the state machine allows it; compare-and-set against races.

    With `worker`, the move only succeeds while that worker still holds the job.
    """
    current = JobState(get(store, job_id).state)
    check_transition(job_id, current, target)
    now = utcnow()
    values: dict[str, Any] = {"state": target.value, "updated_at": now}
    if error is not None:
        values["error"] = error
    if target in FINAL_STATES:
        values["finished_at"] = now
    if target in FINAL_STATES or target is JobState.QUEUED:
        values.update(worker=None, process=None)
    cas = update(Job).where(Job.id == job_id, Job.state == current.value)
    if worker is not None:
        cas = cas.where(Job.worker == worker)
    with store.session() as session, session.begin():
        changed = session.execute(cas.values(**values)).rowcount
    if changed != 1:
        now_state = get(store, job_id).state
        raise IllegalTransition(
            f"job {job_id}: lost a race moving {current.value} → {target.value}; it is now {now_state}"
            + (f" (or no longer held by {worker})" if worker else "")
        )
    return get(store, job_id)


def fail_or_retry(store: Store, job_id: int, error: str, *, worker: str | None = None) -> Job:
    """A running job's attempt failed: requeue it while attempts remain, else mark it failed."""
    job = get(store, job_id)
    target = JobState.QUEUED if job.attempts < job.max_attempts else JobState.FAILED
    message = f"attempt {job.attempts}/{job.max_attempts}: {error}"
    return transition(store, job_id, target, error=message, worker=worker)


def heartbeat(store: Store, job_id: int, worker: str) -> bool:
    """Renew the lease of a running job held by `worker`; False when it is no longer theirs to run
    (cancelled, or recovered by another controller), so the caller must stop its worker."""
    renew = (update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.worker == worker)
             .values(heartbeat_at=utcnow()))
    with store.session() as session, session.begin():
        return session.execute(renew).rowcount == 1


class Lease:
    """Keep renewing a job's lease from a background thread while a foreground command runs it.

    A renewal that fails means the job is no longer this worker's to run (cancelled, or recovered by a
    controller): `lost` turns true and `on_lost` is called, once, from the lease's thread."""

    def __init__(self, store: Store, job_id: int, worker: str, every_s: float = 5.0,
                 on_lost: Callable[[], None] | None = None):
        self.store, self.job_id, self.worker, self.every_s = store, job_id, worker, every_s
        self.on_lost = on_lost
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{job_id}")

    def _renew(self) -> None:
        while not self._stop.wait(self.every_s):
            if not heartbeat(self.store, self.job_id, self.worker):
                self.lost = True
                if self.on_lost is not None:
                    self.on_lost()
                return

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def find_unfinished(store: Store, kind: str, name: str) -> Job | None:
    """The newest job of `kind` and `name` outside any pipeline that has not reached a final state."""
    query = (select(Job).where(Job.kind == kind, Job.name == name, Job.parent_id.is_(None),
                               Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]))
             .order_by(Job.id.desc()).limit(1))
    with store.session() as session:
        return session.scalars(query).first()


def update_spec(store: Store, job_id: int, spec: Mapping[str, Any]) -> None:
    """Replace a job's stored spec (the controller fills in a pipeline's teacher checkpoints)."""
    with store.session() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(spec=dict(spec)))


def expired(store: Store, lease_s: float, *, exclude_worker: str | None = None) -> list[Job]:
    """Running jobs whose lease ran out: their controller died without finishing or requeueing them."""
    cutoff = utcnow() - timedelta(seconds=lease_s)
    query = select(Job).where(Job.state == JobState.RUNNING.value, Job.heartbeat_at < cutoff)
    if exclude_worker is not None:
        query = query.where(Job.worker != exclude_worker)
    with store.session() as session:
        return list(session.scalars(query.order_by(Job.id)))


def set_progress(store: Store, job_id: int, progress: str | None = None, *, process: str | None = None) -> None:
    """What a running job's worker reports for `retort status`: a progress line, its own process."""
    values: dict[str, Any] = {}
    if progress is not None:
        values["progress"] = progress[:128]
    if process is not None:
        values["process"] = process[:128]
    if values:
        with store.session() as session, session.begin():
            session.execute(update(Job).where(Job.id == job_id).values(**values))


def children(store: Store, parent_id: int) -> list[Job]:
    """The jobs of a pipeline, oldest first."""
    with store.session() as session:
        return list(session.scalars(select(Job).where(Job.parent_id == parent_id).order_by(Job.id)))


def record_checkpoint(store: Store, job_id: int, phase: str, step: int, path: str) -> Checkpoint:
    with store.session() as session, session.begin():
        checkpoint = Checkpoint(job_id=job_id, phase=phase, step=step, path=path)
        session.add(checkpoint)
    return checkpoint


def latest_checkpoint(store: Store, job_id: int, phase: str | None = None) -> Checkpoint | None:
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if phase is not None:
        query = query.where(Checkpoint.phase == phase)
    with store.session() as session:
        return session.scalars(query.order_by(Checkpoint.id.desc()).limit(1)).first()


def record_metrics(store: Store, job_id: int, phase: str, step: int, values: Mapping[str, float]) -> None:
    """Store several metrics of one step in one transaction (one executemany: a distillation step logs about 20,
    and building an ORM object for each cost more than the insert)."""
    if not values:
        return
    now = utcnow()
    with store.session() as session, session.begin():
        session.execute(insert(Metric), [{"job_id": job_id, "phase": phase, "step": step, "name": name,
                                          "value": float(value), "created_at": now}
                                         for name, value in values.items()])


def latest_metrics(store: Store, job_id: int) -> dict[str, float]:
    """The most recent value of each metric of a job."""
    with store.session() as session:
        rows = session.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.id))
        return {row.name: row.value for row in rows}
