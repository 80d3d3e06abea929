"""Metrics to TensorBoard and W&B (offline), read back with their own readers; the job store keeps the same names."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from opd.config import DistillationRun
from opd.train import Distiller
from specialists.config import SpecialistJob
from specialists.domains import write_demo_data
from specialists.job import run_specialist
from storage import jobs
from storage.specfile import SpecError, load_spec
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `directory`, by tag, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_demo_specialist_and_distillation_report_to_tensorboard_and_wandb(
        tiny_model_dir: Path, vllm_engine, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default on a machine with no network
    data = write_demo_data(tmp_path / "data", n_train=200, n_eval=8)["math"]
    demo = load_spec(SpecialistJob, REPO / "configs/demo/specialists/math.yaml").model_dump(mode="json")
    demo.update(base_model=str(tiny_model_dir), report_to=["tensorboard", "wandb"],
                datasets={"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")})
    demo["sft"].update(max_steps=20, batch_size=16, save_steps=20)
    demo["grpo"].update(max_steps=2, batch_size=16, save_steps=2)
    demo["eval"].update(max_prompts=8)
    spec = SpecialistJob.model_validate(demo)
    job = jobs.submit(store, "specialist", spec.name, spec.model_dump(mode="json"))
    run_dir = tmp_path / "math"
    original = load_file(tiny_model_dir / "model.safetensors")
    try:
        run_specialist(spec, run_dir, store=store, job_id=job.id, engine=vllm_engine)
        run = DistillationRun.model_validate({
            "kind": "distillation", "name": "student", "report_to": "tensorboard",
            "student": {"init": str(tiny_model_dir)},
            "teachers": [{"index": 0, "name": "math", "checkpoint": str(run_dir / "grpo" / "final")}],
            "mixture": [{"domain": "math", "prompts": str(data / "train.jsonl"),
                         "eval_prompts": str(data / "eval.jsonl"), "teacher": 0, "rewards": [{"name": "math"}],
                         "eval": {"max_prompts": 8, "max_new_tokens": 8}}],
            "steps": 3, "batch_size": 8, "eval_every": 3, "save_every": 3, "generation": {"max_new_tokens": 8}})
        Distiller(run, tmp_path / "student").train()
    finally:
        vllm_engine.load_weights(original.items())

    logged = scalars(run_dir / "tensorboard")
    stored = {f"{m.phase}/{m.name}" for m in jobs.get(store, job.id).metrics}
    assert {"sft/loss", "grpo/reward", "base/eval/score", "sft/eval/score", "grpo/eval/score"} <= set(logged)
    assert set(logged) == stored  # the job store's names, every one of them
    assert len(logged["sft/loss"]) >= 2
    [wandb_run] = list((run_dir / "wandb").glob("offline-run-*"))
    assert list(wandb_run.glob("*.wandb"))  # W&B's own record of the run, for `wandb sync` later

    distilled = scalars(tmp_path / "student" / "tensorboard")
    assert [step for step, _ in distilled["distill/loss"]] == [1, 2, 3]
    assert [step for step, _ in distilled["distill/eval/math/score"]] == [0, 3]
    assert "distill/heads/loads_this_step" in distilled


def test_report_to_is_checked_when_the_yaml_loads(tmp_path: Path) -> None:
    text = (REPO / "configs/demo/specialists/math.yaml").read_text()
    path = tmp_path / "math.yaml"
    path.write_text(text.replace("seed: 0\n", "seed: 0\nreport_to: [tensorbord]\n"))
    with pytest.raises(SpecError) as caught:
        load_spec(SpecialistJob, path)
    [problem] = caught.value.problems
    assert problem.path == "report_to[0]" and "'tensorboard'" in problem.message and problem.line == 9
    path.write_text(text.replace("seed: 0\n", "seed: 0\nreport_to: [none, wandb]\n"))
    with pytest.raises(SpecError, match="'none' means no tracker"):
        load_spec(SpecialistJob, path)
    path.write_text(text.replace("seed: 0\n", "seed: 0\nreport_to: tensorboard\n"))
    assert load_spec(SpecialistJob, path).report_to == ["tensorboard"]
