"""Real jobs through the controller on a local Ray: a small pipeline end to end, and a worker killed mid-job.

Each runs against one database: PostgreSQL in CI (`run_db_url`), SQLite elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from controller.controller import Controller
from controller.pipeline import Pipeline, submit_pipeline
from specialists.domains import write_demo_data
from storage import jobs

pytestmark = pytest.mark.slow


def _specialist(name: str, domain: str, base: Path, data: Path, rewards: list, **sft) -> dict:
    return {
        "kind": "specialist", "name": name, "domain": domain, "base_model": str(base),
        "datasets": {"train": str(data / domain / "train.jsonl"), "eval": str(data / domain / "eval.jsonl")},
        "sft": {"max_steps": 30, "learning_rate": 3e-3, "batch_size": 32, "max_length": 96, "save_steps": 15, **sft},
        "grpo": {"enabled": False}, "rewards": rewards, "eval": {"max_prompts": 8, "max_new_tokens": 24},
        "resources": {"cpus": 1}, "max_attempts": 2,
    }


def _until_final(store, job_id: int):
    return lambda: jobs.get(store, job_id).state in {s.value for s in jobs.FINAL_STATES}


def test_pipeline_runs_specialists_then_distillation(run_store, run_db_url: str, retort_home: Path,
                                                      tiny_model_dir: Path, tmp_path: Path, local_ray) -> None:
    data = tmp_path / "data"
    write_demo_data(data, n_train=300, n_eval=8)
    pipeline = Pipeline.model_validate({
        "kind": "pipeline", "name": "small",
        "specialists": [_specialist("math", "math", tiny_model_dir, data, [{"name": "math"}]),
                        _specialist("code", "code", tiny_model_dir, data, [{"name": "code"}])],
        "distillation": {
            "kind": "distillation", "name": "student", "student": {"init": str(tiny_model_dir)},
            "teachers": [{"index": 0, "name": "math", "specialist": "math"},
                         {"index": 1, "name": "code", "specialist": "code"}],
            "mixture": [{"domain": d, "prompts": str(data / d / "train.jsonl"),
                         "eval_prompts": str(data / d / "eval.jsonl"), "teacher": i, "rewards": [{"name": d}],
                         "eval": {"max_prompts": 8, "max_new_tokens": 24}}  # as the specialists are scored
                        for i, d in enumerate(["math", "code"])],
            "steps": 2, "batch_size": 8, "learning_rate": 1e-3, "eval_every": 2,
            "save_every": 2, "generation": {"max_new_tokens": 16}, "resources": {"cpus": 2},
        },
    })
    parent, members = submit_pipeline(run_store, pipeline)
    events = []
    ctl = Controller(run_store, run_db_url, poll_s=0.2, on_event=events.append)
    ctl.connect()
    ctl.run(until=_until_final(run_store, parent.id), timeout_s=600)

    assert jobs.get(run_store, parent.id).state == "succeeded", jobs.get(run_store, parent.id).error
    math, code, student = (jobs.get(run_store, m.id) for m in members)
    assert [m.state for m in (math, code, student)] == ["succeeded"] * 3
    launched = [e.job_id for e in events if e.what == "launched"]
    assert launched.index(student.id) > max(launched.index(math.id), launched.index(code.id))
    run_root = retort_home / "runs" / "pipeline" / f"small-{parent.id}"
    teachers = student.spec["teachers"]  # the controller filled in the specialists' checkpoints
    assert [Path(t["checkpoint"]).relative_to(run_root).parts[:2] for t in teachers] == [
        ("math", "sft"), ("code", "sft")]
    results = json.loads((run_root / "student" / "results.json").read_text())
    assert set(results["domains"]) == {"math", "code"}
    names = {m.name for m in student.metrics}
    assert {"loss", "eval/math/score", "eval/code/score"} <= names
    assert all(m.process is None and m.attempts == 1 for m in (math, code, student))


def test_killed_worker_is_retried_from_its_checkpoint(run_store, run_db_url: str, retort_home: Path,
                                                       tiny_model_dir: Path, tmp_path: Path, local_ray) -> None:
    data = tmp_path / "data"
    write_demo_data(data, n_train=2000, n_eval=8)
    spec = _specialist("math", "math", tiny_model_dir, data, [{"name": "math"}], max_steps=120, save_steps=20)
    job = jobs.submit(run_store, "specialist", "math", spec, max_attempts=2)
    killed: list[int] = []

    def kill_once_a_checkpoint_exists() -> bool:
        current = jobs.get(run_store, job.id)
        if not killed and current.process and any(m.name == "loss" and m.step >= 40 for m in current.metrics):
            pid = int(current.process.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)  # the Ray worker process running the job
            killed.append(pid)
        return current.state in {s.value for s in jobs.FINAL_STATES}

    events = []
    ctl = Controller(run_store, run_db_url, poll_s=0.2, on_event=events.append)
    ctl.connect()
    ctl.run(until=kill_once_a_checkpoint_exists, timeout_s=600)

    done = jobs.get(run_store, job.id)
    assert killed and done.state == "succeeded" and done.attempts == 2
    assert "worker process died" in done.error
    assert [e.what for e in events if e.job_id == job.id] == ["launched", "retried", "launched", "succeeded"]
    resumed = [m.value for m in done.metrics if m.name == "resumed_from_step"]
    assert resumed and resumed[0] >= 20  # the second attempt picked up at a saved checkpoint, not step 0
    steps = sorted({m.step for m in done.metrics if m.phase == "sft" and m.name == "loss"})
    assert steps[-1] == 120
