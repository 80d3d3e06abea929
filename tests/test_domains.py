"""The demo domains: deterministic, held-out prompts unseen in training, and consistent with their rewards."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from controller.cli import app
from rewards.registry import REWARDS
from specialists.domains import DOMAINS, HABITS, generate

REWARD_OF = {"math": REWARDS["math"](), "code": REWARDS["code"](), "instruct": REWARDS["exact_match"](),
             "agent": REWARDS["math"]()}  # the agent's final answer


def final_answer(completion: str | list[dict[str, str]]) -> str:
    """A demonstration's answer: the completion, or an agent's last turn."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def test_generation_is_deterministic_and_held_out_is_unseen() -> None:
    for domain in DOMAINS:
        train, held_out, rl = generate(domain, 300, 40, seed=3, n_rl=100)
        assert (train, held_out, rl) == generate(domain, 300, 40, seed=3, n_rl=100)
        assert generate(domain, 300, 40, seed=4, n_rl=100) != (train, held_out, rl)
        prompts = [{r["prompt"] for r in split} for split in (train, held_out, rl)]
        assert not prompts[0] & prompts[1] and not prompts[2] & prompts[1]  # held out of both
        assert not prompts[0] & prompts[2]  # GRPO's problems are not SFT's
        assert len(prompts[1]) == 40 and len(rl) == 100 and len(train) == 300
        assert generate(domain, 300, 40, seed=3).rl == []


def test_reference_completions_earn_full_reward_and_wrong_ones_do_not() -> None:
    for domain in DOMAINS:
        held_out = generate(domain, 10, 20).eval
        columns = {k: [r[k] for r in held_out] for k in held_out[0] if k not in ("prompt", "completion")}
        prompts = [r["prompt"] for r in held_out]
        answers = [final_answer(r["completion"]) for r in held_out]
        assert REWARD_OF[domain](prompts, answers, **columns) == [1.0] * 20, domain
        wrong = REWARD_OF[domain](prompts, ["nonsense"] * 20, **columns)
        assert max(wrong) == 0.0, domain


def test_cli_writes_the_files_the_demo_configs_name(retort_home: Path) -> None:
    result = CliRunner().invoke(app, ["data", "demo", "--train", "50", "--eval", "10", "--rl", "20"])
    assert result.exit_code == 0, result.output
    for domain in DOMAINS:
        for split, rows in (("train", 50), ("eval", 10), ("rl", 20)):
            path = retort_home / "demo" / "data" / domain / f"{split}.jsonl"
            assert len(path.read_text().splitlines()) == rows


def test_demonstration_habits_are_in_sft_data_only_and_their_rewards_reject_them() -> None:
    """SFT copies the habits; GRPO has something to unlearn only because the reward sees them."""
    for domain in HABITS:
        train, held_out, rl = generate(domain, 400, 20, n_rl=50)
        clean = generate(domain, 400, 20, n_rl=50, habits=False)
        assert (held_out, rl) == (clean.eval, clean.rl) and len(train) == len(clean.train)
        assert [r["prompt"] for r in train] == [r["prompt"] for r in clean.train]  # the same problems
        habits = [r for r, c in zip(train, clean.train, strict=True) if r != c]
        assert 0.1 * len(train) < len(habits) < 0.5 * len(train), domain
        sample = habits[:8]
        columns = {k: [r[k] for r in sample] for k in sample[0] if k not in ("prompt", "completion")}
        scores = REWARD_OF[domain]([r["prompt"] for r in sample], [r["completion"] for r in sample], **columns)
        assert max(scores) < 1.0, (domain, scores)


def test_agent_demonstrations_call_the_tool_and_copy_its_result() -> None:
    """The agent domain cannot be solved in the head (4-digit products, 5-term signed sums): each demonstration calls
    python, whose printed result (run here in the sandbox) is the answer it then gives."""
    from rewards.tools import ToolBox, ToolRef
    from rollout.agent import parse_turn

    train = generate("agent", 20, 5).train
    box = ToolBox([ToolRef(name="python")])
    calls = [parse_turn(r["completion"][0]["content"]).call for r in train]
    assert all(c is not None and not c.malformed and c.name == "python" for c in calls)
    results = box.run(calls)
    for row, result in zip(train, results, strict=True):
        assert [t["role"] for t in row["completion"]] == ["assistant", "tool", "assistant"]
        assert result.output == row["completion"][1]["content"] == row["completion"][2]["content"] == row["answer"]
    assert {len(r["answer"]) for r in train} & {5, 6, 7, 8}  # products of 3-4 digit numbers are long
