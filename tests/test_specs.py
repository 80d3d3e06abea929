"""Every shipped config loads; broken copies fail with file:line:field messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controller.pipeline import Pipeline
from controller.specs import load_any, load_job_spec
from grm.rubric import RegexCriterion, Rubric
from opd.config import DistillationRun
from specialists.config import SpecialistJob
from storage.specfile import SpecError, load_spec
from tests.conftest import REPO

SHIPPED = sorted(REPO.glob("configs/**/*.yaml"))


def test_configs_are_shipped() -> None:
    kinds = {load_any(p).kind for p in SHIPPED}
    assert kinds == {"specialist", "distillation", "pipeline", "rubric", "rollout"}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_config_validates(path: Path, retort_home: Path) -> None:
    spec = load_any(path)
    assert spec.name


def broken(tmp_path: Path, shipped: str, old: str, new: str) -> Path:
    """A copy of a shipped config with one edit; the edit must apply."""
    text = (REPO / shipped).read_text()
    assert old in text, f"{old!r} not in {shipped}"
    path = tmp_path / Path(shipped).name
    path.write_text(text.replace(old, new, 1))
    return path


def problems_of(path: Path, loader=load_any) -> list[str]:
    with pytest.raises(SpecError) as info:
        loader(path)
    return [str(p) for p in info.value.problems]


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_unknown_key_names_file_line_and_path(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/specialists/math.yaml", "  num_generations: 8", "  num_generatoins: 8")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{line_of(path, 'num_generatoins')}:3: grpo.num_generatoins: unknown key")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/specialists/math.yaml", "learning_rate: 3.0e-3", "learning_rate: fast")
    text = path.read_text().replace("  - name: math\n", "  - name: math\n    wieght: 2\n").replace("domain: math\n", "")
    path.write_text(text)
    problems = problems_of(path)
    assert len(problems) == 3
    assert any(f":{line_of(path, 'fast')}:3: sft.learning_rate: " in p and "found: 'fast'" in p for p in problems)
    assert any(f":{line_of(path, 'wieght')}:5: rewards[0].wieght: unknown key" in p for p in problems)
    assert any("domain: required key is missing" in p for p in problems)


def test_cross_field_rule_says_how_to_fix(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/specialists/code.yaml", "num_generations: 8", "num_generations: 1")
    [problem] = problems_of(path)
    assert f":{line_of(path, 'num_generations')}:3: grpo.num_generations: GRPO needs at least 2 generations" in (
        problem
    )
    assert problem.endswith("Set num_generations: 2 or more.")


def test_wrong_type_in_a_list_item(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/rubrics/instruct.yaml", "    max_chars: 200", "    max_chars: many")
    [problem] = problems_of(path)
    assert f":{line_of(path, 'max_chars')}:5: criteria[2].max_chars: " in problem
    assert "found: 'many'" in problem


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/specialists/math.yaml", "seed: 0\n", "seed: 0\nseed: 1\n")
    [problem] = problems_of(path)
    assert f":{line_of(path, 'seed: 1')}:1: seed: duplicate key (first given on line {line_of(path, 'seed: 0')})" in (
        problem
    )


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/distill.yaml", "eval_every: 180", "eval_every: [180")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:") and "invalid YAML" in problem


def test_unknown_kind_and_missing_file(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/distill.yaml", "kind: distillation", "kind: distilation")
    [problem] = problems_of(path)
    assert f"{path}:{line_of(path, 'kind:')}:1: kind: expected one of" in problem and "'distilation'" in problem
    [missing] = problems_of(tmp_path / "nope.yaml")
    assert missing == f"{tmp_path / 'nope.yaml'}: no such file"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert "empty" in problems_of(empty)[0]


def test_rubric_rules(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/rubrics/instruct.yaml", "id: short", "id: no_preamble")
    [problem] = problems_of(path)
    second = [i for i, line in enumerate(path.read_text().splitlines(), 1) if "id: no_preamble" in line][1]
    assert f":{second}:5: criteria[2].id: criterion id 'no_preamble' is already used by criteria[1]" in problem
    path = broken(tmp_path, "configs/rubrics/instruct.yaml", r"pattern: '^\s*(sure", r"pattern: '^\s*((sure")
    [problem] = problems_of(path)
    assert f":{line_of(path, 'pattern:')}:5: criteria[1].pattern: " in problem and "regular expression" in problem
    path = broken(tmp_path, "configs/rubrics/instruct.yaml", "kind: max_length", "kind: max_len")
    [problem] = problems_of(path)
    assert f":{line_of(path, 'max_len')}:5: criteria[2].kind: expected one of 'judge', 'regex'" in problem
    assert "(found: 'max_len')" in problem
    rubric = load_spec(Rubric, REPO / "configs/rubrics/instruct.yaml")
    assert isinstance(rubric.criteria[1], RegexCriterion) and rubric.criteria[1].must_match is False


def test_distillation_teachers_and_mixture_must_agree(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/distill.yaml", "    teacher: 2\n", "    teacher: 5\n")
    routed, unused = problems_of(path)
    assert f":{line_of(path, 'teacher: 5')}:5: mixture[2].teacher: mixture domain 'instruct' names teacher 5, " \
        "but the teachers' indices are [0, 1, 2]" in routed
    assert f":{line_of(path, 'index: 2')}:5: teachers[2].index: teacher index 2 scores no mixture domain" in unused
    path = broken(tmp_path, "configs/demo/distill.yaml", "  - index: 1\n", "  - index: 0\n")
    assert "teachers[1].index: teacher index 0 is used by more than one teacher" in problems_of(path)[0]


def test_mixture_prompts_are_one_file_or_a_list(tmp_path: Path, retort_home: Path) -> None:
    old = "    prompts: ${RETORT_HOME}/demo/data/math/train.jsonl\n"
    path = broken(tmp_path, "configs/demo/distill.yaml", old, "    prompts: [a.jsonl, b.parquet]\n")
    prompts = load_spec(DistillationRun, path).mixture[0].prompts
    assert prompts == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    for bad, message in (("3", "mixture[0].prompts: expected a file path or a list of file paths (found: 3)"),
                         ("[]", "mixture[0].prompts: Value should have at least 1 item"),
                         ("[a.jsonl, 7]", "mixture[0].prompts[1]: Input should be a valid string (found: 7)")):
        path = broken(tmp_path, "configs/demo/distill.yaml", old, f"    prompts: {bad}\n")
        [problem] = problems_of(path)
        assert f":{line_of(path, 'prompts: ' + bad)}:" in problem and message in problem


def test_pipeline_teachers_must_name_its_specialists(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs/demo", tmp_path / "demo")
    shutil.copytree(REPO / "configs/rubrics", tmp_path / "rubrics")
    distill = tmp_path / "demo" / "distill.yaml"
    distill.write_text(distill.read_text().replace("specialist: code", "specialist: coder"))
    path = tmp_path / "demo" / "pipeline.yaml"
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{line_of(path, 'distillation: distill.yaml')}:")
    assert "distillation.teachers[1].specialist: teacher 'code' names specialist 'coder'" in problem
    spec = load_any(REPO / "configs/demo/pipeline.yaml")
    assert isinstance(spec, Pipeline) and [t.specialist for t in spec.distillation.teachers] == [
        "math", "code", "instruct"]


def self_judged_demo(where: Path) -> Path:
    """The demo pipeline with the self-judging instruct specialist (configs/examples/instruct_self_judged.yaml)
    in place of the programmatic one: trained by its own judge, scored by the rubric's programmatic truth."""
    shutil.copytree(REPO / "configs/demo", where / "demo")
    shutil.copytree(REPO / "configs/rubrics", where / "rubrics")
    judged = (REPO / "configs/examples/instruct_self_judged.yaml").read_text()
    (where / "demo/specialists/instruct.yaml").write_text(
        judged.replace("name: instruct-self-judged", "name: instruct").replace("../rubrics/", "../../rubrics/"))
    return where / "demo" / "pipeline.yaml"


def test_pipeline_student_and_teacher_are_scored_alike(tmp_path: Path) -> None:
    """A teacher trained by its own judge and scored by the rubric's programmatic truth (eval.rewards) agrees with
    a mixture entry scored by that truth; another rubric, another answer budget or other tools is refused."""
    spec = load_any(self_judged_demo(tmp_path / "ok"))
    instruct = next(s for s in spec.specialists if s.name == "instruct")
    assert instruct.rewards[0].rubric.endswith("instruct_judged.yaml")
    assert instruct.eval.rewards[0].rubric == spec.distillation.mixture[2].rewards[0].rubric
    for case, (old, new, message) in enumerate([
            ("rubric: ../rubrics/instruct_demo.yaml", "rubric: ../rubrics/instruct_judged.yaml",
             "distillation.mixture[2].rewards: domain 'instruct' and its teacher 'instruct' are scored by different "
             "rewards"),
            ("      max_new_tokens: 32", "      max_new_tokens: 24",
             "distillation.mixture[2].eval: domain 'instruct' and its teacher 'instruct' are scored with different "
             "settings"),
            ("    teacher: 0\n", "    teacher: 0\n    tools:\n      - name: calculator\n",
             "distillation.mixture[0].tools: domain 'math' and its teacher 'math' answer with different tools or "
             "turns")]):
        pipeline = self_judged_demo(tmp_path / str(case))
        distill = pipeline.parent / "distill.yaml"
        assert old in distill.read_text()
        distill.write_text(distill.read_text().replace(old, new))
        [problem] = problems_of(pipeline)
        assert message in problem, problem


def test_standalone_distillation_cannot_name_a_specialist(tmp_path: Path) -> None:
    path = broken(tmp_path, "configs/demo/distill.yaml",
                  "    checkpoint: ${RETORT_HOME}/runs/specialist/code/grpo/final\n", "")
    assert isinstance(load_any(path), DistillationRun)  # a valid file on its own ...
    [problem] = problems_of(path, load_job_spec)  # ... but not a job without a pipeline
    assert f":{line_of(path, 'specialist: code')}:5: teachers[1].specialist: " in problem
    shutil.copy(REPO / "configs/rubrics/instruct.yaml", tmp_path / "r.yaml")
    assert "a rubric is not a job" in problems_of(tmp_path / "r.yaml", load_job_spec)[0]


def test_paths_resolve_against_the_spec_file(tmp_path: Path, retort_home: Path) -> None:
    spec = load_spec(SpecialistJob, REPO / "configs/demo/specialists/instruct.yaml")
    assert spec.base_model == str(retort_home / "demo/base")
    assert spec.datasets.train == str(retort_home / "demo/data/instruct/train.jsonl")
    assert spec.rewards[0].rubric == str(REPO / "configs/rubrics/instruct_demo.yaml")
    # a hub id stays a hub id; a spec stored as JSON round-trips unchanged
    text = (REPO / "configs/demo/specialists/math.yaml").read_text().replace(
        "${RETORT_HOME}/demo/base", "HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "hub.yaml").write_text(text)
    hub = load_spec(SpecialistJob, tmp_path / "hub.yaml")
    assert hub.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert SpecialistJob.model_validate(hub.model_dump(mode="json")) == hub


def test_agent_specialist_tools_are_checked(tmp_path: Path, retort_home: Path) -> None:
    spec = load_spec(SpecialistJob, REPO / "configs/examples/agent.yaml")
    assert [t.name for t in spec.tools] == ["python"] and spec.agent.max_turns == 3
    path = broken(tmp_path, "configs/examples/agent.yaml", "  - name: python\n", "  - name: shell\n")
    [problem] = problems_of(path)
    assert f":{line_of(path, 'name: shell')}:" in problem and "unknown tool 'shell'; known tools: calculator, " \
        "python" in problem
    path = broken(tmp_path, "configs/examples/agent.yaml", "  max_turns: 3", "  max_turns: 0")
    [problem] = problems_of(path)
    assert f":{line_of(path, 'max_turns: 0')}:" in problem and "agent.max_turns" in problem
