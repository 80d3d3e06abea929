"""A pipeline composed of existing files, and the cross-reference mistakes a user makes first, each at its line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.pipeline import Pipeline
from controller.specs import load_any
from storage.specfile import SpecError, load_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _problems(path: Path) -> list:
    with pytest.raises(SpecError) as caught:
        load_any(path)
    return caught.value.problems


def test_the_demo_pipeline_is_a_file_of_includes(retort_home: Path) -> None:
    pipeline = load_spec(Pipeline, CONFIGS / "demo" / "pipeline.yaml")
    assert [s.name for s in pipeline.specialists] == ["math", "code", "instruct"]
    from specialists.config import SpecialistJob

    for spec in pipeline.specialists:  # the same jobs as the files submitted alone
        assert spec == load_spec(SpecialistJob, CONFIGS / "demo" / "specialists" / f"{spec.name}.yaml")
    assert [t.specialist for t in pipeline.distillation.teachers] == ["math", "code", "instruct"]
    assert len((CONFIGS / "demo" / "pipeline.yaml").read_text().splitlines()) < 25


def test_a_broken_included_file_is_reported_with_its_own_path_and_line(tmp_path: Path, retort_home: Path) -> None:
    shutil.copytree(CONFIGS / "demo", tmp_path / "demo")
    shutil.copytree(CONFIGS / "rubrics", tmp_path / "rubrics")
    math = tmp_path / "demo" / "specialists" / "math.yaml"
    lines = math.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if "learning_rate: 3.0e-3" in line)
    lines[number] = lines[number].replace("3.0e-3", "fast")
    math.write_text("\n".join(lines) + "\n")
    (tmp_path / "demo" / "pipeline.yaml").write_text(
        (tmp_path / "demo" / "pipeline.yaml").read_text().replace("specialists/code.yaml", "specialists/cod.yaml"))
    problems = _problems(tmp_path / "demo" / "pipeline.yaml")
    located = {(p.file, p.line, p.path) for p in problems}
    assert (str(math), number + 1, "sft.learning_rate") in located
    assert any(p.file.endswith("specialists/cod.yaml") and "no such file" in p.message for p in problems)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "demo" / "pipeline.yaml")])
    assert result.exit_code == 1 and f"{math}:{number + 1}" in result.output


def test_duplicate_criterion_ids_are_errors_at_the_line(tmp_path: Path) -> None:
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text("""kind: rubric
name: twice
version: 1
criteria:
  - {id: short, kind: max_length, description: Short., max_chars: 10}
  - {id: short, kind: contains, description: Says hi., text: hi}
""")
    [problem] = _problems(rubric)
    assert (problem.line, problem.path) == (6, "criteria[1].id") and "already used" in problem.message


def test_teacher_mistakes_are_errors_at_the_line(tmp_path: Path) -> None:
    run = tmp_path / "distill.yaml"
    run.write_text("""kind: distillation
name: mistakes
student: {init: ./base}
teachers:
  - {index: 0, name: math, checkpoint: ./math}
  - {index: 0, name: math, checkpoint: ./code}
mixture:
  - {domain: math, prompts: math.jsonl, teacher: 0}
  - {domain: code, prompts: code.jsonl, teacher: 3}
steps: 10
""")
    where = {(p.line, p.path): p.message for p in _problems(run)}
    assert "used by more than one teacher" in where[(6, "teachers[1].index")]
    assert "used more than once" in where[(6, "teachers[1].name")]
    assert "names teacher 3" in where[(9, "mixture[1].teacher")]
