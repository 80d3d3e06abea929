"""Trainer ranks: FSDP2 through TRL on several gloo ranks equals one process; sharded checkpoints; lost ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from controller import placement
from controller.ranks import Rendezvous, local_ranks
from specialists.config import SpecialistJob
from specialists.domains import write_demo_data
from storage.models import Job
from storage.specfile import SpecError, load_spec
from tests import rank_jobs


def test_local_ranks_count_each_node_apart_and_gpu_ranks_see_one_device() -> None:
    nodes = ["a", "b", "a", "a"]
    assert local_ranks(nodes, uses_gpus=False) == [(0, 3), (0, 1), (1, 3), (2, 3)]
    assert local_ranks(nodes, uses_gpus=True) == [(0, 1)] * 4  # Ray's CUDA_VISIBLE_DEVICES: cuda:0 is its GPU
    env = Rendezvous(4, "10.0.0.1", 29500, "gloo").env(2, 1, 3)
    assert env == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_a_job_gets_one_bundle_per_rank_then_its_engines() -> None:
    spec = {"resources": {"cpus": 2, "gpus": 8, "workers": 4}, "rollout": {"weight_sync": "path", "engines": 1,
                                                                          "tensor_parallel": 2, "gpus_per_rank": 1}}
    bundles = placement.job_bundles(Job(spec=spec))
    assert bundles == [{"CPU": 2.0, "GPU": 8.0}] * 4 + [{"CPU": 2.0, "GPU": 2.0}]
    assert placement.total(bundles) == {"CPU": 10.0, "GPU": 34.0}


def test_several_ranks_with_an_in_process_engine_is_refused_at_its_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"kind: specialist\nname: m\ndomain: math\nbase_model: {tiny_model_dir}\n"
                    "datasets: {train: a.jsonl, eval: b.jsonl}\nrewards: [{name: math}]\n"
                    "resources:\n  cpus: 1\n  workers: 2\n")
    with pytest.raises(SpecError) as error:
        load_spec(SpecialistJob, path)
    message = str(error.value)
    assert "job.yaml:9" in message and "resources.workers" in message and "weight_sync: path or broadcast" in message


def _spec(tiny_model_dir: Path, data: Path, batch_size: int, **extra) -> dict:
    return {"kind": "specialist", "name": "math", "domain": "math", "base_model": str(tiny_model_dir),
            "precision": "fp32", "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
            "sft": {"max_steps": 6, "learning_rate": 3e-3, "batch_size": batch_size, "max_length": 64,
                    "save_steps": 3},
            "rewards": [{"name": "math"}], **extra}


@pytest.fixture(scope="module")
def math_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("ranks-data"), n_train=200, n_eval=10)["math"]


def _losses(logs: list) -> list[float]:
    return [values["loss"] for _, values in logs if "loss" in values]


def _max_difference(a: Path, b: Path) -> float:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(left) == sorted(right)
    return max((left[k] - right[k]).abs().max().item() for k in left)


@pytest.mark.slow
def test_sft_on_two_fsdp2_ranks_equals_one_process_on_the_same_global_batch(
        tiny_model_dir: Path, math_data: Path, tmp_path: Path, local_ray) -> None:
    task = local_ray.remote(rank_jobs.sft_on_ranks).options(num_cpus=0.5)
    two = local_ray.get(task.remote(2, _spec(tiny_model_dir, math_data, 8), str(tmp_path / "two")))
    one = local_ray.get(task.remote(1, _spec(tiny_model_dir, math_data, 16), str(tmp_path / "one")))
    assert len(_losses(two)) == 6
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    assert _losses(two)[-1] < _losses(two)[0]
    assert _max_difference(tmp_path / "two" / "final", tmp_path / "one" / "final") < 1e-5
    shards = {p.name for p in (tmp_path / "two" / "checkpoint-6").iterdir()}
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= shards  # torch.distributed.checkpoint, one shard per rank
    assert "model.safetensors" not in shards


@pytest.mark.slow
def test_a_lost_rank_fails_the_attempt_and_the_retry_resumes_its_sharded_checkpoint_exactly(
        tiny_model_dir: Path, math_data: Path, tmp_path: Path, local_ray) -> None:
    from ray.exceptions import RayTaskError

    from controller.ranks import RankLost
    from rollout.engine import GenerationRequest, HFEngine
    from rollout.worker import RolloutWorkers, WorkerOptions
    from tests.test_rollout_workers import greedy

    spec = _spec(tiny_model_dir, math_data, 8)
    task = local_ray.remote(rank_jobs.sft_on_ranks).options(num_cpus=0.5, max_retries=0)
    straight = local_ray.get(task.remote(2, spec, str(tmp_path / "straight")))
    with pytest.raises(RayTaskError) as lost:  # rank 1 dies at step 4, after checkpoint-3
        local_ray.get(task.remote(2, spec, str(tmp_path / "run"), 4))
    assert isinstance(lost.value.cause, RankLost) and "trainer rank 1 died" in str(lost.value.cause)
    assert not (tmp_path / "run" / "final").exists()
    assert (tmp_path / "run" / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir()
    retried = local_ray.get(task.remote(2, spec, str(tmp_path / "run")))
    assert [values for _, values in retried if "resumed_from_step" in values] == [{"resumed_from_step": 3.0}]
    assert _losses(retried) == pytest.approx(_losses(straight)[3:], abs=1e-6)  # the same optimizer state
    assert _max_difference(tmp_path / "run" / "final", tmp_path / "straight" / "final") < 1e-6

    final = str(tmp_path / "run" / "final")  # the export is a plain transformers directory vLLM loads
    requests = [GenerationRequest(id=str(i), prompt_ids=(5 + i, 9, 12), max_tokens=12, temperature=0.0,
                                  ignore_eos=True) for i in range(4)]
    workers = RolloutWorkers(WorkerOptions(final, weight_sync="path", max_model_len=256, cpus_per_rank=1))
    try:
        served = greedy(workers.engine, requests)
    finally:
        workers.close()
    assert served == greedy(HFEngine(final, max_model_len=256), requests)


@pytest.mark.slow
def test_rank_0_generates_every_ranks_prompts_in_one_batch_and_each_rank_gets_its_slice(local_ray) -> None:
    task = local_ray.remote(rank_jobs.slices_on_ranks).options(num_cpus=0.5)
    result = local_ray.get(task.remote(3))
    assert result["seen"] == [["r0-a", "r0-b", "r1-a", "r1-b", "r1-c", "r2-a", "r2-b", "r2-c"]]  # rank order
    assert result["rank0"] == ["R0-A", "R0-B"]  # and ranks 1 and 2 checked theirs (rank_jobs._slice_follower)


@pytest.mark.slow
def test_grpo_on_two_ranks_has_one_wal_writer_and_a_seeded_step_equals_one_rank(
        tiny_model_dir: Path, math_data: Path, tmp_path: Path, local_ray) -> None:
    def spec(batch_size: int) -> dict:
        return _spec(tiny_model_dir, math_data, 8, sft={"enabled": False},
                     grpo={"max_steps": 2, "learning_rate": 5e-4, "batch_size": batch_size, "num_generations": 4,
                           "max_completion_length": 8, "save_steps": 1, "temperature": 1.0},
                     rewards=[{"name": "length", "args": {"max_chars": 6}}],  # a signal the untrained model gets
                     rollout={"weight_sync": "path", "cpus_per_rank": 1})

    task = local_ray.remote(rank_jobs.grpo_on_ranks).options(num_cpus=0.25)
    two = local_ray.get(task.remote(2, spec(8), str(tmp_path / "two")))
    one = local_ray.get(task.remote(1, spec(16), str(tmp_path / "one")))
    for name in ("loss", "reward", "grad_norm", "completions/mean_length"):
        left = [values[name] for _, values in two if name in values]
        assert len(left) == 2 and left == pytest.approx([v[name] for _, v in one if name in v], abs=1e-5), name
    assert any(values["grad_norm"] > 0 for _, values in two if "grad_norm" in values)  # a step that moved
    assert _max_difference(tmp_path / "two" / "final", tmp_path / "one" / "final") < 1e-5
    rollouts = tmp_path / "two" / "rollouts"
    assert [p.name for p in rollouts.iterdir()] == ["worker-0"]  # one service, one WAL writer, for all ranks
    assert len(list((rollouts / "worker-0" / "results").glob("*.jsonl"))) == 2


@pytest.fixture(scope="module")
def students(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny model with its own head, and the same model with the head tied to the embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("students")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(root / "tied")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "tied")
    return {"untied": str(tiny_model_dir), "tied": str(root / "tied")}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from specialists.base_model import init_base_model

    root = tmp_path_factory.mktemp("teachers")
    return [str(init_base_model(root / f"t{i}", seed=10 + i)) for i in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(("head", "normalization", "ranks", "sequences"),
                         [("untied", "token", 2, 12), ("tied", "token", 2, 12), ("untied", "sequence", 2, 12),
                          ("untied", "token", 3, 2)])  # the last: rank 2 has nothing, and still takes part
def test_the_distillation_minibatch_on_fsdp2_ranks_equals_one_process_in_loss_and_gradients(
        head: str, normalization: str, ranks: int, sequences: int, students: dict, teachers: list[str],
        tmp_path: Path, local_ray) -> None:
    task = local_ray.remote(rank_jobs.minibatch_on_ranks).options(num_cpus=0.25)
    args = (students[head], teachers, str(tmp_path), normalization, sequences)
    sharded = local_ray.get(task.remote(ranks, *args))
    single = local_ray.get(task.remote(1, *args))
    assert 0 < len(sharded["share"]) < sequences  # rank 0 scored a share, not the whole batch
    assert sharded["trunk_parameters"] == ["DTensor"]  # with the teachers' trunks sharded over the ranks
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert sorted(sharded["grads"]) == sorted(single["grads"])
    for name, grad in single["grads"].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _distill_spec(student: str, teachers: list[str], data: Path, ranks: int) -> dict:
    return {"kind": "distillation", "name": "ranks", "student": {"init": student}, "precision": "fp32",
            "teachers": [{"index": i, "name": f"t{i}", "checkpoint": path} for i, path in enumerate(teachers)],
            "mixture": [{"domain": f"math{i}", "prompts": str(data / "train.jsonl"), "teacher": i,
                         "eval_prompts": str(data / "eval.jsonl"), "rewards": [{"name": "math"}],
                         "eval": {"max_prompts": 8, "max_new_tokens": 4}} for i in range(2)],
            "steps": 4, "batch_size": 16, "learning_rate": 3e-3, "gradient_accumulation_steps": 2,
            "generation": {"max_new_tokens": 6}, "eval_every": 4, "save_every": 2, "chunk_size": 32,
            "resources": {"cpus": 0.5, "workers": ranks}, "rollout": {"weight_sync": "path", "cpus_per_rank": 0.5}}


def _step_losses(run_dir: Path) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["metrics"]["loss"] for row in rows if "loss" in row["metrics"]]


@pytest.mark.slow
def test_distillation_on_two_ranks_follows_one_process_and_resumes_its_sharded_checkpoint(
        tiny_model_dir: Path, teachers: list[str], math_data: Path, tmp_path: Path, local_ray) -> None:
    task = local_ray.remote(rank_jobs.distill_on_ranks).options(num_cpus=0.5)
    two, one = tmp_path / "two", tmp_path / "one"
    local_ray.get(task.remote(_distill_spec(str(tiny_model_dir), teachers, math_data, 2), str(two)))
    local_ray.get(task.remote(_distill_spec(str(tiny_model_dir), teachers, math_data, 1), str(one)))
    assert len(_step_losses(two)) == 4
    assert _step_losses(two)[0] == pytest.approx(_step_losses(one)[0], rel=1e-5)  # the same first step
    assert _step_losses(two) == pytest.approx(_step_losses(one), rel=1e-3)  # and (sampling aside) the rest
    checkpoint = two / "checkpoints" / "step-000004"
    assert (checkpoint / "sharded").is_dir() and (checkpoint / "model.safetensors").is_file()
    assert _max_difference(checkpoint, one / "checkpoints" / "step-000004") < 1e-4

    resumed = tmp_path / "resumed"  # as if killed after step 3: step 2's sharded checkpoint is the newest
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    local_ray.get(task.remote(_distill_spec(str(tiny_model_dir), teachers, math_data, 2), str(resumed)))
    assert _max_difference(resumed / "checkpoints" / "step-000004", checkpoint) < 1e-6


@pytest.mark.slow
def test_on_a_simulated_two_node_cluster_ranks_spread_jobs_are_refused_failed_cancelled_and_a_pipeline_runs(
        tiny_model_dir: Path, math_data: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    specialist = _spec(tiny_model_dir, math_data, 8, grpo={"max_steps": 2, "batch_size": 8, "num_generations": 4,
                                                           "max_completion_length": 6, "save_steps": 1},
                       eval={"max_prompts": 8, "max_new_tokens": 6},
                       resources={"cpus": 1, "workers": 2}, rollout={"weight_sync": "path", "cpus_per_rank": 1})
    distillation = _distill_spec(str(tiny_model_dir), [str(tiny_model_dir)] * 2, math_data, 2)
    distillation.update(steps=2, resources={"cpus": 1, "workers": 2}, rollout={"weight_sync": "path",
                                                                              "cpus_per_rank": 1})
    distillation["teachers"] = [{"index": 0, "name": "math", "specialist": "math",
                                 "checkpoint": str(tmp_path / "unused")}]
    distillation["mixture"] = distillation["mixture"][:1]
    distillation["mixture"][0]["eval"] = specialist["eval"]  # scored as its teacher is: a fair comparison
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(
        {"kind": "pipeline", "name": "ranked", "specialists": [specialist], "distillation": distillation}))
    env = {**os.environ, "RETORT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "-m", "tests.two_node_cluster", str(tmp_path / "out.json"),
                    str(tmp_path / "pipeline.yaml")], cwd=REPO, env=env, check=True, timeout=1500)
    report = json.loads((tmp_path / "out.json").read_text())

    scheduling = report["scheduling"]
    ok = scheduling["jobs"]["ok"]
    assert ok["state"] == "succeeded", ok
    assert ok["result"]["sum"] == 3.0 and ok["result"]["backend"] == "gloo"  # ranks 0 and 1: 1 + 2
    assert sorted(ok["result"]["nodes"]) == scheduling["nodes"]  # one rank on each node
    assert ok["result"]["env"]["WORLD_SIZE"] == "2" and ok["result"]["env"]["RANK"] == "0"
    huge = scheduling["jobs"]["huge"]
    assert huge["state"] == "failed" and huge["attempts"] == 0
    assert "cannot place: bundle 0 needs CPU 3 on one node, but the largest node has CPU 2" in huge["error"]
    assert "each trainer rank's resources sit on one node" in huge["error"]
    failed = scheduling["jobs"]["fails"]
    assert failed["state"] == "failed", failed  # rank 1's own error, not the broken collective it left rank 0
    assert "RankFailed: trainer rank 1 failed: ValueError: rank 1 was told to fail" in failed["error"], failed
    assert scheduling["jobs"]["cancelled"]["state"] == "cancelled"
    assert set(scheduling["groups"]) <= {"REMOVED"}  # nothing reserved after success, failure or cancel

    ran = report["pipeline"]
    assert "queued pipeline" in ran["submit"], ran["submit"]
    assert ran["returncode"] == 0, ran["controller"]
    assert ran["controller"].count("succeeded") >= 2, ran["controller"]  # the specialist, then the distillation
    assert set(ran["groups"]) <= {"REMOVED"}
    runs = tmp_path / "home" / "runs" / "pipeline"
    (pipeline_dir,) = runs.iterdir()
    assert (pipeline_dir / "math" / "sft" / "checkpoint-6" / "pytorch_model_fsdp_0").is_dir()
    assert [p.name for p in (pipeline_dir / "math" / "grpo" / "rollouts").iterdir()] == ["worker-0"]
    assert json.loads((pipeline_dir / "ranks" / "results.json").read_text())["domains"]
