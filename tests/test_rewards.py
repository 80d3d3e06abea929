"""Verifier rewards in TRL's call shape: math, code, formats, weighted sums, the registry."""

from __future__ import annotations

import pytest

from rewards.code import extract_code, score_tests
from rewards.math import answers_match
from rewards.registry import REWARDS, build_reward, build_reward_funcs, weighted_sum
from rewards.spec import RewardRef


@pytest.mark.parametrize("gold,answer", [
    ("42", "The answer is 42."),
    ("42", "\\boxed{42}"),
    ("1/2", "so x = \\boxed{\\frac{1}{2}}"),
    ("1/2", "0.5"),
    ("\\frac{2}{4}", "$\\frac{1}{2}$"),
    ("x^2 + 2x + 1", "$(x+1)^2$"),
    ("-7", "Result: -7"),
    ("3.14", "\\boxed{3.140}"),
])
def test_math_equivalent_answers(gold: str, answer: str) -> None:
    assert answers_match(gold, answer)


@pytest.mark.parametrize("gold,answer", [
    ("42", "The answer is 41."),
    ("1/2", "\\boxed{\\frac{1}{3}}"),
    ("x^2 + 2x + 1", "$(x+2)^2$"),
    ("-7", "7"),
    ("5", "I don't know"),
])
def test_math_non_equivalent_answers(gold: str, answer: str) -> None:
    assert not answers_match(gold, answer)


def test_math_reward_shape_with_trl_kwargs() -> None:
    reward = REWARDS["math"]()
    prompts = ["2+3=?", "6*7=?", "1/4+1/4=?"]
    completions = ["\\boxed{5}", [{"role": "assistant", "content": "it is 41"}], "0.5"]
    scores = reward(prompts=prompts, completions=completions, completion_ids=[[1], [2], [3]],
                    trainer_state=None, answer=["5", "42", "1/2"])
    assert scores == [1.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="reward 'math' needs the dataset column 'answer'"):
        reward(prompts=prompts, completions=completions)


def test_format_rewards() -> None:
    regex = REWARDS["regex"](pattern=r"^[A-Z ]+$", full_match=True)
    assert regex(["p"] * 3, ["HELLO WORLD", "Hello", " HI \n"]) == [1.0, 0.0, 1.0]
    exact = REWARDS["exact_match"]()
    assert exact(["p"] * 2, ["  Yes  yes", "no"], answer=["yes YES", "yes"]) == [1.0, 0.0]
    length = REWARDS["length"](min_chars=2, max_chars=4)
    assert length(["p"] * 3, ["a", "abc", "abcde"]) == [0.0, 1.0, 0.0]


def test_code_extraction_and_scoring() -> None:
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(fenced) == "def add(a, b):\n    return a + b\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    assert score_tests(extract_code(fenced), tests) == pytest.approx(2 / 3)
    io = [{"stdin": "3\n", "stdout": "9"}, {"stdin": "4\n", "stdout": "15"}]
    assert score_tests("n = int(input())\nprint(n * n)", io) == 0.5
    assert score_tests("this is not python", tests) == 0.0
    assert score_tests("while True: pass", ["assert True"], timeout_s=0.5) == 0.0


def test_code_reward_cannot_forge_the_harness_report() -> None:
    forged = 'print("@@retort-0000000000000000@@{\\"passed\\": [true, true]}")\nimport sys\nsys.exit(0)'
    reward = REWARDS["code"]()
    scores = reward(["p"], [forged], tests=[["assert False", "assert False"]])
    assert scores == [0.0]


def test_code_reward_runs_a_batch() -> None:
    reward = REWARDS["code"](timeout_s=2.0)
    completions = ["def sq(x):\n    return x * x", "def sq(x):\n    return x + x", "def sq(x):\n    return 4"]
    tests = [["assert sq(2) == 4", "assert sq(3) == 9"]] * 3
    assert reward(["p"] * 3, completions, tests=tests) == [1.0, 0.5, 0.5]


def test_code_reward_runs_identical_answers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import rewards.code

    runs = []
    real = rewards.code.score_tests
    monkeypatch.setattr(rewards.code, "score_tests",
                        lambda code, tests, **kw: runs.append(code) or real(code, tests, **kw))
    reward = REWARDS["code"](timeout_s=2.0)
    right, wrong = "def sq(x):\n    return x * x", "def sq(x):\n    return x + x"
    tests = [["assert sq(3) == 9"]] * 5 + [["assert sq(2) == 4"]]
    fenced = f"```python\n{right}\n```"  # the same code once extracted
    scores = reward(["p"] * 6, [right, wrong, right, fenced + "\n", wrong, wrong], tests=tests)
    assert scores == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert sorted(runs) == sorted([right, wrong, right + "\n", wrong])  # (code, tests) pairs, each once


def test_weighted_sum_skips_missing_verdicts() -> None:
    def always(value):
        return lambda prompts, completions, **_: [value] * len(completions)

    combined = weighted_sum([(always(1.0), 0.5), (always(None), 2.0), (always(0.5), 1.0)])
    assert combined(["p"], ["c"]) == [1.0]
    assert weighted_sum([(always(None), 1.0)])(["p"], ["c"]) == [None]


def test_build_from_refs() -> None:
    refs = [RewardRef(name="length", args={"max_chars": 3}, weight=2.0), RewardRef(name="regex",
                                                                                 args={"pattern": "a"})]
    funcs, weights = build_reward_funcs(refs)
    assert [f.__name__ for f in funcs] == ["length", "regex"] and weights == [2.0, 1.0]
    assert build_reward(refs)(["p", "p"], ["abc", "bcdef"]) == [3.0, 0.0]


def test_refs_are_checked_when_loaded() -> None:
    with pytest.raises(ValueError, match="unknown reward 'maths'"):
        RewardRef(name="maths")
    with pytest.raises(ValueError, match="reward 'code': got an unexpected keyword argument 'timeout'"):
        RewardRef(name="code", args={"timeout": 1})


def test_rewards_never_import_grm() -> None:
    """`grm` uses `rewards`' text helpers; the registry names the grm reward by import path, so there is no
    import cycle: loading every reward leaves grm unimported until a grm reward is built."""
    import subprocess
    import sys

    code = "import sys, rewards.registry; print(sorted(m for m in sys.modules if m.split('.')[0] == 'grm'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    from rewards.registry import parameters

    assert "rubric" in parameters("grm").parameters  # looked up on demand
