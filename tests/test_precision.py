"""Precision is the spec's decision: what SFT, GRPO, the distillation and the engines are actually given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd.config import DistillationRun
from opd.train import Distiller
from specialists.config import SpecialistJob
from specialists.domains import write_demo_data
from specialists.grpo import build_grpo_trainer
from specialists.sft import build_sft_trainer
from storage.specfile import PRECISION_DTYPES, resolve_precision

needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what `auto` means on a machine without CUDA")


def specialist(base: Path, data: Path, precision: str) -> SpecialistJob:
    return SpecialistJob.model_validate({
        "kind": "specialist", "name": "math", "domain": "math", "base_model": str(base), "precision": precision,
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": 1}, "grpo": {"max_steps": 1, "batch_size": 8, "num_generations": 8},
        "rewards": [{"name": "math"}]})


@pytest.fixture(scope="module")
def math_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("data"), n_train=16, n_eval=4)["math"]


@needs_cpu
def test_auto_is_fp32_on_a_cpu_and_explicit_values_stay() -> None:
    assert resolve_precision("auto") == "fp32"
    assert (resolve_precision("bf16"), resolve_precision("fp32")) == ("bf16", "fp32")
    assert PRECISION_DTYPES == {"bf16": "bfloat16", "fp32": "float32"}  # names torch, transformers and vLLM take


@needs_cpu
@pytest.mark.parametrize("precision,bf16", [("auto", False), ("fp32", False), ("bf16", True)])
def test_sft_and_grpo_trainers_get_the_specs_precision(precision: str, bf16: bool, tiny_model_dir: Path,
                                                       math_data: Path, hf_engine, tmp_path: Path) -> None:
    """TRL's configs default to bf16=True even on a CPU; the trainers must get the spec's choice instead."""
    spec = specialist(tiny_model_dir, math_data, precision)
    sft, _ = build_sft_trainer(spec, str(tiny_model_dir), tmp_path / "sft")
    grpo, _ = build_grpo_trainer(spec, str(tiny_model_dir), tmp_path / "grpo", hf_engine)
    for trainer in (sft, grpo):
        assert (trainer.args.bf16, trainer.args.fp16) == (bf16, False)
        assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
        assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay fp32


@needs_cpu
@pytest.mark.parametrize("precision,mixed,dtype", [("auto", "no", torch.float32), ("bf16", "bf16", torch.bfloat16)])
def test_distillation_gets_the_specs_precision(precision: str, mixed: str, dtype: torch.dtype, tiny_model_dir: Path,
                                               math_data: Path, hf_engine, tmp_path: Path) -> None:
    spec = DistillationRun.model_validate({
        "kind": "distillation", "name": "d", "precision": precision, "student": {"init": str(tiny_model_dir)},
        "teachers": [{"index": 0, "name": "math", "checkpoint": str(tiny_model_dir)}],
        "mixture": [{"domain": "math", "prompts": str(math_data / "train.jsonl"), "teacher": 0}], "steps": 1})
    distiller = Distiller(spec, tmp_path / "run", engine=hf_engine)
    distiller.setup()
    assert distiller.accelerator.mixed_precision == mixed
    assert next(distiller.student.parameters()).dtype == torch.float32  # fp32 master weights either way
    assert (distiller.cache.compute_dtype, distiller.cache.storage_dtype, distiller.heads.dtype) == (dtype,) * 3


@needs_cpu
@pytest.mark.parametrize("precision,dtype", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_rollout_engine_gets_the_specs_precision(precision: str, dtype: torch.dtype, tiny_model_dir: Path,
                                                 tmp_path: Path) -> None:
    from rollout.batch_run import build_engine
    from rollout.config import RolloutRunSpec

    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    spec = RolloutRunSpec.model_validate({"kind": "rollout", "name": "r", "model": str(tiny_model_dir),
                                          "prompts": str(tmp_path / "prompts.jsonl"), "engine": "hf",
                                          "precision": precision})
    assert next(build_engine(spec).model.parameters()).dtype == dtype


@pytest.mark.gpu
def test_on_a_gpu_everything_that_computes_sits_on_it_in_bf16(tiny_model_dir: Path, math_data: Path,
                                                               tmp_path: Path) -> None:
    from rollout.engine import HFEngine

    spec = DistillationRun.model_validate({
        "kind": "distillation", "name": "d", "student": {"init": str(tiny_model_dir)},  # precision auto
        "teachers": [{"index": 0, "name": "math", "checkpoint": str(tiny_model_dir)}],
        "mixture": [{"domain": "math", "prompts": str(math_data / "train.jsonl"), "teacher": 0}], "steps": 1})
    distiller = Distiller(spec, tmp_path / "run", engine=HFEngine(str(tiny_model_dir), device="cuda"))
    distiller.setup()
    assert distiller.device.type == "cuda" and distiller.accelerator.mixed_precision == "bf16"
    assert next(distiller.student.parameters()).device.type == "cuda"
    assert distiller.cache.device.type == "cuda" and distiller.heads.device.type == "cuda"
    assert distiller.heads.dtype == torch.bfloat16 and torch.backends.cuda.matmul.allow_tf32
    assert distiller.heads.get(0).device.type == "cuda"
