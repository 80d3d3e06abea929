"""The pipeline spec: several specialists, then one distillation run over them.

A teacher may name a specialist of the same pipeline (``specialist: math``)
instead of a checkpoint; the controller fills in the checkpoint once that
specialist has succeeded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opd.config import DistillationRun
from specialists.config import SpecialistJob
from storage import jobs
from storage.db import Store
from storage.models import Job
from storage.specfile import FieldErrors, Name, StrictModel


class Pipeline(StrictModel):
    """Specialists first (side by side where resources allow), then the distillation run."""

    kind: Literal["pipeline"] = Field(description="Always 'pipeline' for this kind of file.")
    name: Name = Field(description="Pipeline name.")
    specialists: list[SpecialistJob] = Field(min_length=1, description="The specialist jobs, written inline.")
    distillation: DistillationRun = Field(description="The distillation run; teachers may name specialists.")

    @model_validator(mode="after")
    def _references_resolve(self) -> Pipeline:
        names = [s.name for s in self.specialists]
        problems: list[tuple[tuple, str]] = [
            (("specialists", i, "name"), f"specialist name {name!r} is used more than once")
            for i, name in enumerate(names) if name in names[:i]
        ]
        for i, teacher in enumerate(self.distillation.teachers):
            if teacher.specialist is not None and teacher.specialist not in names:
                problems.append((("distillation", "teachers", i, "specialist"),
                                 f"teacher {teacher.name!r} names specialist {teacher.specialist!r}, but the "
                                 f"pipeline's specialists are {names}"))
        if problems:
            raise FieldErrors(problems)
        return self


def submit_pipeline(store: Store, pipeline: Pipeline) -> tuple[Job, list[Job]]:
    """Queue a pipeline: one row for the pipeline, one per specialist, one for the distillation.

    The distillation row waits in the queue until the controller sees its specialists succeed.
    """
    spec = pipeline.model_dump(mode="json")
    parent = jobs.submit(store, "pipeline", pipeline.name, spec, max_attempts=1)
    members = [jobs.submit(store, "specialist", s.name, s.model_dump(mode="json"), max_attempts=s.max_attempts,
                           parent_id=parent.id) for s in pipeline.specialists]
    run = pipeline.distillation
    members.append(jobs.submit(store, "distillation", run.name, run.model_dump(mode="json"),
                               max_attempts=run.max_attempts, parent_id=parent.id))
    return parent, members
