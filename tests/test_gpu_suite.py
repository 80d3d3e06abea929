"""benchmarks/gpu_suite.py's code, run at toy sizes on the CPU (`--small`); on a GPU it runs at full size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_suite_runs_small_on_a_cpu_and_reports_every_part() -> None:
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--small"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result) >= {"loss", "heads", "fsdp", "generation", "push", "steps", "wall_s"}
    assert result["fsdp"]["backend"] == "gloo" and result["fsdp"]["step_s"] > 0
    loss = result["loss"]
    assert all(loss[k]["ms"] > 0 for k in ("floor_4_gemms", "fused", "dense")) and loss["fused_over_floor"] > 0
    heads = result["heads"]
    assert heads["teachers"] == 10 and heads["heads_on_device_ms"] > 0 and heads["heads_from_host_ms"] > 0
    generation = result["generation"]
    assert all(generation[f"{e}_tokens_per_s"] > 0 and generation[f"{e}_wal_tokens_per_s"] > 0 for e in ("vllm", "hf"))
    assert result["push"]["ms"] > 0 and result["steps"]["grpo_step_s"] > 0 and result["steps"]["distill_step_s"] > 0
    assert result["wall_s"] < 120  # the budget for --small


def test_without_a_gpu_the_full_suite_says_to_use_small() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full suite would run")
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "run with --small for the CPU check" in done.stderr
