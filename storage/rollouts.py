"""Rollout batches in the job store: where each run's WAL and results live, and how far it got."""

from __future__ import annotations

from sqlalchemy import select, update

from storage.db import Store
from storage.models import RolloutBatch, utcnow


def record_batch(store: Store, run_id: str, path: str, *, job_id: int | None = None, policy_version: int = 0,
                 num_rollouts: int = 0) -> RolloutBatch:
    with store.session() as session, session.begin():
        row = RolloutBatch(run_id=run_id, path=path, job_id=job_id, policy_version=policy_version,
                           num_rollouts=num_rollouts, state="running")
        session.add(row)
    return row


def record_finished_batch(store: Store, run_id: str, path: str, *, job_id: int | None = None,
                          policy_version: int = 0, num_rollouts: int = 0, num_tokens: int = 0) -> None:
    """A batch generated to the end in one call: its row written once, finished (one transaction, not two)."""
    with store.session() as session, session.begin():
        session.add(RolloutBatch(run_id=run_id, path=path, job_id=job_id, policy_version=policy_version,
                                 num_rollouts=num_rollouts, num_tokens=num_tokens, state="finished",
                                 finished_at=utcnow()))


def finish_batch(store: Store, run_id: str, *, num_tokens: int) -> None:
    with store.session() as session, session.begin():
        session.execute(update(RolloutBatch).where(RolloutBatch.run_id == run_id)
                        .values(state="finished", num_tokens=num_tokens, finished_at=utcnow()))


def find_batch(store: Store, run_id: str) -> RolloutBatch | None:
    with store.session() as session:
        return session.scalars(select(RolloutBatch).where(RolloutBatch.run_id == run_id)).first()
