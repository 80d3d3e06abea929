"""End to end: `retort rollout run` on vLLM, SIGKILLed at random points and resumed, matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollout import batch_run
from rollout.config import RolloutRunSpec
from rollout.service import RolloutService
from rollout.wal import recover, segments
from storage.specfile import load_spec
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def start(args: list[str], home: Path) -> subprocess.Popen:
    env = {**os.environ, "RETORT_HOME": str(home), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "rollout", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_tokens(proc: subprocess.Popen, run_dir: Path, attempt: int, timeout: float = 180) -> None:
    """Block until attempt number `attempt` (0-based) is generating: it logged its start and its WAL grew."""
    deadline = time.monotonic() + timeout
    start_size = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        attempts = run_dir / "attempts.jsonl"
        if start_size is None and attempts.exists() and len(attempts.read_text().splitlines()) > attempt:
            start_size = wal_size(run_dir / "wal")
        if start_size is not None and wal_size(run_dir / "wal") > start_size + 2048:
            return
        time.sleep(0.02)
    raise TimeoutError("the rollout never started generating")


def wal_size(wal_dir: Path) -> int:
    return sum(p.stat().st_size for p in segments(wal_dir)) if wal_dir.exists() else 0


def committed_tokens(wal_dir: Path) -> dict[str, int]:
    logs, _ = recover(wal_dir)
    return {rid.split(":", 1)[1]: len(log.token_ids) for rid, log in logs.items() if log.token_ids}


def test_sigkill_at_random_points_then_resume(tmp_path: Path, tiny_model_dir: Path, vllm_engine) -> None:
    prompts = [{"id": f"p{i:03d}", "prompt": f"Question {i}: what is {i} + {2 * i}?"} for i in range(256)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    run_dir = tmp_path / "run"
    spec_path = tmp_path / "rollout.yaml"
    spec_path.write_text(json.dumps({
        "kind": "rollout", "name": "kill", "model": str(tiny_model_dir), "prompts": "prompts.jsonl",
        "chat_template": True, "engine": "vllm", "enforce_eager": True, "max_model_len": 512,
        "sampling": {"max_tokens": 200, "temperature": 0.0}, "output_dir": str(run_dir),
        "wal": {"mode": "group", "interval_ms": 20},
    }))
    spec = load_spec(RolloutRunSpec, spec_path)
    reference = RolloutService(vllm_engine, tmp_path / "reference").run(
        "prompts", batch_run.tokenize_prompts(spec, vllm_engine, batch_run.read_prompts(spec.prompts)))

    rng = random.Random(1234)
    wal_dir = run_dir / "wal"
    after_kill: list[dict[str, int]] = []
    proc = start(["run", str(spec_path)], tmp_path / "home")
    for attempt in range(3):
        wait_for_tokens(proc, run_dir, attempt)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after_kill.append(committed_tokens(wal_dir))
        proc = start(["resume", str(run_dir)], tmp_path / "home")
    wait_for_tokens(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)  # a polite preemption: commit and exit 75
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output
    assert "preempted" in output and "retort rollout resume" in output
    after_kill.append(committed_tokens(wal_dir))
    proc = start(["resume", str(run_dir)], tmp_path / "home")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output

    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]
    assert [r["completion_ids"] for r in rows] == [r.completion_ids for r in reference]  # token for token

    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == len(after_kill) + 1
    regenerated = 0
    for committed, attempt in zip(after_kill, attempts[1:], strict=True):
        # each resume picks up exactly what was committed: no committed token goes back to the engine
        assert attempt["resumed_tokens"] == committed
        regenerated += sum(max(0, committed.get(k, 0) - v) for k, v in attempt["resumed_tokens"].items())
    assert regenerated == 0
    progress = [sum(c.values()) for c in after_kill]
    assert progress == sorted(progress) and progress[0] > 0  # every interruption kept its work
    assert progress[-1] < sum(len(r.completion_ids) for r in reference)  # and really cut the batch short
