"""The job store's tables: jobs, checkpoints, metrics and rollout batches.

Every specialist job and distillation run is a `Job` row whose `spec` column holds
the validated config as JSON, so a run can be listed, compared, resumed and
reported from the database alone. Schema changes go through Alembic
(`storage/migrations`), never `create_all`, so an old database upgrades in place.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobState(enum.StrEnum):
    """Where a job is in its life; legal moves are in `storage.jobs.TRANSITIONS`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # specialist | distillation | pipeline
    name: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # runs started, the current one included
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)  # who holds it while running
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)  # its pipeline
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)  # renewed while its worker lives
    progress: Mapped[str | None] = mapped_column(String(128), nullable=True)  # e.g. "sft 120/375"
    process: Mapped[str | None] = mapped_column(String(128), nullable=True)  # "host:pid" of the worker process

    checkpoints: Mapped[list[Checkpoint]] = relationship(back_populates="job", order_by="Checkpoint.id")
    metrics: Mapped[list[Metric]] = relationship(back_populates="job", order_by="Metric.id")

    __table_args__ = (Index("ix_jobs_state_id", "state", "id"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    phase: Mapped[str] = mapped_column(String(32))  # sft | grpo | distill | ...
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # local path or fsspec URL
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="checkpoints")


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    phase: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))  # e.g. "loss", "reward/mean", "eval/math/accuracy"
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="metrics")

    __table_args__ = (Index("ix_metrics_job_name_step", "job_id", "name", "step"),)


class RolloutBatch(Base):
    """One batch of generations: where its WAL and results live, and how much it produced."""

    __tablename__ = "rollout_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True, nullable=True)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    policy_version: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="running")  # running | finished
    num_rollouts: Mapped[int] = mapped_column(Integer, default=0)
    num_tokens: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
