"""The multi-turn agent loop: turns until an answer, tool results as context tokens (masked), every call in a
durable trajectory log, and a re-run that replays logged calls instead of running them again.

The loop's bookkeeping is checked against an engine that plays back scripted turns (pure logic: which tokens
are the model's, what is logged and replayed); the same loop then runs on the session's real vLLM engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rewards.tools import ToolBox, ToolRef
from rollout.agent import AgentRequest, TrajectoryLog, run_agent
from rollout.engine import GenerationRequest, TokenChunk


class ScriptedEngine:
    """Answers turn k of every request with script[k] (then EOS), a few tokens per step as an engine does; a
    request whose prompt already ends with the start of its turn (resumed from a WAL) gets the rest of it.
    `on_step(step)` runs after each step it yields (a test stops a service there)."""

    def __init__(self, tokenizer, script: list[str], on_step=None) -> None:
        self.tokenizer, self.script, self.eos_token_id = tokenizer, script, tokenizer.eos_token_id
        self.prompts: list[tuple[int, ...]] = []
        self.sampling: list[tuple[str, float, float, int | None]] = []  # (id, temperature, top_p, seed)
        self.on_step, self.steps = on_step, 0

    def generate(self, requests: Sequence[GenerationRequest]):
        plans = {}
        for r in requests:
            self.prompts.append(r.prompt_ids)
            self.sampling.append((r.id, r.temperature, r.top_p, r.seed))
            turn = int(r.id.rsplit("/", 1)[1])
            ids = self.tokenizer(self.script[turn], add_special_tokens=False)["input_ids"] + [self.eos_token_id]
            done = max(j for j in range(len(ids)) if tuple(ids[:j]) == r.prompt_ids[len(r.prompt_ids) - j:])
            plans[r.id] = ids[done:done + r.max_tokens]
        step = 0
        while any(len(ids) > step for ids in plans.values()):
            yield [TokenChunk(rid, ids[step:step + 3], [-0.5] * len(ids[step:step + 3]),
                              ("stop" if ids[-1] == self.eos_token_id else "length") if step + 3 >= len(ids)
                              else None) for rid, ids in plans.items() if len(ids) > step]
            step += 3
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.steps)


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


CALC = ToolBox([ToolRef(name="calculator")])


def test_a_call_its_result_and_the_answer(tokenizer, tmp_path: Path) -> None:
    engine = ScriptedEngine(tokenizer, ['I compute it.<tool_call name="calculator">4821 * 7713</tool_call>',
                                        str(4821 * 7713)])
    log = TrajectoryLog(tmp_path / "calls.jsonl")
    [t] = run_agent(engine, tokenizer, [AgentRequest("q0", "What is 4821 * 7713?", seed=1)], CALC, log,
                    turn_tokens=96)
    assert t.finish_reason == "answer" and t.answer == "37184373" and t.turns == 2 and log.executed == 1
    [(call, result)] = t.calls
    assert (call.name, call.body, result.output, result.status) == ("calculator", "4821 * 7713", "37184373", "ok")
    # the whole sequence is the chat template's rendering of the conversation, token for token ...
    rendered = tokenizer.apply_chat_template([
        {"role": "user", "content": "What is 4821 * 7713?"},
        {"role": "assistant", "content": 'I compute it.<tool_call name="calculator">4821 * 7713</tool_call>'},
        {"role": "tool", "content": "37184373"}, {"role": "assistant", "content": "37184373"}], tokenize=False)
    assert tokenizer.decode([*t.prompt_ids, *t.token_ids], skip_special_tokens=False) == rendered
    # ... and only the model's own tokens are masked in: the tool turn is context
    tool_part = tokenizer.decode([i for i, m in zip(t.token_ids, t.model_mask, strict=True) if not m],
                                 skip_special_tokens=False)
    assert tool_part == "<|tool|>37184373\n<|assistant|>"
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.model_mask, strict=True) if not m)
    assert engine.prompts[1] == (*t.prompt_ids, *t.token_ids[:len(engine.prompts[1]) - len(t.prompt_ids)])
    assert log.trajectory("q0")[0]["result"]["output"] == "37184373"


def test_a_rerun_replays_logged_calls_and_a_torn_line_is_dropped(tokenizer, tmp_path: Path) -> None:
    script = ['<tool_call name="calculator">12 * 34</tool_call>', '<tool_call name="calculator">408 + 1</tool_call>',
              "409"]
    requests = [AgentRequest(f"q{i}", f"Problem {i}", seed=i) for i in range(3)]
    first = TrajectoryLog(tmp_path / "calls.jsonl")
    done = run_agent(ScriptedEngine(tokenizer, script), tokenizer, requests, CALC, first)
    first.close()
    assert first.executed == 6 and {t.answer for t in done} == {"409"}
    with (tmp_path / "calls.jsonl").open("ab") as f:
        f.write(b'{"trajectory": "q0", "turn": 2, "ca')  # killed mid-write
    again = TrajectoryLog(tmp_path / "calls.jsonl")
    assert len(again.records) == 6 and (tmp_path / "calls.jsonl").read_bytes().endswith(b"}\n")
    redone = run_agent(ScriptedEngine(tokenizer, script), tokenizer, requests, CALC, again)
    assert again.executed == 0  # every call came from the log
    assert [t.token_ids for t in redone] == [t.token_ids for t in done]


def test_every_turn_samples_with_the_callers_settings_and_its_seed_plus_the_turn(tokenizer, tmp_path: Path) -> None:
    engine = ScriptedEngine(tokenizer, ['<tool_call name="calculator">2 + 2</tool_call>', "4"])
    run_agent(engine, tokenizer, [AgentRequest("q", "2 + 2?", seed=7)], CALC, TrajectoryLog(tmp_path / "c.jsonl"),
              temperature=0.7, top_p=0.9)
    assert engine.sampling == [("q/0", 0.7, 0.9, 7), ("q/1", 0.7, 0.9, 8)]


def test_through_the_rollout_service_a_stopped_trajectory_resumes_mid_turn(tokenizer, tmp_path: Path) -> None:
    """Every turn is a batch of the WAL-backed service: stopped in the middle of turn 1, a second run of the same
    call keeps turn 0's stored tokens and turn 1's committed ones, replays the logged calls, and ends with the
    trajectories an engine gives straight through."""
    from rollout.service import Preempted, RolloutService

    script = ['<tool_call name="calculator">12 * 34</tool_call>',
              'Then <tool_call name="calculator">408 + 1</tool_call>', "409"]
    requests = [AgentRequest(f"q{i}", f"Problem {i}", seed=i) for i in range(3)]
    straight = run_agent(ScriptedEngine(tokenizer, script), tokenizer, requests, CALC,
                         TrajectoryLog(tmp_path / "straight.jsonl"))
    run = tmp_path / "run"
    service = RolloutService(ScriptedEngine(tokenizer, script, on_step=lambda step: step == 20 and stop()), run)

    def stop() -> None:
        service.request_stop()

    first = TrajectoryLog(run / "calls.jsonl")
    with pytest.raises(Preempted):
        run_agent(service, tokenizer, requests, CALC, first, batch="agent")
    first.close()
    assert first.executed == 3 and sorted(p.name for p in (run / "results").iterdir()) == ["agent.turn0.jsonl"]
    assert sorted(p.name for p in (run / "batches").iterdir()) == ["agent.turn0.jsonl", "agent.turn1.jsonl"]

    engine = ScriptedEngine(tokenizer, script)
    again = TrajectoryLog(run / "calls.jsonl")
    resumed = run_agent(RolloutService(engine, run), tokenizer, requests, CALC, again, batch="agent")
    assert again.executed == 3  # turn 1's calls; turn 0's came from the log
    assert {r["trajectory"] for r in again.records} == {"agent/q0", "agent/q1", "agent/q2"}
    assert [(t.token_ids, t.model_mask, t.answer) for t in resumed] == \
        [(t.token_ids, t.model_mask, t.answer) for t in straight]
    turn1 = engine.prompts[:3]  # the resumed turn 1 asked only for what its committed tokens lack
    assert all(len(p) > len(straight[0].prompt_ids) for p in turn1)
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert [a["batch"] for a in attempts] == ["agent.turn0", "agent.turn1", "agent.turn1", "agent.turn2"]
    assert sum(attempts[2]["resumed_tokens"].values()) > 0
    with pytest.raises(ValueError, match="a RolloutService generates a named batch"):
        run_agent(RolloutService(engine, tmp_path / "other"), tokenizer, requests, CALC, again)
    run_agent(RolloutService(engine, run), tokenizer, requests, CALC, again, batch="other")
    assert again.executed == 9  # another batch of the same log, with the same ids: its calls are its own


def test_malformed_calls_turn_limits_and_token_budget(tokenizer, tmp_path: Path) -> None:
    log = TrajectoryLog(tmp_path / "calls.jsonl")
    [bad] = run_agent(ScriptedEngine(tokenizer, ["<tool_call name='calculator'>1</tool_call>", "1"]), tokenizer,
                      [AgentRequest("bad", "x")], CALC, log)
    assert bad.malformed_calls == 1 and bad.calls[0][1].status == "malformed" and bad.finish_reason == "answer"
    assert bad.messages[2]["content"].startswith("[malformed] expected <tool_call name=\"TOOL\">")
    loop = ['<tool_call name="calculator">1 + 1</tool_call>'] * 3
    [looping] = run_agent(ScriptedEngine(tokenizer, loop), tokenizer, [AgentRequest("loop", "x")], CALC, log,
                          max_turns=3)
    assert looping.finish_reason == "max_turns" and looping.turns == 3 and len(looping.calls) == 3
    [long] = run_agent(ScriptedEngine(tokenizer, loop), tokenizer, [AgentRequest("long", "x")], CALC, log,
                       max_turns=3, max_tokens=70)
    assert long.finish_reason == "length" and len(long.token_ids) <= 70 + 16


def test_a_turn_the_template_cannot_render_back_keeps_its_tokens(tokenizer, tmp_path: Path) -> None:
    """An untrained student writes special tokens inside a turn (here `<|user|>`), which decoding drops, so the
    template cannot render the turn back as generated: the turn keeps its tokens, the tool turn follows it, and
    the trajectory goes on (it stopped the first distillation over the demo's agent domain)."""
    turn = 'x<|user|>2+<tool_call name="calculator">3 + 4</tool_call>'
    [t] = run_agent(ScriptedEngine(tokenizer, [turn, "7"]), tokenizer, [AgentRequest("q", "x")], CALC,
                    TrajectoryLog(tmp_path / "calls.jsonl"))
    assert t.finish_reason == "answer" and t.answer == "7" and t.calls[0][1].output == "7"
    model_turn = tokenizer(turn, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tool_turn = tokenizer("<|tool|>7\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert t.token_ids[:len(model_turn) + len(tool_turn)] == model_turn + tool_turn
    assert t.model_mask[:len(model_turn) + len(tool_turn)] == [True] * len(model_turn) + [False] * len(tool_turn)


def test_a_turn_budget_that_cannot_hold_the_demonstrations_calls_is_refused(tokenizer, tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """A five-term sum's call is 63 tokens (the tiny tokenizer is one token a character): 48 a turn cuts every
    such call off before it closes, and the agent scores 0 with nothing saying why, so the job refuses to start."""
    import random

    from rollout.agent import check_turn_budget
    from specialists.config import SpecialistJob
    from specialists.domains import agent_row
    from specialists.job import run_specialist

    rng = random.Random(0)
    rows = [agent_row(rng) for _ in range(50)]
    longest = max(len(tokenizer(t["content"], add_special_tokens=False)["input_ids"]) + 1
                  for row in rows for t in row["completion"] if t["role"] == "assistant")
    check_turn_budget(tokenizer, [row["completion"] for row in rows], longest, source="d.jsonl", setting="budget")
    with pytest.raises(ValueError, match=f"budget is {longest - 1} tokens a turn.*give budget at least {longest}"):
        check_turn_budget(tokenizer, [row["completion"] for row in rows], longest - 1, source="d.jsonl",
                          setting="budget")
    for split in ("train", "eval"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "agent", "domain": "agent", "base_model": str(tiny_model_dir),
        "datasets": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        "grpo": {"enabled": False}, "rewards": [{"name": "math"}], "tools": [{"name": "python"}],
        "eval": {"max_new_tokens": 48}})
    with pytest.raises(ValueError, match=r"train.jsonl: eval.max_new_tokens is 48 tokens a turn"):
        run_specialist(spec, tmp_path / "run", engine=object())  # refused before the engine is touched


def test_the_loop_on_the_real_engine(tokenizer, vllm_engine, tmp_path: Path) -> None:
    """The untrained tiny model writes no call: each trajectory is one model turn, all of it the model's."""
    log = TrajectoryLog(tmp_path / "calls.jsonl")
    trajectories = run_agent(vllm_engine, tokenizer, [AgentRequest(f"r{i}", f"{i} + {i} =", seed=i)
                                                      for i in range(4)], CALC, log, turn_tokens=16,
                             temperature=0.0)
    for t in trajectories:
        assert t.turns == 1 and t.finish_reason in {"answer", "length"} and all(t.model_mask)
        assert len(t.token_ids) == len(t.logprobs) <= 16 and all(lp <= 0.0 for lp in t.logprobs)
    assert log.records == []


def test_a_first_turn_generated_beside_other_work_gives_the_same_trajectories(tokenizer, vllm_engine,
                                                                             tmp_path: Path) -> None:
    """A distillation step generates its agents' first turns in the same engine batch as the other domains'
    answers (`first_turn_requests`, then `run_agent(first_turn=...)`): one pass over the decode steps instead of
    two. The trajectories are the ones `run_agent` makes alone: sampled with the same seeds on the real engine,
    and, with scripted calls, the same later turns and tool results."""
    from rollout.agent import first_turn_requests
    from rollout.engine import generate_whole

    requests = [AgentRequest(f"r{i}", f"{i} + {i} =", seed=i) for i in range(4)]
    budget = {"max_tokens": 48, "turn_tokens": 16, "temperature": 1.0}
    alone = run_agent(vllm_engine, tokenizer, requests, CALC, TrajectoryLog(tmp_path / "alone.jsonl"), **budget)
    others = [GenerationRequest(f"other-{i}", tuple(tokenizer(f"unrelated {i}")["input_ids"]), 24, seed=100 + i)
              for i in range(4)]
    whole = generate_whole(vllm_engine, [*others, *first_turn_requests(tokenizer, requests, **budget)])
    first = {rid: (c.token_ids, c.logprobs, c.finish_reason) for rid, c in whole.items() if not rid.startswith("o")}
    beside = run_agent(vllm_engine, tokenizer, requests, CALC, TrajectoryLog(tmp_path / "beside.jsonl"),
                       first_turn=first, **budget)
    assert [t.token_ids for t in beside] == [t.token_ids for t in alone]
    for b, a in zip(beside, alone, strict=True):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4) and b.finish_reason == a.finish_reason

    script = ['<tool_call name="calculator">12 * 34</tool_call>', "408"]
    straight = run_agent(ScriptedEngine(tokenizer, script), tokenizer, requests, CALC,
                         TrajectoryLog(tmp_path / "straight.jsonl"))
    engine = ScriptedEngine(tokenizer, script)
    whole = generate_whole(engine, first_turn_requests(tokenizer, requests, max_tokens=256, turn_tokens=64))
    log = TrajectoryLog(tmp_path / "split.jsonl")
    split = run_agent(engine, tokenizer, requests, CALC, log,
                      first_turn={rid: (c.token_ids, c.logprobs, c.finish_reason) for rid, c in whole.items()})
    assert [(t.token_ids, t.model_mask, t.answer, t.turns) for t in split] == \
        [(t.token_ids, t.model_mask, t.answer, t.turns) for t in straight]
    turns = [rid.rsplit("/", 1)[1] for rid, *_ in engine.sampling]
    assert log.executed == 4 and turns.count("0") == 4 and turns.count("1") == 4  # turn 0 generated once


def test_sft_learns_the_calls_and_the_answer_never_the_tool_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An agent demonstration is several turns; TRL's assistant-only loss (the template's generation markers)
    trains on the model's own turns, and the tool's result in between is context."""
    from specialists.config import SpecialistJob
    from specialists.domains import write_demo_data
    from specialists.sft import build_sft_trainer

    data = write_demo_data(tmp_path / "data", n_train=16, n_eval=4)["agent"]
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "agent", "domain": "agent", "base_model": str(tiny_model_dir),
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": 1, "batch_size": 4, "max_length": 128}, "grpo": {"enabled": False},
        "rewards": [{"name": "math"}]})
    trainer, tokenizer = build_sft_trainer(spec, str(tiny_model_dir), tmp_path / "sft")
    assert trainer.args.assistant_only_loss
    row = trainer.train_dataset[0]
    trained = tokenizer.decode([t for t in row["labels"] if t != -100], skip_special_tokens=False)
    text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    answer = text.rsplit("<|assistant|>", 1)[1].removesuffix("</s>")
    call = text.split("<|assistant|>")[1].split("</s>")[0]
    assert call.startswith('<tool_call name="python">print(') and "<|tool|>" in text
    assert trained.startswith(call) and trained.endswith(answer + "</s>") and "<|tool|>" not in trained
    assert trained.count(answer) == 1  # the result itself is seen once, in the answer: the tool turn is not trained


def test_evaluation_scores_an_agent_on_its_final_answer(tokenizer) -> None:
    from rewards.evaluation import evaluate
    from rewards.registry import build_reward
    from rewards.spec import RewardRef

    rows = [{"prompt": "Compute 4821*7713.", "answer": str(4821 * 7713)},
            {"prompt": "Compute 1234*5678.", "answer": str(1234 * 5678)}]
    engine = ScriptedEngine(tokenizer, ['<tool_call name="calculator">4821 * 7713</tool_call>', str(4821 * 7713)])
    result = evaluate(engine, tokenizer, rows, build_reward([RewardRef(name="math")]), max_new_tokens=64,
                      environment=CALC, max_turns=3)
    assert result.completions == [str(4821 * 7713)] * 2 and result.score == 0.5  # one answer is right
    assert result.tools == {"calls_per_prompt": 1.0, "malformed_call_rate": 0.0, "turns_per_prompt": 2.0}


def test_replay_prints_a_trajectory_turn_by_turn(tokenizer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from controller.cli import app

    log = TrajectoryLog(tmp_path / "run" / "eval-calls-sft.jsonl")
    engine = ScriptedEngine(tokenizer, ['Let me.<tool_call name="calculator">12 * 34</tool_call>', "408"])
    run_agent(engine, tokenizer, [AgentRequest("q0", "12*34?"), AgentRequest("q1", "12*34?")], CALC, log)
    log.close()
    result = CliRunner().invoke(app, ["rollout", "replay", str(tmp_path / "run"), "q1"])
    assert result.exit_code == 0, result.output
    assert "trajectory q1: 1 tool call(s)" in result.stdout and "trajectory q0" not in result.stdout
    assert "turn 0: model: 'Let me.<tool_call name=\"calculator\">12 * 34</tool_call>'" in result.stdout
    assert "call 'calculator': '12 * 34'" in result.stdout and "result [ok] exit None" in result.stdout
    assert ": '408'" in result.stdout
    missing = CliRunner().invoke(app, ["rollout", "replay", str(tmp_path / "run"), "q9"])
    assert missing.exit_code == 1 and "no trajectory 'q9'" in missing.stderr
    (tmp_path / "bad-calls.jsonl").write_text('{"turn": 0}\n')
    bad = CliRunner().invoke(app, ["rollout", "replay", str(tmp_path / "bad-calls.jsonl")])
    assert bad.exit_code == 1 and "line 1 is not a trajectory log record (no call, result, trajectory)" in bad.stderr
