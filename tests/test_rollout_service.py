"""The rollout service: preemption and resume, stale policies, and `retort rollout run/resume`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from controller.cli import app
from rollout.service import Preempted, RolloutRequest, RolloutService
from rollout.wal import CommitPolicy, recover


@pytest.fixture(scope="module")
def requests(tiny_model_dir: Path) -> list[RolloutRequest]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [RolloutRequest(f"q{i}", tuple(tokenizer(f"<|user|>{i}+{i}=\n<|assistant|>")["input_ids"]), 24 + i,
                           temperature=0.0, metadata={"domain": "math", "teacher": i % 2}) for i in range(8)]


def stop_after(service: RolloutService, steps: int):
    seen = 0

    def on_step(_progress) -> None:
        nonlocal seen
        seen += 1
        if seen == steps:
            service.request_stop()

    return on_step


@pytest.mark.parametrize("engine_name", ["hf_engine", "vllm_engine"])
def test_preempted_batch_resumes_token_for_token(engine_name: str, request, tmp_path: Path, requests) -> None:
    engine = request.getfixturevalue(engine_name)
    reference = RolloutService(engine, tmp_path / "ref").run("b0", requests)
    assert [r.metadata for r in reference] == [r.metadata for r in requests]

    first = RolloutService(engine, tmp_path / "run")
    with pytest.raises(Preempted, match="rollouts of batch 'b0' finished"):
        first.run("b0", requests, on_step=stop_after(first, 10))
    committed = {rid: len(log.token_ids) for rid, log in recover(tmp_path / "run" / "wal")[0].items()}
    assert sum(committed.values()) == first.tokens_generated  # stop commits everything generated

    second = RolloutService(engine, tmp_path / "run")
    assert second.unfinished_batches() == ["b0"]
    resumed = second.resume()["b0"]
    assert [r.completion_ids for r in resumed] == [r.completion_ids for r in reference]
    assert [r.finish_reason for r in resumed] == [r.finish_reason for r in reference]
    total = sum(len(r.completion_ids) for r in reference)
    assert second.tokens_generated == total - sum(committed.values())  # nothing committed was generated again
    attempt = [json.loads(line) for line in (tmp_path / "run" / "attempts.jsonl").read_text().splitlines()][-1]
    assert attempt["resumed_tokens"] == {k.split(":", 1)[1]: v for k, v in committed.items() if v}
    assert second.results("b0")[3].completion_ids == reference[3].completion_ids
    assert second.unfinished_batches() == []


def test_stale_policy_rules(hf_engine, tmp_path: Path, requests) -> None:
    for rule in ("continue", "discard"):
        run_dir = tmp_path / rule
        first = RolloutService(hf_engine, run_dir, policy_version=0)
        with pytest.raises(Preempted):
            first.run("b", requests, on_step=stop_after(first, 5))
        later = RolloutService(hf_engine, run_dir, policy_version=1, stale_policy=rule)  # newer weights now
        rollouts = later.resume()["b"]
        versions = rollouts[-1].policy_versions
        if rule == "continue":
            assert versions[:5] == [0] * 5 and set(versions[5:]) == {1}
        else:
            assert set(versions) == {1} and later.tokens_generated == sum(len(r.completion_ids) for r in rollouts)


def test_batch_rules(hf_engine, tmp_path: Path, requests) -> None:
    service = RolloutService(hf_engine, tmp_path)
    with pytest.raises(ValueError, match="request ids must be unique"):
        service.run("b", [requests[0], requests[0]])
    service.run("b", requests[:2])
    with pytest.raises(ValueError, match="batch 'b' already exists"):
        service.run("b", requests[:2])
    service.run("c", requests[2:4])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["b.jsonl", "c.jsonl"]
    assert recover(tmp_path / "wal")[0] == {}  # finished batches are compacted away


class ScriptedEngine:
    """Replays fixed engine steps: pure bookkeeping logic, no model (the real engines are tested above)."""

    eos_token_id, max_model_len, model_path = 0, 64, "scripted"

    def __init__(self, steps):
        self.steps = steps

    def generate(self, requests):
        yield from self.steps

    def load_weights(self, named_tensors) -> None:
        pass


def test_one_token_steps_and_uneven_chunks_log_the_same_tokens(tmp_path: Path) -> None:
    from rollout.engine import TokenChunk as C

    steps = [
        [C("a", [5], [-0.5]), C("b", [6], [-0.25])],  # one token each: a STEP record
        [C("b", [7, 8], [-1.0, -2.0]), C("a", [9], [-0.125])],  # uneven: TOKENS records
        [C("a", [], [], "length"), C("b", [0], [-3.0], "stop")],
    ]
    service = RolloutService(ScriptedEngine(steps), tmp_path, commit=CommitPolicy("none"))
    requests = [RolloutRequest("a", (1, 2), 8), RolloutRequest("b", (3,), 8)]
    with pytest.raises(Preempted):  # stop before the last step: the WAL must hold the first two
        service.run("x", requests, on_step=stop_after(service, 2))
    logs, _ = recover(tmp_path / "wal")
    assert logs["x:a"].token_ids == [5, 9] and logs["x:b"].token_ids == [6, 7, 8]
    assert logs["x:b"].logprobs == [-0.25, -1.0, -2.0] and logs["x:a"].next_seq == 2
    finished = RolloutService(ScriptedEngine(steps[2:]), tmp_path).resume()["x"]
    assert [(r.completion_ids, r.logprobs, r.finish_reason) for r in finished] == [
        ([5, 9], [-0.5, -0.125], "length"), ([6, 7, 8, 0], [-0.25, -1.0, -2.0, -3.0], "stop")]
    assert finished[1].policy_versions == [0, 0, 0, 0]


# --- the command line ----------------------------------------------------------------------

runner = CliRunner()


def write_spec(tmp_path: Path, model: Path, prompts: list[dict], **extra) -> Path:
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    fields = {"kind": "rollout", "name": "t", "model": str(model), "prompts": "prompts.jsonl", "engine": "hf",
              "max_model_len": 512, "sampling": {"max_tokens": 16, "temperature": 0.0}, **extra}
    path = tmp_path / "rollout.yaml"
    path.write_text(json.dumps(fields))  # JSON is YAML
    return path


def test_cli_rollout_run_writes_completions(tmp_path: Path, retort_home: Path, tiny_model_dir: Path) -> None:
    prompts = [{"id": f"p{i}", "prompt": f"{i}+1="} for i in range(5)]
    result = runner.invoke(app, ["rollout", "run", str(write_spec(tmp_path, tiny_model_dir, prompts))])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.split("run id: ")[1].split()[0]
    run_dir = Path(result.stdout.split("run dir: ")[1].split()[0])
    assert run_dir == retort_home / "rollouts" / run_id
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row in rows:
        assert {"id", "completion", "completion_ids", "finish_reason"} <= row.keys()
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        assert 1 <= len(row["completion_ids"]) <= 16
    again = runner.invoke(app, ["rollout", "resume", run_id])  # a finished run resumes to the same file
    assert again.exit_code == 0, again.output
    assert [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()] == rows


def test_cli_rollout_bad_input(tmp_path: Path, retort_home: Path, tiny_model_dir: Path) -> None:
    spec = write_spec(tmp_path, tmp_path / "no-model", [{"id": "a", "prompt": "x"}])
    result = runner.invoke(app, ["rollout", "run", str(spec)])
    assert result.exit_code == 1 and f"error: model {tmp_path / 'no-model'}: no such directory" in result.stderr

    spec = write_spec(tmp_path, tiny_model_dir, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y" * 600}])
    result = runner.invoke(app, ["rollout", "run", str(spec)])
    assert result.exit_code == 1
    assert "prompts.jsonl:2: prompt 'b' is 600 tokens, the model's context is 512" in result.stderr

    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    result = runner.invoke(app, ["rollout", "run", str(spec)])
    assert result.exit_code == 1 and "prompts.jsonl:2: id 'a' already used on line 1" in result.stderr
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "x"}\nnot json\n')
    result = runner.invoke(app, ["rollout", "run", str(spec)])
    assert result.exit_code == 1 and "prompts.jsonl:2: not valid JSON" in result.stderr

    result = runner.invoke(app, ["rollout", "resume", "no-such-run"])
    assert result.exit_code == 1 and "error: no rollout run 'no-such-run'" in result.stderr

    run_dir = tmp_path / "fake-run"
    (run_dir / "wal").mkdir(parents=True)
    (run_dir / "wal" / "junk.bin").write_text("junk")
    (run_dir / "batches").mkdir()
    (run_dir / "batches" / "prompts.jsonl").write_text("")
    write_spec(tmp_path, tiny_model_dir, [{"id": "a", "prompt": "x"}])
    from rollout.config import RolloutRunSpec
    from storage.specfile import load_spec

    stored = {"run_id": "fake", "spec": load_spec(RolloutRunSpec, tmp_path / "rollout.yaml").model_dump(mode="json")}
    (run_dir / "spec.json").write_text(json.dumps(stored))
    result = runner.invoke(app, ["rollout", "resume", str(run_dir)])
    assert result.exit_code == 1 and "is not a WAL directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_timings_add_up_and_a_finished_batch_keeps_an_unfinished_ones_records(hf_engine, tmp_path: Path,
                                                                                requests) -> None:
    service = RolloutService(hf_engine, tmp_path / "run")
    with pytest.raises(Preempted):
        service.run("b0", requests, on_step=stop_after(service, 3))
    kept = {rid: log.token_ids for rid, log in recover(tmp_path / "run" / "wal")[0].items()}
    assert any(kept.values())
    service._stop = False
    rollouts = service.run("b1", [RolloutRequest(f"x{r.id}", r.prompt_ids, 4, temperature=0.0) for r in requests])
    # b1 finished, so its records left the WAL; b0 is still unfinished, so its committed tokens stayed
    assert {rid: log.token_ids for rid, log in recover(tmp_path / "run" / "wal")[0].items()} == kept
    assert service.unfinished_batches() == ["b0"]
    timings = service.timings
    assert timings.batches == 1 and timings.tokens == sum(len(r.completion_ids) for r in rollouts)
    assert timings.engine > 0 and timings.wal > 0 and timings.files > 0
    before = service.timings_snapshot()
    service.load_weights(hf_engine.model.state_dict().items(), version=1)
    assert service.timings.since(before).push > 0 and service.timings.since(before).engine == 0
    assert RolloutService(hf_engine, tmp_path / "run").resume()["b0"]  # and it resumes as before
