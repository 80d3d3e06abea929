"""GRPO over multi-turn trajectories: TRL's GRPOTrainer gets each trajectory through its rollout_func with
`env_mask` (the tools' tokens never trained on), the rewards score the final answer, and training runs.

The policy is the tiny model after a short agent SFT (tests/conftest.py: agent_model); it generates on the
session's vLLM engine, its calls run in the real sandbox.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_grpo_trains_on_the_models_own_tokens_and_scores_final_answers(
        tmp_path: Path, agent_model: tuple[Path, Path], vllm_engine, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from rewards.registry import build_reward_funcs
    from rewards.spec import RewardRef
    from specialists.config import SpecialistJob
    from specialists.fit import fit
    from specialists.grpo import build_grpo_trainer

    model, data = agent_model
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "agent", "domain": "agent", "base_model": str(model), "seed": 0,
        "datasets": {"train": str(data / "train.jsonl"), "rl": str(data / "rl.jsonl"),
                     "eval": str(data / "eval.jsonl")},
        "sft": {"enabled": False},
        "grpo": {"max_steps": 2, "batch_size": 8, "num_generations": 4, "max_completion_length": 128,
                 "learning_rate": 1e-4, "save_steps": 100, "gradient_checkpointing": False},
        "rewards": [{"name": "math"}], "tools": [{"name": "python"}], "agent": {"max_turns": 3,
                                                                              "max_concurrency": 2}})
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (data / "rl.jsonl").read_text().splitlines()][:4]
    try:
        trainer, _ = build_grpo_trainer(spec, str(model), tmp_path / "grpo", vllm_engine)
        out = trainer.rollout_func([[{"role": "user", "content": row["prompt"]}] for row in rows], trainer)
        assert set(out) == {"prompt_ids", "completion_ids", "logprobs", "env_mask", "final_answer"}
        called = 0
        for ids, mask, logprobs, answer in zip(out["completion_ids"], out["env_mask"], out["logprobs"],
                                               out["final_answer"], strict=True):
            assert len(ids) == len(mask) == len(logprobs)
            tools = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=False)
            own = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
            if "<|tool|>" in tools:  # a call: its result is context, the call and the answer are the model's
                called += 1
                assert '<tool_call name="python">' in own and own.endswith(answer) and "<|tool|>" not in own
            assert all(lp == 0.0 for lp, m in zip(logprobs, mask, strict=True) if not m)
        assert called >= 2
        # the rewards see the final answers, not the text of the calls
        [math], _ = build_reward_funcs([RewardRef(name="math")])
        [reward] = trainer.reward_funcs
        answers = [row["answer"] for row in rows]
        prompts = [row["prompt"] for row in rows]
        assert reward(prompts, ["garbage"] * 4, final_answer=answers, answer=answers) == [1.0] * 4
        assert reward(prompts, answers, final_answer=out["final_answer"], answer=answers) == \
            math(prompts, out["final_answer"], answer=answers)

        logs: list[tuple[int, dict]] = []
        fit(trainer, tokenizer, tmp_path / "grpo", on_log=lambda step, values: logs.append((step, values)))
    finally:  # the session's engine gets its base weights back
        vllm_engine.load_weights(load_file(tiny_model_dir / "model.safetensors").items())
    steps = [values for _, values in logs if "loss" in values]
    assert len(steps) == 2 and all(v["completions/mean_length"] > 0 for v in steps)
    batches = sorted(p.name for p in (tmp_path / "grpo" / "rollouts" / "results").glob("step-*"))
    assert "step-000000-gen-01.turn0.jsonl" in batches and "step-000001-gen-00.turn0.jsonl" in batches
    calls = [json.loads(line) for line in (tmp_path / "grpo" / "rollouts" / "calls.jsonl").read_text().splitlines()]
    assert any(c["call"]["name"] == "python" and c["result"]["status"] == "ok" for c in calls)
    # one log for every batch, whose trajectory ids repeat: each batch's calls are its own, never replayed
    assert {c["trajectory"].split("/")[0] for c in calls} >= {"step-000000-gen-00", "step-000000-gen-01",
                                                              "step-000001-gen-00"}
    assert all(c["call"]["name"] == "python" or c["call"]["error"] for c in calls)  # sampled: some are malformed
