"""The pipeline spec: several specialists, then one distillation run over them.

A teacher may name a specialist of the same pipeline (``specialist: math``)
instead of a checkpoint; the controller fills in the checkpoint once that
specialist has succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from opd.config import DistillationRun
from opd.vocabulary import check_tokenizers
from specialists.config import SpecialistJob
from storage import jobs
from storage.db import Store
from storage.models import Job
from storage.specfile import FieldErrors, Name, Problem, SpecError, StrictModel, load_spec, resolve_path


class Pipeline(StrictModel):
    """Specialists first (side by side where resources allow), then the distillation run."""

    kind: Literal["pipeline"] = Field(description="Always 'pipeline' for this kind of file.")
    name: Name = Field(description="Pipeline name.")
    specialists: list[SpecialistJob] = Field(min_length=1, description="The specialist jobs: each written inline, or "
                                             "the path of a specialist YAML file (relative to this file).")
    distillation: DistillationRun = Field(description="The distillation run, inline or the path of a distillation "
                                          "YAML file; its teachers may name specialists.")

    @model_validator(mode="before")
    @classmethod
    def _include_files(cls, data: Any, info: ValidationInfo) -> Any:
        """Specialist and distillation files named by path are read and validated on their own, so a mistake in
        one is reported with that file's name and line."""
        if not isinstance(data, dict):
            return data
        base_dir = (info.context or {}).get("base_dir")
        problems: list[Problem] = []

        def include(entry: Any, model: type) -> Any:
            if not isinstance(entry, str):
                return entry
            try:
                return load_spec(model, resolve_path(entry, base_dir)).model_dump(mode="json")
            except SpecError as exc:
                problems.extend(exc.problems)
                return entry

        data = dict(data)
        if isinstance(data.get("specialists"), list):
            data["specialists"] = [include(entry, SpecialistJob) for entry in data["specialists"]]
        data["distillation"] = include(data.get("distillation"), DistillationRun)
        if problems:
            raise SpecError(problems)
        return data

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
        problems += self._scored_alike()
        if problems:
            raise FieldErrors(problems)
        return self

    def _scored_alike(self) -> list[tuple[tuple, str]]:
        """A domain's student and its teacher specialist are scored on the same prompts, with the same answer
        budget and rewards: the table's student-to-teacher ratios mean nothing otherwise."""
        specialists = {s.name: s for s in self.specialists}
        teachers = {t.index: t for t in self.distillation.teachers}
        problems: list[tuple[tuple, str]] = []
        for i, entry in enumerate(self.distillation.mixture):
            teacher = teachers.get(entry.teacher)
            specialist = specialists.get(teacher.specialist) if teacher and teacher.specialist else None
            if specialist is None or entry.eval_prompts is None:
                continue
            where = ("distillation", "mixture", i)
            whose = f"domain {entry.domain!r} and its teacher {specialist.name!r}"
            if entry.eval_prompts != specialist.datasets.eval:
                problems.append(((*where, "eval_prompts"), f"{whose} are scored on different held-out prompts "
                                 f"({entry.eval_prompts} and {specialist.datasets.eval}); give both the same file"))
            budget, teacher_budget = (e.model_dump(exclude={"rewards"}) for e in (entry.eval, specialist.eval))
            if budget != teacher_budget:  # the rewards are compared as they take effect, below
                problems.append(((*where, "eval"), f"{whose} are scored with different settings "
                                 f"({budget} and {teacher_budget}); give the mixture entry the specialist's `eval`"))
            if (entry.eval.rewards or entry.rewards) != (specialist.eval.rewards or specialist.rewards):
                problems.append(((*where, "rewards"), f"{whose} are scored by different rewards; give the "
                                 "mixture entry the specialist's `rewards` (or both the same `eval.rewards`)"))
            if (entry.tools, entry.agent) != (specialist.tools, specialist.agent):
                problems.append(((*where, "tools"), f"{whose} answer with different tools or turns; give the "
                                 "mixture entry the specialist's `tools` and `agent`"))
        if not self.distillation.generation.chat_template:
            problems.append((("distillation", "generation", "chat_template"),
                             "specialists answer in their chat template; the student must too (chat_template: true) "
                             "to be scored like them"))
        return problems


def check_tokenizers_here(run: DistillationRun, specialists: Sequence[SpecialistJob] = ()) -> None:
    """Refuse, before anything is queued, a distillation whose student and teachers have different tokenizers.

    A teacher that a pipeline's specialist will produce has its base model's tokenizer. Checkpoints that are
    not local directories (hub ids, URLs) are checked when the run starts (`opd.train`)."""
    by_name = {s.name: s for s in specialists}
    teachers = {t.name: by_name[t.specialist].base_model if t.specialist in by_name else t.checkpoint
                for t in run.teachers if t.checkpoint or t.specialist in by_name}
    local = {name: path for name, path in teachers.items() if Path(path, "config.json").exists()}
    if local and Path(run.student.init, "config.json").exists():
        check_tokenizers(run.student.init, local)


def submit_pipeline(store: Store, pipeline: Pipeline) -> tuple[Job, list[Job]]:
    """Queue a pipeline: one row for the pipeline, one per specialist, one for the distillation.

    The distillation row waits in the queue until the controller sees its specialists succeed. Raises
    ValueError, queueing nothing, when the student's and the teachers' tokenizers differ.
    """
    check_tokenizers_here(pipeline.distillation, pipeline.specialists)
    spec = pipeline.model_dump(mode="json")
    parent = jobs.submit(store, "pipeline", pipeline.name, spec, max_attempts=1)
    members = [jobs.submit(store, "specialist", s.name, s.model_dump(mode="json"), max_attempts=s.max_attempts,
                           parent_id=parent.id) for s in pipeline.specialists]
    run = pipeline.distillation
    members.append(jobs.submit(store, "distillation", run.name, run.model_dump(mode="json"),
                               max_attempts=run.max_attempts, parent_id=parent.id))
    return parent, members
