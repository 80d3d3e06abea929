"""One job runner: `retort run-job` and `retort distill` share `controller.worker.run_in_foreground`, a run
directory has one writer, the same distillation file resumes its job, and cancel stops a foreground run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from specialists.domains import write_demo_data
from storage import jobs
from storage.db import open_store
from storage.runlock import RunDirLocked, RunLock
from tests.conftest import REPO

CLI = [sys.executable, "-m", "controller.cli"]


def test_a_run_directory_has_one_writer_and_a_dead_one_holds_nothing(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run", holder="job 3 (distill@host:123)"), \
            pytest.raises(RunDirLocked, match=r"is being written by job 3 \(distill@host:123\)"), \
            RunLock(tmp_path / "run", holder="job 4 (controller)"):
        pass
    with RunLock(tmp_path / "run", holder="job 4 (controller)"):  # released on exit
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from storage.runlock import RunLock\n"
                               f"with RunLock({str(tmp_path / 'run')!r}, 'job 5 (killed)'):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunDirLocked, match=r"job 5 \(killed\)"):
        RunLock(tmp_path / "run", holder="me").__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path / "run", holder="me"):  # the kernel dropped the dead holder's lock
        pass


def test_distill_queue_twice_is_one_job_and_another_spec_is_refused(tmp_path: Path, retort_home: Path) -> None:
    runner = CliRunner()
    spec = REPO / "configs/demo/distill.yaml"
    first = runner.invoke(app, ["distill", str(spec), "--queue"])
    again = runner.invoke(app, ["distill", str(spec), "--queue"])
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    assert "resuming distillation job 1" in again.stdout
    assert [j.id for j in jobs.list_jobs(open_store())] == [1]
    other = tmp_path / "other.yaml"
    text = re.sub(r"(?m)^steps: \d+$", "steps: 10", spec.read_text())
    other.write_text(text.replace("../rubrics/", f"{REPO / 'configs/rubrics'}/"))
    refused = runner.invoke(app, ["distill", str(other), "--queue"])
    assert refused.exit_code == 1 and "job 1 ('demo-student') is queued with another spec" in refused.stderr


@pytest.mark.slow
def test_cancel_stops_a_foreground_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "RETORT_HOME": str(home), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    data = write_demo_data(tmp_path / "data", n_train=64, n_eval=4)["math"]
    spec = tmp_path / "math.yaml"
    spec.write_text(json.dumps({
        "kind": "specialist", "name": "math", "domain": "math", "base_model": str(tiny_model_dir),
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": 100000, "batch_size": 8, "max_length": 64, "save_steps": 100000},
        "grpo": {"enabled": False},
        "rewards": [{"name": "math"}], "eval": {"max_prompts": 4, "max_new_tokens": 4}}))
    subprocess.run([*CLI, "submit", str(spec)], env=env, cwd=REPO, check=True, capture_output=True)
    # Started with SIGINT ignored, as a non-interactive shell starts a background job (`retort run-job 1 &`):
    # the cancel must stop it all the same.
    proc = subprocess.Popen([*CLI, "run-job", "1"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        store = open_store(f"sqlite:///{home / 'retort.db'}")
        deadline = time.monotonic() + 300
        while not (jobs.get(store, 1).progress or "").startswith("sft step"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        second = subprocess.run([*CLI, "run-job", "1"], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1 and "is being written by job 1 (run-job@" in second.stderr  # one writer
        cancelled = subprocess.run([*CLI, "cancel", "1"], env=env, cwd=REPO, capture_output=True, text=True)
        assert cancelled.returncode == 0, cancelled.stderr
        started = time.monotonic()
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a 100,000-step SFT must not outlive a failed assertion
    assert proc.returncode == 1 and "job 1 was cancelled" in output, output
    assert time.monotonic() - started < 30  # the lease renews every 5 s; then it stops
    job = jobs.get(store, 1)
    assert job.state == "cancelled" and job.finished_at is not None
