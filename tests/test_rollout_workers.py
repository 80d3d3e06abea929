"""Rollout workers: vLLM in Ray actors, tensor parallel, weights over `path` and `broadcast`, a kill survived."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from controller.specs import load_any as load_spec
from rollout.engine import GenerationRequest
from rollout.service import RolloutRequest, RolloutService
from rollout.wal import FinishRecord, ResetRecord, StepRecord, TokenRecord, decode, segments
from rollout.worker import RolloutWorkers, WorkerOptions, bundle_problem, split
from storage.specfile import SpecError


def greedy(engine, requests) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for step in engine.generate(requests):
        for chunk in step:
            out.setdefault(chunk.id, []).extend(chunk.token_ids)
    return out


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tuple(tokenizer(f"<|user|>{i}+{3 * i}=?\n<|assistant|>")["input_ids"]) for i in range(8)]


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    """New policy weights: the base's, moved enough to change greedy outputs."""
    generator = torch.Generator().manual_seed(7)
    return {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
            for name, tensor in load_file(tiny_model_dir / "model.safetensors").items()}


# --- pure logic ----------------------------------------------------------------------------------------------


def test_split_is_contiguous_balanced_and_stable() -> None:
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1], 2) == [[1], []]
    assert [x for share in split(list(range(64)), 4) for x in share] == list(range(64))


def test_a_bundle_larger_than_every_node_is_refused_with_the_numbers() -> None:
    nodes = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert bundle_problem([{"CPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], nodes) is None
    problem = bundle_problem([{"CPU": 1.0}, {"CPU": 2.0, "GPU": 2.0}], nodes)
    assert problem.startswith("bundle 1 needs CPU 2, GPU 2 on one node, but the largest node has CPU 4, GPU 1")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_rollout_block_is_checked_where_it_is_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    base = (f"kind: specialist\nname: m\ndomain: math\nbase_model: {tiny_model_dir}\n"
            "datasets: {train: t.jsonl, eval: e.jsonl}\nrewards: [{name: math}]\n")
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, base + "rollout:\n  engines: 2\n  tensor_parallel: 2\n"))
    problems = [str(p) for p in error.value.problems]
    assert any(":8:3: rollout.engines: engines is 2 but weight_sync inprocess keeps one engine" in p for p in problems)
    assert any(":9:3: rollout.tensor_parallel: tensor_parallel 2 needs rollout workers" in p for p in problems)
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, base + "grpo: {engine: hf}\nrollout:\n  weight_sync: broadcast\n"))
    assert "rollout.weight_sync: weight_sync broadcast starts rollout workers, but grpo.engine hf" in str(error.value)
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, base + "rollout: {weight_sync: rsync}\n"))
    assert "rollout.weight_sync" in str(error.value) and "'inprocess', 'path' or 'broadcast'" in str(error.value)
    spec = load_spec(write(tmp_path, base + "rollout: {weight_sync: path, engines: 2, cpus_per_rank: 0.5}\n"))
    assert spec.rollout.bundles() == [{"CPU": 0.5}, {"CPU": 0.5}]


# --- real workers (Ray actors with vLLM) ---------------------------------------------------------------------


def wal_records(data: bytes) -> list:
    """Every whole record of a WAL's segments (concatenated), in order."""
    records, at = [], 0
    while at + 16 <= len(data):
        if data[at:at + 4] == b"RWAL":  # a segment's header
            at += 8
            continue
        length, _ = struct.unpack_from("<II", data, at)
        if at + 8 + length > len(data):
            break
        records.append(decode(data[at + 8:at + 8 + length]))
        at += 8 + length
    return records


@pytest.mark.slow
def test_path_workers_split_a_batch_take_pushes_and_survive_a_kill(local_ray, tiny_model_dir: Path, hf_engine,
                                                                   prompts, perturbed, tmp_path: Path) -> None:
    options = WorkerOptions(str(tiny_model_dir), weight_sync="path", max_model_len=2048, cpus_per_rank=0.5)
    workers = RolloutWorkers(options, engines=2, weights_dir=tmp_path / "weights")
    original = {k: v.clone() for k, v in hf_engine.model.state_dict().items()}
    try:
        requests = [GenerationRequest(f"r{i}", p, max_tokens=16, temperature=0.0) for i, p in enumerate(prompts)]
        assert greedy(workers.engine, requests) == greedy(hf_engine, requests)  # two workers, one batch

        service = workers.service(tmp_path / "rollouts")
        service.load_weights(perturbed.items(), version=3)
        hf_engine.load_weights(perturbed.items())
        assert greedy(workers.engine, requests) == greedy(hf_engine, requests)  # the push reached both engines
        assert [p.name for p in (tmp_path / "weights").iterdir()] == ["v00000001"]  # the latest push kept only

        # a batch long enough to kill worker 0 in the middle of it
        batch = [RolloutRequest(f"q{i}", p, max_tokens=400, temperature=0.0) for i, p in enumerate(prompts * 4)]
        reference = RolloutService(hf_engine, tmp_path / "reference").run("b", batch)
        wal_dir = tmp_path / "rollouts" / "worker-0" / "wal"
        victim = workers.pids[0]

        done = threading.Event()
        snapshot: dict[str, bytes] = {}  # the WAL as it last stood before the finished batch truncated it

        def wal_bytes() -> int:
            return sum(p.stat().st_size for p in segments(wal_dir)) if wal_dir.exists() else 0

        def kill_when_committed_then_watch() -> None:
            deadline = time.monotonic() + 120
            while wal_bytes() < 16_384 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(victim, signal.SIGKILL)
            while not done.is_set():
                data = b"".join(p.read_bytes() for p in segments(wal_dir)) if wal_dir.exists() else b""
                if len(data) > len(snapshot.get("wal", b"")):
                    snapshot["wal"] = data
                time.sleep(0.005)

        killer = threading.Thread(target=kill_when_committed_then_watch)
        killer.start()
        try:
            rollouts = service.run_or_resume("b", batch)
        finally:
            done.set()
            killer.join()
        assert workers.restarts == 1 and workers.pids[0] != victim
        assert [(r.id, r.completion_ids) for r in rollouts] == [(r.id, r.completion_ids) for r in reference]
        assert all(set(r.policy_versions) == {3} for r in rollouts)  # the restarted worker got version 3 back

        attempts = [json.loads(line) for line in
                    (tmp_path / "rollouts" / "worker-0" / "attempts.jsonl").read_text().splitlines()]
        assert len(attempts) == 2 and sum(attempts[1]["resumed_tokens"].values()) > 0  # committed tokens kept
        records = wal_records(snapshot["wal"])  # what was committed before the kill and after the restart
        assert not any(isinstance(r, ResetRecord) for r in records)
        keys = [(r.rollout_id, r.seq_no) for r in records if isinstance(r, TokenRecord | FinishRecord)]
        keys += [key for r in records if isinstance(r, StepRecord)
                 for key in zip(r.rollout_ids, r.seq_nos, strict=True)]
        assert keys and len(keys) == len(set(keys))  # nothing committed was written twice
    finally:
        hf_engine.load_weights(original.items())
        workers.close()


@pytest.mark.slow
def test_tensor_parallel_broadcast_worker_matches_one_rank_and_takes_pushes(local_ray, tiny_model_dir: Path,
                                                                           vllm_engine, hf_engine, prompts,
                                                                           perturbed) -> None:
    requests = [GenerationRequest(f"r{i}", p, max_tokens=24, temperature=0.0) for i, p in enumerate(prompts)]
    one_rank = greedy(vllm_engine, requests)  # the session's in-process engine: tensor_parallel 1, base weights
    options = WorkerOptions(str(tiny_model_dir), weight_sync="broadcast", tensor_parallel=2, max_model_len=2048,
                            cpus_per_rank=1.0)
    workers = RolloutWorkers(options, engines=1)
    original = {k: v.clone() for k, v in hf_engine.model.state_dict().items()}
    try:
        assert greedy(workers.engine, requests) == one_rank
        workers.load_weights(perturbed.items(), version=1)  # gloo: the trainer is rank 0, the engine's ranks 1-2
        hf_engine.load_weights(perturbed.items())
        after = greedy(workers.engine, requests)
        assert after == greedy(hf_engine, requests) and after != one_rank
    finally:
        hf_engine.load_weights(original.items())
        workers.close()
