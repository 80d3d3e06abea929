"""Tasks other people wrote: reasoning-gym, HumanEval, IFEval's checkers; and tokenizers checked before distilling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from rewards.ifeval import follows, ifeval_reward
from rewards.reasoning_gym import ReasoningGymSource, build_task, generate_splits, reasoning_gym_reward
from rewards.registry import build_reward
from rewards.spec import RewardRef
from rewards.text import extract_answer
from storage.specfile import SpecError, load_spec

TASKS = ["spell_backward", "chain_sum", "letter_counting", "word_sorting", "gsm_symbolic", "base_conversion",
         "arc_agi"]  # ARC's scorer compares tuples, which a JSON round trip turns into lists


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", TASKS)
def test_reasoning_gym_data_has_disjoint_splits_and_its_scorer_agrees(task: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "reasoning-gym", task, "--size", "60", "--rl", "20", "--eval", "20",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    splits = {name: _rows(tmp_path / f"{name}.jsonl") for name in ("train", "rl", "eval")}
    assert [len(splits[n]) for n in ("train", "rl", "eval")] == [60, 20, 20]
    questions = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert sum(map(len, questions)) == 100 and len(set.union(*questions)) == 100  # distinct, in one split each
    rows = splits["eval"]
    again = CliRunner().invoke(app, ["data", "reasoning-gym", task, "--size", "30", "--rl", "0", "--eval", "10",
                                     "--out", str(tmp_path)])
    assert again.exit_code == 0 and len(_rows(tmp_path / "train.jsonl")) == 30  # written anew, not kept
    assert not (tmp_path / "rl.jsonl").exists()
    reward = reasoning_gym_reward()
    columns = {k: [r[k] for r in rows] for k in ("task", "task_config", "task_source", "answer", "metadata")}
    prompts = [r["prompt"] for r in rows]
    assert reward(prompts, [r["completion"] for r in rows], **columns) == [1.0] * len(rows)
    task_scorer = build_task(task, {})
    wrong = ["zzz", "", rows[0]["answer"] + " and more"]
    for row in rows[:5]:
        source = json.loads(row["task_source"])
        entry = build_task(task, {}, seed=source["seed"], size=source["size"])[source["index"]]
        assert entry["question"] == row["prompt"]
        got = reward([row["prompt"]] * 3, wrong, **{k: [row[k]] * 3 for k in columns})
        assert got == [float(task_scorer.score_answer(w.strip(), entry)) for w in wrong]
        assert got[0] < 1.0


def test_reasoning_gym_unknown_task_names_the_closest() -> None:
    result = CliRunner().invoke(app, ["data", "reasoning-gym", "spell_backwards", "--out", "/nonexistent"])
    assert result.exit_code == 1
    assert "no task 'spell_backwards'" in result.output and "spell_backward" in result.output
    bad_config = CliRunner().invoke(app, ["data", "reasoning-gym", "chain_sum", "--config", '{"min_terms": 5, '
                                          '"max_terms": 2}', "--out", "/nonexistent"])
    assert bad_config.exit_code == 1 and "max_terms must be >= min_terms" in bad_config.output
    listed = CliRunner().invoke(app, ["data", "reasoning-gym", "--list"])
    assert listed.exit_code == 0 and "gsm_symbolic" in listed.output


def test_reasoning_gym_runs_out_of_distinct_questions_with_a_message() -> None:
    with pytest.raises(ValueError, match="only 200 distinct questions"):
        generate_splits("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, 0,
                        1000, 0, 40)


@pytest.mark.parametrize("fmt,text,expected", [
    ("whole", "  42 \n", "42"),
    ("last_line", "Let me think.\nStill thinking.\n\n42\n", "42"),
    ("answer_tags", "<think>no</think><answer> 7 </answer> and <answer>42</answer>", "42"),
    ("answer_tags", "no tags", None),
    ("boxed", "so \\boxed{\\frac{1}{2}} and finally \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("boxed", "\\boxed{unclosed", None),
])
def test_answer_extraction(fmt: str, text: str, expected: str | None) -> None:
    assert extract_answer(text, fmt) == expected


def test_reasoning_gym_in_a_specialist_yaml(tmp_path: Path, retort_home: Path) -> None:
    spec_file = tmp_path / "spell.yaml"
    spec_file.write_text("""kind: specialist
name: spell
domain: spell
base_model: ./base
datasets:
  reasoning_gym: {task: spell_backward, config: {min_word_len: 3, max_word_len: 5}, train: 50, rl: 10, eval: 10}
rewards:
  - name: reasoning_gym
    args: {answer_format: last_line}
""")
    from specialists.config import SpecialistJob

    spec = load_spec(SpecialistJob, spec_file)
    assert spec.datasets.train.startswith(str(retort_home / "data" / "reasoning-gym"))
    spec.datasets.write_generated()
    assert [len(_rows(Path(p))) for p in (spec.datasets.train, spec.datasets.rl, spec.datasets.eval)] == [50, 10, 10]
    again = SpecialistJob.model_validate(spec.model_dump(mode="json"))  # the stored job row validates as it was
    assert again.datasets == spec.datasets

    spec_file.write_text(spec_file.read_text().replace("last_line", "last_word").replace("spell_backward",
                                                                                          "spell_backwardz"))
    with pytest.raises(SpecError) as caught:
        load_spec(SpecialistJob, spec_file)
    problems = {p.path: (p.line, p.message) for p in caught.value.problems}
    assert problems["datasets.reasoning_gym.task"][0] == 6 and "spell_backward" in problems[
        "datasets.reasoning_gym.task"][1]
    assert problems["rewards[0].args.answer_format"][0] == 9
    assert "'whole', 'last_line', 'answer_tags' or 'boxed'" in problems["rewards[0].args.answer_format"][1]


def test_reasoning_gym_source_is_shared_by_specialist_and_mixture(retort_home: Path) -> None:
    from opd.config import MixtureEntry

    block = {"task": "chain_sum", "config": {"max_terms": 2}, "train": 30, "rl": 10, "eval": 10}
    entry = MixtureEntry(domain="sum", teacher=0, reasoning_gym=block)
    source = ReasoningGymSource(**block)
    assert entry.prompts == [source.path("train"), source.path("rl")] and entry.eval_prompts == source.path("eval")
    entry.write_generated()
    assert len(_rows(Path(entry.eval_prompts))) == 10


def test_humaneval_canonical_solutions_pass_and_stubs_fail(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "humaneval", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "eval.jsonl")
    assert len(rows) == 164 and len({r["task_id"] for r in rows}) == 164
    reward = build_reward([RewardRef(name="code", args={"timeout_s": 5.0})])
    tests = [r["tests"] for r in rows]
    assert reward([r["prompt"] for r in rows], [r["completion"] for r in rows], tests=tests) == [1.0] * 164
    stubs = [f"```python\n{r['code_prompt']}    pass\n```" for r in rows]
    assert reward([r["prompt"] for r in rows], stubs, tests=tests) == [0.0] * 164


# (instruction, kwargs, a response that follows it, one that breaks it)
IFEVAL_CASES = [
    ("change_case:english_lowercase", {}, "all of this is lowercase english text.", "This Has Capitals in english."),
    ("change_case:english_capital", {}, "THIS WHOLE ANSWER IS WRITTEN IN ENGLISH CAPITAL LETTERS.",
     "This is not all capitals at all."),
    ("punctuation:no_comma", {}, "No commas here at all.", "One, two, three."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Here it is. Any other questions?",
     "Any other questions? Here it is."),
    ("startend:quotation", {}, '"The whole reply is quoted."', 'The reply is "partly" quoted.'),
    ("detectable_format:json_format", {}, '{"a": 1, "b": [2, 3]}', "a: 1, b: 2"),
    ("detectable_format:title", {}, "<<My Poem>>\nRoses are red.", "My Poem\nRoses are red."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", "* one\n* two\n* three"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks.\nP.S. See you soon.", "Thanks."),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "A stone sat by the river.", "A rock by the lake."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A dog barked.", "A cat meowed."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Short reply here.",
     "This reply has far more than five words in it."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Jazz fizz.",
     "No such letter."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", "Dear you."),
]


@pytest.mark.parametrize("instruction,kwargs,good,bad", IFEVAL_CASES, ids=[c[0] for c in IFEVAL_CASES])
def test_ifeval_reward_agrees_with_if_verifiable(instruction: str, kwargs: dict, good: str, bad: str) -> None:
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    reward = ifeval_reward()
    for response, follows_it in ((good, True), (bad, False)):
        sample = IFEvalSample(key=0, prompt="Answer.", instruction_id_list=[instruction], kwargs=[kwargs])
        _, theirs = evaluate_output_for_sample("ifeval", sample, response)
        ours = reward(["Answer."], [response], instruction_id_list=[[instruction]], kwargs=[[kwargs]])
        assert ours == [theirs.binary_strict] == [float(follows_it)]


def test_ifeval_reward_scoring_modes_and_errors() -> None:
    ids = [["punctuation:no_comma", "change_case:english_lowercase"], []]
    kwargs = [json.dumps([{}, {}]), "[]"]  # IFEval's columns, as JSON text the way some files hold them
    response = ["*one, two*\nall lowercase here", "anything"]
    assert ifeval_reward(scoring="fraction")(["p", "p"], response, instruction_id_list=ids, kwargs=kwargs) == [
        0.5, None]
    assert ifeval_reward(mode="loose")(["p", "p"], response, instruction_id_list=ids, kwargs=kwargs) == [1.0, None]
    with pytest.raises(ValueError, match="closest: punctuation:no_comma"):
        follows("text", "punctuation:no_comas")
    with pytest.raises(RuntimeError, match="punkt"):
        follows("One. Two.", "length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"})


def test_ifeval_as_a_rubric_criterion(tmp_path: Path) -> None:
    from grm.reward import grm_reward

    rubric = tmp_path / "rubric.yaml"
    rubric.write_text("""name: ifeval-rubric
version: 1
criteria:
  - {id: no_comma, kind: ifeval, description: No commas., instruction: "punctuation:no_comma"}
  - id: ends
    kind: ifeval
    description: Ends with the phrase.
    instruction: "startend:end_checker"
    kwargs: {end_phrase: "Any questions?"}
""")
    reward = grm_reward(str(rubric))
    assert reward(["p"] * 3, ["Done. Any questions?", "Done, any questions?", "Done, I think."]) == [1.0, 0.5, 0.0]
    rubric.write_text(rubric.read_text().replace('"startend:end_checker"', '"startend:end_checkr"'))
    from grm.rubric import Rubric

    with pytest.raises(SpecError) as caught:
        load_spec(Rubric, rubric)
    assert caught.value.problems[0].line == 8 and "startend:end_checker" in caught.value.problems[0].message


def test_ifeval_prompt_generator(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "ifeval", "--out", str(tmp_path), "--size", "100", "--eval", "20"])
    assert result.exit_code == 0, result.output
    train, held_out = _rows(tmp_path / "train.jsonl"), _rows(tmp_path / "eval.jsonl")
    assert len(train) == 100 and len(held_out) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    kinds = {i for r in train for i in r["instruction_id_list"]}
    assert len(kinds) >= 10
    row = next(r for r in train if r["instruction_id_list"] == ["startend:end_checker"])
    phrase = row["kwargs"][0]["end_phrase"]
    assert phrase in row["prompt"]  # IFEval's own wording of the constraint
    reward = ifeval_reward()
    assert reward([row["prompt"]] * 2, [f"Fine. {phrase}", "Fine."], instruction_id_list=[row[
        "instruction_id_list"]] * 2, kwargs=[row["kwargs"]] * 2) == [1.0, 0.0]


@pytest.fixture
def mismatched_teacher(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny base with one more vocabulary row and another chat template: a teacher from a different family."""
    teacher = tmp_path / "other-teacher"
    shutil.copytree(tiny_model_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["vocab_size"] += 8
    (teacher / "config.json").write_text(json.dumps(config))
    settings = json.loads((teacher / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (teacher / "tokenizer_config.json").write_text(json.dumps(settings))
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    return teacher


def test_tokenizer_check_refuses_a_mismatched_teacher(tiny_model_dir: Path, mismatched_teacher: Path,
                                                      tmp_path: Path, retort_home: Path) -> None:
    from opd.vocabulary import check_tokenizers

    check_tokenizers(str(tiny_model_dir), {"same": str(tiny_model_dir)})  # one tokenizer: no complaint
    padded = tmp_path / "padded"  # a trainer that sets another padding token changes no distribution
    shutil.copytree(tiny_model_dir, padded)
    settings = json.loads((padded / "tokenizer_config.json").read_text())
    settings["pad_token"] = "<unk>"
    (padded / "tokenizer_config.json").write_text(json.dumps(settings))
    check_tokenizers(str(tiny_model_dir), {"padded": str(padded)})
    with pytest.raises(ValueError) as caught:
        check_tokenizers(str(tiny_model_dir), {"other": str(mismatched_teacher)})
    message = str(caught.value)
    assert str(mismatched_teacher) in message and str(tiny_model_dir) in message
    assert "vocabulary size 128 vs 136" in message and "chat template" in message

    run = tmp_path / "distill.yaml"
    run.write_text(f"""kind: distillation
name: mismatched
student: {{init: {tiny_model_dir}}}
teachers:
  - {{index: 0, name: other, checkpoint: {mismatched_teacher}}}
mixture:
  - {{domain: spell, teacher: 0, reasoning_gym: {{task: spell_backward, train: 20, eval: 5}}}}
steps: 1
""")
    result = CliRunner().invoke(app, ["submit", str(run)])
    assert result.exit_code == 1
    assert "teacher 'other'" in result.output and "vocabulary size 128 vs 136" in result.output
