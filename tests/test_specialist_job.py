"""A specialist job end to end on the tiny model: base score, SFT (TRL), GRPO (TRL + rollout service on vLLM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from controller.cli import app
from rollout.wal import ResetRecord, recover, segments
from specialists.config import SpecialistJob
from specialists.domains import write_demo_data
from specialists.job import run_specialist
from storage import jobs
from storage.db import open_store
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def math_spec(tiny_model_dir: Path, tmp_path: Path, **extra) -> SpecialistJob:
    data = write_demo_data(tmp_path / "data", n_train=800, n_eval=40)["math"]
    return SpecialistJob.model_validate({
        "kind": "specialist", "name": "math", "domain": "math", "base_model": str(tiny_model_dir),
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": 120, "learning_rate": 3e-3, "batch_size": 64, "max_length": 64, "save_steps": 60},
        "grpo": {"max_steps": 4, "learning_rate": 5e-4, "batch_size": 16, "num_generations": 8,
                 "max_completion_length": 6, "save_steps": 2},
        "rewards": [{"name": "math"}], "eval": {"max_prompts": 40, "max_new_tokens": 6}, **extra,
    })


def check_learned(store, job_id: int, results: dict, run_dir: Path) -> None:
    """What a specialist job must show, wherever its engine runs."""
    assert list(results) == ["base", "sft", "grpo"]
    stored = jobs.get(store, job_id)
    assert [(c.phase, Path(c.path).name) for c in stored.checkpoints][:2] == [("sft", "final"), ("grpo", "final")]
    sft_losses = [m.value for m in stored.metrics if m.phase == "sft" and m.name == "loss"]
    assert len(sft_losses) >= 10 and sft_losses[-1] < 0.6 * sft_losses[0]  # SFT learned the format
    assert results["sft"].eval.score > results["base"].eval.score  # and the engine scored the SFT weights
    grpo_names = {m.name for m in stored.metrics if m.phase == "grpo"}
    assert {"reward", "rewards/math/mean", "eval/score"} <= grpo_names
    assert json.loads((run_dir / "final.json").read_text())["checkpoint"].endswith("grpo/final")


def test_math_specialist_phases_metrics_and_resume(tiny_model_dir: Path, vllm_engine, store, tmp_path: Path) -> None:
    spec = math_spec(tiny_model_dir, tmp_path)
    job = jobs.submit(store, "specialist", spec.name, spec.model_dump(mode="json"))
    run_dir = tmp_path / "run"
    original = load_file(tiny_model_dir / "model.safetensors")
    try:
        results = run_specialist(spec, run_dir, store=store, job_id=job.id, engine=vllm_engine)
        again = run_specialist(spec, run_dir, store=store, job_id=job.id, engine=vllm_engine)  # phases are done
    finally:
        vllm_engine.load_weights(original.items())
    check_learned(store, job.id, results, run_dir)
    assert {p: r.eval.score for p, r in again.items()} == {p: r.eval.score for p, r in results.items()}
    assert list((run_dir / "grpo" / "rollouts" / "results").glob("*.jsonl"))  # rollouts went through the service


def test_math_specialist_with_its_engine_in_a_rollout_worker(tiny_model_dir: Path, local_ray, store,
                                                             tmp_path: Path) -> None:
    spec = math_spec(tiny_model_dir, tmp_path, rollout={"weight_sync": "broadcast", "cpus_per_rank": 0.5})
    job = jobs.submit(store, "specialist", spec.name, spec.model_dump(mode="json"))
    results = run_specialist(spec, tmp_path / "run", store=store, job_id=job.id)
    check_learned(store, job.id, results, tmp_path / "run")
    assert len(list((tmp_path / "run" / "grpo" / "rollouts" / "worker-0" / "results").glob("*.jsonl"))) >= 4


def test_run_job_refuses_what_it_cannot_run(retort_home: Path) -> None:
    runner = CliRunner()
    runner.invoke(app, ["submit", str(REPO / "configs/demo/distill.yaml")])
    result = runner.invoke(app, ["run-job", "1"])
    assert result.exit_code == 1 and "job 1 is a distillation job" in result.stderr
    result = runner.invoke(app, ["run-job", "9"])
    assert result.exit_code == 1 and "no job with id 9" in result.stderr


def wal_records(wal_dir: Path) -> list:
    """Every committed record of a WAL directory, decoded (read only: unlike `recover`, nothing is truncated)."""
    from rollout.wal import HEADER, RECORD_HEADER, decode

    records = []
    for path in segments(wal_dir):
        data, offset = path.read_bytes(), HEADER.size
        while offset + RECORD_HEADER.size <= len(data):
            length, _ = RECORD_HEADER.unpack_from(data, offset)
            start = offset + RECORD_HEADER.size
            if start + length > len(data):
                break  # the torn tail of the killed writer
            records.append(decode(data[start:start + length]))
            offset = start + length
    return records


def kill_while_generating(proc: subprocess.Popen, rollouts: Path, batch_at_least: int, after: Path | None = None,
                          timeout: float = 300) -> tuple[str, dict[str, int]]:
    """SIGKILL `proc` once a generation batch of step >= `batch_at_least` (and `after`, if given, exists) has
    committed tokens but is unfinished; returns the batch and its committed tokens per rollout id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        if after is None or after.exists():
            for stored in sorted((rollouts / "batches").glob("step-*.jsonl")) if rollouts.exists() else []:
                batch = stored.stem
                if int(batch.split("-")[1]) < batch_at_least or (rollouts / "results" / stored.name).exists():
                    continue
                wal = rollouts / "wal"
                if wal.exists() and sum(p.stat().st_size for p in segments(wal)) > 8192:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    logs, report = recover(wal)
                    assert report.duplicates == 0
                    committed = {key.split(":", 1)[1]: len(log.token_ids) for key, log in logs.items()
                                 if key.startswith(f"{batch}:") and log.token_ids}
                    assert committed, f"{batch}: no committed tokens at the kill"
                    return batch, committed
        time.sleep(0.01)
    proc.kill()
    raise TimeoutError(f"no unfinished generation batch of step >= {batch_at_least} to kill")


def test_grpo_killed_mid_generation_resumes_its_batches_from_the_wal(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL during the first generation batch (before any checkpoint) and again mid-run: every retry of
    `retort run-job` succeeds, each interrupted batch continues from its committed tokens (no RESET, no
    duplicate records), and the run completes."""
    home = tmp_path / "home"
    env = {**os.environ, "RETORT_HOME": str(home), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    data = write_demo_data(tmp_path / "data", n_train=64, n_eval=4)["math"]
    spec_path = tmp_path / "math.yaml"
    spec_path.write_text(json.dumps({  # GRPO from the random base: answers run to their 384-token budget
        "kind": "specialist", "name": "math", "domain": "math", "base_model": str(tiny_model_dir),
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"enabled": False},
        "grpo": {"max_steps": 8, "learning_rate": 1e-4, "batch_size": 16, "num_generations": 8,
                 "max_completion_length": 384, "save_steps": 3, "gradient_checkpointing": False},
        "rewards": [{"name": "math"}], "eval": {"max_prompts": 4, "max_new_tokens": 4}, "max_attempts": 3,
    }))
    cli = [sys.executable, "-m", "controller.cli"]
    subprocess.run([*cli, "submit", str(spec_path)], env=env, cwd=REPO, check=True, capture_output=True)
    grpo_dir = home / "runs" / "specialist" / "math" / "grpo"
    rollouts = grpo_dir / "rollouts"

    def run_job() -> subprocess.Popen:
        return subprocess.Popen([*cli, "run-job", "1"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    killed = [kill_while_generating(run_job(), rollouts, batch_at_least=0)]  # before any checkpoint
    assert killed[0][0] == "step-000000-gen-00" and not list(grpo_dir.glob("checkpoint-*"))
    killed.append(kill_while_generating(run_job(), rollouts, batch_at_least=4, after=grpo_dir / "checkpoint-3"))
    assert not [r for r in wal_records(rollouts / "wal") if isinstance(r, ResetRecord)]
    last = subprocess.run([*cli, "run-job", "1"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stdout + last.stderr

    job = jobs.get(open_store(f"sqlite:///{home / 'retort.db'}"), 1)
    assert (job.state, job.attempts) == ("succeeded", 3)
    steps = [m.step for m in job.metrics if m.phase == "grpo" and m.name == "loss"]
    assert steps.count(1) == 1 and max(steps) == 8  # the last attempt resumed from a checkpoint
    attempts = [json.loads(line) for line in (rollouts / "attempts.jsonl").read_text().splitlines()]
    for batch, committed in killed:
        [resumed] = [a for a in attempts if a["batch"] == batch and a["resumed_tokens"]]
        assert resumed["resumed_tokens"] == committed  # continued from every committed token, none regenerated
        assert resumed["recovery"]["duplicates"] == 0
        finished = {r["id"]: r for r in map(json.loads, (rollouts / "results" / f"{batch}.jsonl").open())}
        for rid, n in committed.items():
            assert len(finished[rid]["completion_ids"]) >= n


def test_resume_skips_a_checkpoint_killed_mid_save(tmp_path: Path) -> None:
    from specialists.fit import last_checkpoint

    assert last_checkpoint(tmp_path / "nothing") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        directory = tmp_path / f"checkpoint-{step}"
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"x")
        if complete:
            (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text('{"global_st')  # torn
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
