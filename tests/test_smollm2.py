"""A real checkpoint end to end: SmolLM2-135M-Instruct imported from its GGUF (once, by the CLI), answering greedily
on vLLM, and a reduced copy of configs/examples/smollm2_pipeline.yaml on it.

Two CPU cores cannot train a 135M model to any score in minutes, so this checks the mechanics with real parts:
the GGUF import, SFT and GRPO checkpoints loaded into vLLM and scored, a full-vocabulary distillation
(V = 49,152) through the head store with each teacher's head loaded once per mini-batch, and the report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from controller.cli import app
from tests.conftest import REPO

pytestmark = pytest.mark.slow

PIPELINE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "smollm2_pipeline.yaml"
SMALL_DATA = {"train": 16, "rl": 8, "eval": 4}


def reduced(pipeline: dict) -> dict:
    """The same pipeline, a few steps and prompts each (every other setting as written)."""
    for spec in pipeline["specialists"]:
        spec["datasets"]["reasoning_gym"].update(SMALL_DATA)
        spec["sft"].update(max_steps=3, batch_size=4, max_length=128, save_steps=3, gradient_checkpointing=False)
        spec["grpo"].update(max_steps=2, batch_size=4, num_generations=2, max_completion_length=12, save_steps=2,
                            gradient_checkpointing=False)
        spec["eval"].update(max_prompts=4, max_new_tokens=12)
        spec["resources"] = {"cpus": 1}
    run = pipeline["distillation"]
    for entry in run["mixture"]:
        entry["reasoning_gym"].update(SMALL_DATA)
        entry["eval"].update(max_prompts=4, max_new_tokens=12)
    run.update(steps=2, batch_size=4, eval_every=2, save_every=2, generation={"max_new_tokens": 12},
               resources={"cpus": 2}, max_resident_heads=1)  # one resident head: every step loads each head
    return pipeline


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`retort base import-gguf smollm2 DIR`, run once for the module as a user runs it."""
    model = tmp_path_factory.mktemp("smollm2") / "model"
    converted = subprocess.run([sys.executable, "-m", "controller.cli", "base", "import-gguf", "smollm2", str(model)],
                               env={**os.environ, "RETORT_HOME": str(model.parent / "home")}, cwd=REPO,
                               capture_output=True, text=True, timeout=600)
    assert converted.returncode == 0, converted.stderr
    return model


def test_smollm2_imports_from_gguf_and_answers_greedily_on_vllm(smollm2_dir: Path, tmp_path: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "q", "prompt": "What is the capital of France?"}) + "\n")
    (tmp_path / "run.yaml").write_text(json.dumps({
        "kind": "rollout", "name": "smol", "model": str(smollm2_dir), "prompts": "prompts.jsonl",
        "chat_template": True, "engine": "vllm", "enforce_eager": True, "max_model_len": 512,
        "sampling": {"max_tokens": 24, "temperature": 0.0}, "output_dir": str(tmp_path / "out")}))
    env = {**os.environ, "RETORT_HOME": str(tmp_path / "home"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run([sys.executable, "-m", "controller.cli", "rollout", "run", str(tmp_path / "run.yaml")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    [row] = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert "Paris" in row["completion"], row["completion"]


def test_reduced_smollm2_pipeline(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, local_ray) -> None:
    home = tmp_path_factory.mktemp("smollm2-home")
    shutil.copytree(smollm2_dir, home / "models" / "smollm2")  # where the example's pipeline reads its base
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RETORT_HOME", str(home))
        patch.delenv("RETORT_DB_URL", raising=False)
        pipeline_file = tmp_path_factory.mktemp("smollm2-spec") / "pipeline.yaml"
        pipeline_file.write_text(yaml.safe_dump(reduced(yaml.safe_load(PIPELINE.read_text())), sort_keys=False))
        result = CliRunner().invoke(app, ["run", str(pipeline_file)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results_path = Path(re.search(r"results: (\S+)", result.stdout).group(1))
    results = json.loads(results_path.read_text())
    assert results["state"] == "succeeded"
    for domain in ("arithmetic", "spelling"):  # each phase's checkpoint was loaded into vLLM and scored
        scores = results["domains"][domain]
        assert all(isinstance(scores[k], float) and 0.0 <= scores[k] <= 1.0 for k in ("base", "sft", "grpo",
                                                                                      "student")), scores
    run_dir = results_path.parent
    report = (run_dir / "report.html").read_text()
    assert report.count("<img") >= 2

    distill_dir = run_dir / "smollm2-student"
    for index in (0, 1):  # the full vocabulary went through the head store
        with safe_open(str(distill_dir / "teachers" / str(index) / "head.safetensors"), "pt") as head:
            assert head.get_slice("weight").get_shape() == [49152, 576]
    rows = [json.loads(line) for line in (distill_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r["metrics"] for r in rows if "heads/loads_this_step" in r["metrics"]]
    assert len(trained) == 2
    # One resident head, two teachers: each mini-batch (sorted by teacher) loads each head exactly once.
    assert [s["heads/loads_this_step"] for s in trained] == [2.0, 2.0]
