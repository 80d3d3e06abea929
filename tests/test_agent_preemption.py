"""Multi-turn agent rollouts SIGKILLed mid-trajectory and run again: the same trajectories as a run never
killed, and every tool call executed once across all the attempts (again only where the kill took its answer
before the log had it).

The model is the tiny base after a short SFT on the demo's agent domain (it writes python calls); vLLM generates
in a child process (tests/agent_rollout_child.py), the real sandboxed python tool answers, and the kill points
are spread over the trajectory: while turn 0 generates, while its calls run, and in turn 1, each after a random
delay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def start(model: Path, prompts: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return subprocess.Popen([sys.executable, "-m", "tests.agent_rollout_child", str(model), str(prompts),
                             str(run_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """Wait for `ready()` while the child runs; False if the child finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stdout.read()
            return False
        time.sleep(0.01)
    raise TimeoutError("the agent rollout never reached its kill point")


def test_sigkill_mid_trajectory_then_resume(tmp_path: Path, agent_model: tuple[Path, Path]) -> None:
    model, data = agent_model
    prompts = data / "eval.jsonl"
    reference = start(model, prompts, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()
    expected = json.loads((tmp_path / "reference" / "trajectories.json").read_text())
    assert sum(len(t["calls"]) for t in expected) >= len(expected)  # the model does call its tool

    run = tmp_path / "killed"
    rng = random.Random(7)
    wal_grew = lambda: any(p.stat().st_size > 2048 for p in (run / "wal").glob("*")) if (run / "wal").exists() \
        else False  # noqa: E731
    calls_logged = lambda: (run / "calls.jsonl").exists() and (run / "calls.jsonl").stat().st_size > 0  # noqa: E731
    in_turn1 = lambda: (run / "batches" / "agent.turn1.jsonl").exists()  # noqa: E731
    killed_at, killed = [], set()
    for point, delay in ((wal_grew, 0.05), (calls_logged, 0.5), (in_turn1, 0.3)):
        proc = start(model, prompts, run)
        if not wait_until(proc, point):
            continue  # that part of the trajectories was already done
        time.sleep(rng.uniform(0.0, delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed.add(proc.pid)
        killed_at.append(sorted(p.name for p in (run / "results").glob("*.jsonl")))
    assert killed_at and not (run / "trajectories.json").exists()
    final = start(model, prompts, run)
    assert final.wait(timeout=600) == 0, final.stdout.read()

    resumed = json.loads((run / "trajectories.json").read_text())
    assert resumed == expected  # token for token, masks, answers and calls
    runs = [tuple(json.loads(line)) for line in (run / "executions.txt").read_text().splitlines()]
    executions = Counter(body for _, body in runs)
    assert set(executions) == {body for t in resumed for body in t["calls"]}, killed_at
    # Each call ran once, unless a kill fell between the sandbox's answer and the log's fsync: then (and only
    # then) its result was lost with the process and it ran again. Such a run is one of the last of an attempt
    # that was killed (two calls run at a time); every other call ran exactly once. Two trajectories may make the
    # same call (the briefly trained model writes some products alike): a body runs once per call that makes it.
    last_of_killed = [run_ for pid in killed for run_ in [r for r in runs if r[0] == pid][-2:]]
    calls = Counter(body for t in resumed for body in t["calls"])
    for body, count in executions.items():
        again = count - calls[body]
        assert again == 0 or 0 < again <= sum(r[1] == body for r in last_of_killed), (body, count, calls[body], runs)
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert any(a["resumed_tokens"] for a in attempts), attempts  # some turn went on from its committed tokens
