"""Job bodies for the trainer-rank tests, run as Ray tasks: rank 0 must be a fresh process (the test process
holds an in-process vLLM engine, which owns its torch.distributed group), as a controller's job task is."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from controller.ranks import run_ranks


def sft(spec_json: dict, out_dir: str, *, die_at_step: int | None = None) -> list[tuple[int, dict]]:
    """One rank's SFT (TRL + FSDP2 on several ranks) with its logged metrics; rank 1 dies at `die_at_step`."""
    from transformers import TrainerCallback

    from specialists.config import SpecialistJob
    from specialists.fit import fit
    from specialists.sft import build_sft_trainer

    spec = SpecialistJob.model_validate(spec_json)
    trainer, tokenizer = build_sft_trainer(spec, spec.base_model, Path(out_dir))
    trainer.args.logging_steps = 1
    if die_at_step is not None and trainer.accelerator.process_index == 1:
        class Die(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == die_at_step:
                    os._exit(1)  # as a preempted or OOM-killed rank goes: no cleanup, no goodbye

        trainer.add_callback(Die())
    logs: list[tuple[int, dict]] = []
    fit(trainer, tokenizer, Path(out_dir), on_log=lambda step, values: logs.append((step, values)))
    return logs


def grpo(spec_json: dict, out_dir: str, engine: Any = None) -> list[tuple[int, dict]]:
    from specialists.config import SpecialistJob
    from specialists.grpo import run_grpo

    spec = SpecialistJob.model_validate(spec_json)
    logs: list[tuple[int, dict]] = []
    run_grpo(spec, spec.base_model, Path(out_dir), engine, on_log=lambda step, values: logs.append((step, values)))
    return logs


def sft_on_ranks(ranks: int, spec_json: dict, out_dir: str, die_at_step: int | None = None) -> list:
    """`sft` on `ranks` trainer ranks (rank 0 in this task's process); rank 0's metrics."""
    if ranks == 1:
        return sft(spec_json, out_dir)
    return run_ranks(ranks, lambda: sft(spec_json, out_dir, die_at_step=die_at_step),
                     functools.partial(sft, die_at_step=die_at_step), (spec_json, out_dir), bundle={"CPU": 0.5})


def grpo_on_ranks(ranks: int, spec_json: dict, out_dir: str) -> list:
    """GRPO on `ranks` ranks generating through one path rollout worker (its own placement group)."""
    from rollout.worker import start_engine, stop_engine
    from specialists.config import SpecialistJob

    spec = SpecialistJob.model_validate(spec_json)
    engine = start_engine(spec.rollout, spec.base_model, dtype="float32", seed=spec.seed, run_dir=out_dir,
                          max_model_len=512)
    try:
        if ranks == 1:
            return grpo(spec_json, out_dir, engine)
        return run_ranks(ranks, lambda: grpo(spec_json, out_dir, engine), grpo, (spec_json, out_dir),
                         bundle={"CPU": 0.5})
    finally:
        stop_engine(engine)


def slices_on_ranks(ranks: int) -> dict:
    """Each rank's prompts through `generate_for_ranks`: what rank 0's one generate call saw, what each got back."""
    from specialists.grpo import generate_for_ranks

    seen: list[list[str]] = []

    def generate(every: list[str]) -> list[str]:
        seen.append(list(every))
        return [p.upper() for p in every]

    def lead() -> list[str]:
        return generate_for_ranks(["r0-a", "r0-b"], generate)

    got = run_ranks(ranks, lead, _slice_follower, (), bundle={"CPU": 0.5})
    return {"seen": seen, "rank0": got}


def _slice_follower() -> list[str]:
    import torch.distributed as dist

    from specialists.grpo import generate_for_ranks

    rank = dist.get_rank()
    mine = generate_for_ranks([f"r{rank}-a", f"r{rank}-b", f"r{rank}-c"], lambda every: [])
    assert mine == [f"R{rank}-A", f"R{rank}-B", f"R{rank}-C"], mine
    return mine


def minibatch(student_dir: str, teacher_dirs: list[str], run_dir: str, normalization: str,
              sequences: int) -> dict | None:
    """The distillation mini-batch loss of a fixed batch and the student's full gradient: in one process, or
    on this rank of an FSDP2 student (its token share, the loss scaled as the Distiller scales it)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from opd.hidden_cache import HiddenStateCache, RoutedSequence
    from opd.scheduler import distillation_loss, loss_weight, shard_by_tokens, shard_student, shard_trunk
    from opd.teachers import HeadStore, split_teacher

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    generator = torch.Generator().manual_seed(7)
    batch = [RoutedSequence(f"s{i}", i % len(teacher_dirs),
                            tuple(torch.randint(4, 60, (3 + i % 4,), generator=generator).tolist()),
                            tuple(torch.randint(4, 60, (2 + (5 * i) % 9,), generator=generator).tolist()))
             for i in range(sequences)]
    infos = {i: split_teacher(path, f"{run_dir}/teachers/{i}-{rank}", i) for i, path in enumerate(teacher_dirs)}
    locations = {i: info.location for i, info in infos.items()}
    vocab = {i: info.vocab_size for i, info in infos.items()}
    cache, heads = HiddenStateCache(), HeadStore(locations, max_heads=1)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    options = {"divergence": "reverse_kl", "chunk_size": 16, "normalization": normalization}
    total = loss_weight(batch, normalization)
    if world == 1:
        cache.fill(batch, locations, vocab)
        result = distillation_loss(student, batch, cache, heads, **options)
        result.loss.backward()
        return {"loss": float(result.loss), "grads": {n: p.grad for n, p in student.named_parameters()}}
    mine = shard_by_tokens(batch, world)[rank]
    cache = HiddenStateCache(shard=shard_trunk, max_resident_trunks=2)  # the teachers' trunks sharded too
    cache.fill(mine, locations, vocab, teachers=range(len(teacher_dirs)))
    student = shard_student(student, "fp32")
    loss, result = student.distillation_loss(mine, cache, heads, max_batch_tokens=None, **options)
    loss.backward(loss.new_tensor(result.weight / total * world))
    summed = torch.tensor([float(loss.detach()) * result.weight])
    dist.all_reduce(summed)
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}  # a collective on every rank
    trunks = sorted({type(p).__name__ for trunk in cache._trunks.values() for p in trunk.parameters()})
    return {"loss": float(summed) / total, "grads": grads, "share": [s.rollout_id for s in mine],
            "trunk_parameters": trunks} if rank == 0 else None


def minibatch_on_ranks(ranks: int, *args) -> dict:
    if ranks == 1:
        return minibatch(*args)
    return run_ranks(ranks, lambda: minibatch(*args), minibatch, args, bundle={"CPU": 0.25})


def distill_on_ranks(spec_json: dict, run_dir: str) -> dict:
    """A distillation through the controller's own path (`on_ranks`): rank 0 here, `resources.workers` ranks."""
    from controller.worker import on_ranks
    from opd.config import DistillationRun
    from opd.train import Distiller, distill

    spec = DistillationRun.model_validate(spec_json)
    result = on_ranks(spec.resources, lambda: Distiller(spec, run_dir).train(), distill, (spec, run_dir))
    return result.table
