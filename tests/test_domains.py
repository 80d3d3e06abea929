"""The demo domains: deterministic, held-out prompts unseen in training, and consistent with their rewards."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from controller.cli import app
from rewards.registry import REWARDS
from specialists.domains import DOMAINS, generate

REWARD_OF = {"math": REWARDS["math"](), "code": REWARDS["code"](), "instruct": REWARDS["exact_match"]()}


def test_generation_is_deterministic_and_held_out_is_unseen() -> None:
    for domain in DOMAINS:
        train, held_out = generate(domain, 300, 40, seed=3)
        assert (train, held_out) == generate(domain, 300, 40, seed=3)
        assert generate(domain, 300, 40, seed=4) != (train, held_out)
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
        assert len({r["prompt"] for r in held_out}) == 40


def test_reference_completions_earn_full_reward_and_wrong_ones_do_not() -> None:
    for domain in DOMAINS:
        _, held_out = generate(domain, 10, 20)
        columns = {k: [r[k] for r in held_out] for k in held_out[0] if k not in ("prompt", "completion")}
        prompts = [r["prompt"] for r in held_out]
        assert REWARD_OF[domain](prompts, [r["completion"] for r in held_out], **columns) == [1.0] * 20, domain
        wrong = REWARD_OF[domain](prompts, ["nonsense"] * 20, **columns)
        assert max(wrong) == 0.0, domain


def test_cli_writes_the_files_the_demo_configs_name(retort_home: Path) -> None:
    result = CliRunner().invoke(app, ["data", "demo", "--train", "50", "--eval", "10"])
    assert result.exit_code == 0, result.output
    for domain in DOMAINS:
        for split, rows in (("train", 50), ("eval", 10)):
            path = retort_home / "demo" / "data" / domain / f"{split}.jsonl"
            assert len(path.read_text().splitlines()) == rows
