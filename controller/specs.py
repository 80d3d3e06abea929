"""Read any Retort YAML file: its `kind` picks the model that validates it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from controller.pipeline import Pipeline
from grm.rubric import Rubric
from opd.config import DistillationRun
from rollout.config import RolloutRunSpec
from specialists.config import SpecialistJob
from storage.specfile import Problem, SpecError, read_yaml, validate_data

SPEC_KINDS: dict[str, type[BaseModel]] = {
    "specialist": SpecialistJob,
    "distillation": DistillationRun,
    "pipeline": Pipeline,
    "rubric": Rubric,
    "rollout": RolloutRunSpec,
}

Spec = SpecialistJob | DistillationRun | Pipeline | Rubric | RolloutRunSpec


def load_any(path: str | Path) -> Spec:
    """Load one YAML file of any kind; raises SpecError listing every problem."""
    file = str(path)
    data, marks = read_yaml(path)
    kind = data.get("kind")
    if kind not in SPEC_KINDS:
        mark = marks.get(("kind",))
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        found = "no 'kind' key" if kind is None else f"found: {kind!r}"
        expected = ", ".join(repr(k) for k in SPEC_KINDS)
        raise SpecError([Problem(file, line, col, "kind", f"expected one of {expected} ({found})")])
    return validate_data(SPEC_KINDS[kind], data, file, marks)


def load_job_spec(path: str | Path) -> SpecialistJob | DistillationRun | Pipeline:
    """Load a file that can be submitted as a job; a rubric or a dangling teacher is refused here."""
    spec = load_any(path)
    file = str(path)
    if isinstance(spec, Rubric):
        raise SpecError([Problem(file, 1, 1, "kind", "a rubric is not a job; name it in a reward's args instead")])
    if isinstance(spec, RolloutRunSpec):
        raise SpecError([Problem(file, 1, 1, "kind", "run a rollout spec with `retort rollout run FILE`")])
    if isinstance(spec, DistillationRun):
        _, marks = read_yaml(path)
        problems = []
        for i, teacher in enumerate(spec.teachers):
            if teacher.specialist is not None and teacher.checkpoint is None:
                mark = marks.get(("teachers", i, "specialist"))
                problems.append(Problem(
                    file, mark.line + 1 if mark else 0, mark.column + 1 if mark else 0,
                    f"teachers[{i}].specialist",
                    f"a standalone distillation run cannot use specialist {teacher.specialist!r}; give the "
                    "teacher a 'checkpoint' too, or put the run in a pipeline with that specialist",
                ))
        if problems:
            raise SpecError(problems)
    return spec
