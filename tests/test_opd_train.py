"""The distillation loop end to end on vLLM with two toy teachers: it learns, keeps its budgets, resumes."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from controller.cli import app
from opd.config import DistillationRun
from opd.train import Distiller
from storage import jobs
from storage.db import open_store
from tests.conftest import REPO
from tests.toy_domains import add_rows, copy_rows, train_teacher, write_jsonl


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def toy(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("toy-opd")
    teachers = {"add": train_teacher(tiny_model_dir, root / "t-add", add_rows(1000, 1), steps=200),
                "copy": train_teacher(tiny_model_dir, root / "t-copy", copy_rows(1000, 2), steps=200)}
    for name, rows in (("add", add_rows), ("copy", copy_rows)):
        write_jsonl(root / name / "train.jsonl", rows(300, 3))
        write_jsonl(root / name / "eval.jsonl", rows(32, 4))
    return {"root": root, "teachers": teachers}


def spec_for(toy: dict, student: Path, steps: int) -> DistillationRun:
    root = toy["root"]
    return DistillationRun.model_validate({
        "kind": "distillation", "name": "toy", "student": {"init": str(student)},
        "teachers": [{"index": 0, "name": "add", "checkpoint": str(toy["teachers"]["add"])},
                     {"index": 1, "name": "copy", "checkpoint": str(toy["teachers"]["copy"])}],
        "mixture": [{"domain": d, "prompts": str(root / d / "train.jsonl"),
                     "eval_prompts": str(root / d / "eval.jsonl"), "teacher": i, "rewards": [{"name": "exact_match"}],
                     "eval": {"max_prompts": 32, "max_new_tokens": 8}}
                    for i, d in enumerate(("add", "copy"))],
        "steps": steps, "batch_size": 48, "learning_rate": 3e-3, "gradient_accumulation_steps": 2,
        "generation": {"max_new_tokens": 8}, "eval_every": 10, "save_every": 10,
        "chunk_size": 64, "max_resident_heads": 1,
    })


@pytest.mark.slow
def test_distillation_learns_resumes_and_keeps_its_budgets(toy, tiny_model_dir: Path, vllm_engine, store,
                                                          tmp_path: Path) -> None:
    spec = spec_for(toy, tiny_model_dir, steps=40)
    job = jobs.submit(store, "distillation", spec.name, spec.model_dump(mode="json"))
    run_dir = tmp_path / "run"
    original = load_file(tiny_model_dir / "model.safetensors")
    try:
        def crash_at_25(report) -> None:
            if report.step == 25:
                raise Crash("killed")

        with pytest.raises(Crash):
            Distiller(spec, run_dir, store=store, job_id=job.id, engine=vllm_engine).train(crash_at_25)
        resumed = Distiller(spec, run_dir, store=store, job_id=job.id, engine=vllm_engine)
        result = resumed.train()
        assert resumed.start_step == 20  # the last checkpoint before the crash
    finally:
        vllm_engine.load_weights(original.items())  # give the shared engine its base weights back

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["metrics"]["loss"] for row in rows if "loss" in row["metrics"]}
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.8 * first, (first, last)  # the student moved toward its teachers
    for row in rows:
        if "heads/loads_this_step" in row["metrics"]:
            assert row["metrics"]["heads/loads_this_step"] == 2  # each teacher's head once per step
            assert row["metrics"]["heads/max_resident"] == 1  # never more than the configured heads
    assert set(result.table) == {"add", "copy"} and result.table["add"]["teacher"] > 0.5
    # and its held-out score rose: 40 steps from the random base teach the add domain first (0 -> 0.16 here)
    assert result.table["add"]["after"] > result.table["add"]["before"], result.table
    assert json.loads((run_dir / "results.json").read_text())["domains"] == result.table
    assert [c.step for c in jobs.get(store, job.id).checkpoints] == [10, 20, 30, 40]
    assert "loss/teacher1" in jobs.latest_metrics(store, job.id)


@pytest.mark.slow
def test_distillation_on_the_students_own_weights_learns_with_nothing_to_push(toy, tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    data = spec_for(toy, tiny_model_dir, steps=40).model_dump()
    data["generation"]["engine"] = "hf"
    spec = DistillationRun.model_validate(data)
    distiller = Distiller(spec, tmp_path / "run")
    result = distiller.train()
    assert distiller.engine.shared and distiller.engine.model is distiller.accelerator.unwrap_model(distiller.student)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["metrics"]["loss"] for row in rows if "loss" in row["metrics"]}
    assert sum(losses[s] for s in range(36, 41)) < 0.8 * sum(losses[s] for s in range(1, 6))
    assert result.table["add"]["after"] > result.table["add"]["before"], result.table
    steps = [row for row in rows if "time/push" in row["metrics"]]
    assert len(steps) == 40 and all(row["metrics"]["time/push"] < 0.01 for row in steps)  # no weights copied
    for earlier, row in itertools.pairwise(steps):  # the breakdown fits inside the step's wall time
        parts = sum(v for k, v in row["metrics"].items() if k.startswith("time/"))
        assert 0 < parts <= row["time"] - earlier["time"]
    assert len(list((tmp_path / "run" / "rollouts" / "results").glob("step-*.jsonl"))) == 40  # through the WAL


@pytest.mark.slow
def test_distillation_with_the_engine_in_a_rollout_worker_learns_the_same(toy, tiny_model_dir: Path, local_ray,
                                                                       tmp_path: Path) -> None:
    data = spec_for(toy, tiny_model_dir, steps=40).model_dump()
    data["rollout"] = {"weight_sync": "path", "cpus_per_rank": 0.5}
    distiller = Distiller(DistillationRun.model_validate(data), tmp_path / "run")
    result = distiller.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["metrics"]["loss"] for row in rows if "loss" in row["metrics"]}
    assert sum(losses[s] for s in range(36, 41)) < 0.8 * sum(losses[s] for s in range(1, 6))
    assert result.table["add"]["after"] > result.table["add"]["before"], result.table
    steps = [row for row in rows if "time/push" in row["metrics"]]
    assert len(steps) == 40 and all(row["metrics"]["time/push"] > 0 for row in steps)  # weights went over the wire
    worker = tmp_path / "run" / "rollouts" / "worker-0"
    assert len(list((worker / "results").glob("step-*.jsonl"))) == 40  # each step through the worker's own WAL
    assert len(list((tmp_path / "run" / "weights").glob("v*"))) == 1  # pushes in the run directory, latest kept
    assert not local_ray.util.placement_group_table() or all(  # its workers' placement group went with them
        group["state"] == "REMOVED" for group in local_ray.util.placement_group_table().values())


def test_distill_cli_refuses_bad_files(tmp_path: Path, retort_home: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["distill", str(REPO / "configs/demo/pipeline.yaml")])
    assert result.exit_code == 1 and "`retort distill` runs distillation specs" in result.stderr
    broken = tmp_path / "d.yaml"
    broken.write_text(re.sub(r"(?m)^steps: \d+$", "steps: 0", (REPO / "configs/demo/distill.yaml").read_text()))
    result = runner.invoke(app, ["distill", str(broken)])
    assert result.exit_code == 1 and "steps: Input should be greater than 0" in result.stderr


@pytest.mark.slow
def test_off_policy_share_uses_reference_answers(toy, tiny_model_dir: Path, vllm_engine, tmp_path: Path) -> None:
    data = spec_for(toy, tiny_model_dir, steps=2).model_dump()
    data["off_policy_fraction"] = 0.25
    for entry in data["mixture"]:
        entry["completion_field"] = "answer"  # the toy rows' reference column
    spec = DistillationRun.model_validate(data)
    original = load_file(tiny_model_dir / "model.safetensors")
    try:
        Distiller(spec, tmp_path / "run", engine=vllm_engine).train()
    finally:
        vllm_engine.load_weights(original.items())
    generated = (tmp_path / "run" / "rollouts" / "results" / "step-000000.jsonl").read_text().splitlines()
    assert len(generated) == 36  # 48 − 12 references: the student sampled only its own share
    generated_tokens = sum(len(json.loads(line)["completion_ids"]) for line in generated)
    [step] = [row["metrics"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if row["step"] == 1]  # the step trained on step-000000's batch
    # the 12 references were trained on too: each adds its answer and an EOS to the step's tokens
    assert step["tokens"] >= generated_tokens + 12 * 2, (step["tokens"], generated_tokens)


def test_off_policy_indices_are_reproducible_and_sized() -> None:
    from opd.data import off_policy_indices

    assert off_policy_indices(48, 0.25, seed=7) == off_policy_indices(48, 0.25, seed=7)
    assert len(off_policy_indices(48, 0.25, seed=7)) == 12 and off_policy_indices(48, 0.0, seed=7) == set()
    assert off_policy_indices(48, 0.25, seed=7) != off_policy_indices(48, 0.25, seed=8)


def test_prompt_files_are_read_as_one_and_a_bad_row_names_its_file(tmp_path: Path) -> None:
    from opd.data import read_rows

    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1", "completion": "2"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2+2", "completion": "4"}, {"prompt": "3+3", "completion": "6"}])
    rows = read_rows([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert [row["prompt"] for row in rows] == ["1+1", "2+2", "3+3"]
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "4+4"}, {"prompt": 5}])
    with pytest.raises(ValueError, match=f"{tmp_path / 'c.jsonl'}: row 2 has no string 'prompt' field"):
        read_rows([str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")])


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth(tmp_path: Path, tiny_model_dir: Path) -> None:
    from opd.train import learning_rate_at

    paper_toy = {"root": tmp_path, "teachers": {"add": tiny_model_dir, "copy": tiny_model_dir}}
    spec = spec_for(paper_toy, tiny_model_dir, steps=100).model_copy(
        update={"lr_schedule": "cosine", "warmup_steps": 10, "learning_rate": 1.0})
    assert learning_rate_at(0, spec) == pytest.approx(0.1) and learning_rate_at(9, spec) == pytest.approx(1.0)
    assert learning_rate_at(10, spec) == pytest.approx(1.0)
    assert learning_rate_at(55, spec) == pytest.approx(0.55)  # half way: (0.1 + 1) / 2
    assert learning_rate_at(100, spec) == pytest.approx(0.1)
    constant = spec.model_copy(update={"lr_schedule": "constant", "warmup_steps": 0})
    assert {learning_rate_at(s, constant) for s in (0, 50, 99)} == {1.0}
    wsd = spec.model_copy(update={"lr_schedule": "warmup_stable_decay", "decay_steps": 20})
    assert learning_rate_at(0, wsd) == pytest.approx(0.1) and learning_rate_at(9, wsd) == pytest.approx(1.0)
    assert {learning_rate_at(s, wsd) for s in (10, 50, 79)} == {1.0}  # the peak until the last 20 steps
    assert learning_rate_at(89, wsd) == pytest.approx(0.55)  # ten of the twenty decay steps taken
    assert learning_rate_at(99, wsd) == pytest.approx(0.1)  # the last step's rate


def test_a_decay_that_does_not_fit_the_run_is_a_field_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    paper_toy = {"root": tmp_path, "teachers": {"add": tiny_model_dir, "copy": tiny_model_dir}}
    data = spec_for(paper_toy, tiny_model_dir, steps=100).model_dump()
    for update, said in [({"lr_schedule": "warmup_stable_decay"}, "between 1 and steps - warmup_steps (100); got 0"),
                         ({"lr_schedule": "warmup_stable_decay", "decay_steps": 101}, "got 101"),
                         ({"lr_schedule": "cosine", "decay_steps": 10}, "this run's is cosine")]:
        with pytest.raises(ValueError, match=re.escape(said)) as raised:
            DistillationRun.model_validate({**data, **update})
        assert "decay_steps" in str(raised.value)


def test_off_policy_share_moves_from_start_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    from opd.train import off_policy_fraction_at

    paper_toy = {"root": tmp_path, "teachers": {"add": tiny_model_dir, "copy": tiny_model_dir}}
    spec = spec_for(paper_toy, tiny_model_dir, steps=101).model_copy(update={"off_policy_fraction": 0.75})
    assert {off_policy_fraction_at(s, spec) for s in (0, 50, 100)} == {0.75}  # no end: constant
    moving = spec.model_copy(update={"off_policy_fraction_end": 0.25})
    assert [off_policy_fraction_at(s, moving) for s in (0, 50, 100)] == pytest.approx([0.75, 0.5, 0.25])


@pytest.mark.slow
def test_distill_killed_then_run_again_resumes_its_one_job(toy, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`retort distill FILE` SIGKILLed after a checkpoint, then run again: the same job row takes over (no
    copy), resumes from the checkpoint, and succeeds; meanwhile a second writer is refused by name."""
    home = tmp_path / "home"
    env = {**os.environ, "RETORT_HOME": str(home), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    spec_path = tmp_path / "toy.yaml"
    spec_path.write_text(json.dumps(spec_for(toy, tiny_model_dir, steps=30).model_dump(mode="json")))
    cli = [sys.executable, "-m", "controller.cli", "distill", str(spec_path)]
    first = subprocess.Popen(cli, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        checkpoint = home / "runs" / "distillation" / "toy" / "checkpoints" / "step-000010"
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else "slow"
            time.sleep(0.05)
        second = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "is being written by job 1 (distill@" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    again = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming distillation job 1 (running, attempt 1 of 3)" in again.stdout
    store = open_store(f"sqlite:///{home / 'retort.db'}")
    assert [j.id for j in jobs.list_jobs(store)] == [1]
    job = jobs.get(store, 1)
    assert (job.state, job.attempts) == ("succeeded", 2) and "died" in job.error
    losses = [m.step for m in job.metrics if m.name == "loss"]
    assert losses.count(1) == 1 and max(losses) == 30  # resumed from step 10, not started over


def test_an_agent_domain_distils_over_trajectories_scoring_the_students_own_tokens(tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """A mixture entry with tools: the student's answers are multi-turn trajectories through the rollout service
    (every call in calls.jsonl) or its demonstrations (the off-policy share), the teacher scores them with tool
    results as context only, and the domain is evaluated with its tools. The student's turns are scripted (the
    loop's bookkeeping is what is checked); the teacher, its trunk and head and the student's training are real."""
    from transformers import AutoTokenizer

    from rollout.agent import TrajectoryLog, reference_trajectory
    from rollout.engine import encode_prompt
    from tests.test_agent_loop import ScriptedEngine

    class ScriptedStudent(ScriptedEngine):
        model_path, max_model_len, pushes = str(tiny_model_dir), 512, 0

        def load_weights(self, named_tensors) -> None:
            self.pushes += sum(1 for _ in named_tensors)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    script = ['<tool_call name="calculator">12 * 34</tool_call>', "408"]
    engine = ScriptedStudent(tokenizer, script)
    demonstration = [{"role": "assistant", "content": script[0]}, {"role": "tool", "content": "408"},
                     {"role": "assistant", "content": script[1]}]
    rows = [{"prompt": f"What is 12 * 34? ({i})", "answer": "408", "completion": demonstration} for i in range(8)]
    write_jsonl(tmp_path / "agent" / "train.jsonl", rows)
    write_jsonl(tmp_path / "agent" / "eval.jsonl", rows[:4])
    spec = DistillationRun.model_validate({
        "kind": "distillation", "name": "agent", "student": {"init": str(tiny_model_dir)},
        "teachers": [{"index": 0, "name": "agent", "checkpoint": str(tiny_model_dir)}],
        "mixture": [{"domain": "agent", "prompts": str(tmp_path / "agent" / "train.jsonl"),
                     "eval_prompts": str(tmp_path / "agent" / "eval.jsonl"), "teacher": 0,
                     "rewards": [{"name": "exact_match"}], "eval": {"max_prompts": 4, "max_new_tokens": 64},
                     "tools": [{"name": "calculator"}], "agent": {"max_turns": 3}}],
        "steps": 2, "batch_size": 4, "learning_rate": 1e-3, "off_policy_fraction": 0.5,
        "generation": {"max_new_tokens": 96}, "eval_every": 2, "save_every": 2, "chunk_size": 64})
    result = Distiller(spec, tmp_path / "run", engine=engine).train()

    own = sum(len(tokenizer(turn, add_special_tokens=False)["input_ids"]) + 1 for turn in script)  # + EOS each
    prompt_ids, ids, mask = reference_trajectory(tokenizer, rows[0]["prompt"], demonstration)
    assert prompt_ids == encode_prompt(tokenizer, rows[0]["prompt"]) and sum(mask) == own < len(ids)
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "".join(f"{t}</s>" for t in script)
    rows_logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = [row["metrics"]["tokens"] for row in rows_logged if "tokens" in row["metrics"]]
    assert tokens == [4 * own, 4 * own]  # the student's and the demonstrations' own tokens; tool results unscored
    calls = TrajectoryLog.read(tmp_path / "run" / "calls.jsonl")
    assert len(calls) == 4 and {c["trajectory"].split("/")[0] for c in calls} == {"step-000000-agent",
                                                                                   "step-000001-agent"}
    assert {c["result"]["output"] for c in calls} == {"408"}  # half of each batch generated, half demonstrations
    batches = sorted(p.stem for p in (tmp_path / "run" / "rollouts" / "batches").iterdir())
    assert batches == ["step-000000", "step-000000-agent.turn1", "step-000001", "step-000001-agent.turn1"]
    first_turns = [json.loads(line)["id"] for line in
                   (tmp_path / "run" / "rollouts" / "batches" / "step-000000.jsonl").read_text().splitlines()]
    assert first_turns == ["agent/0/0", "agent/1/0"]  # turn 0 in the step's batch, beside any other domain's
    assert result.table["agent"]["after"] == 1.0  # scored on its last turn, after the calculator answered
    assert engine.pushes > 0

    write_jsonl(tmp_path / "plain" / "train.jsonl", [{**row, "completion": "408"} for row in rows])
    plain = spec.model_dump()
    plain["mixture"][0]["prompts"] = [str(tmp_path / "plain" / "train.jsonl")]
    with pytest.raises(ValueError, match="domain 'agent' answers in turns, so its reference answers"):
        Distiller(DistillationRun.model_validate(plain), tmp_path / "plain-run", engine=engine).setup()
