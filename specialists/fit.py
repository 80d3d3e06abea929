"""What SFT and GRPO do alike with a TRL trainer: report metrics, resume, save the final model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.specfile import Precision, resolve_precision


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest *complete* trainer checkpoint: one killed mid-save has no readable trainer_state.json.

    (transformers' own get_last_checkpoint returns the newest directory, complete or not.)
    """
    if not out_dir.is_dir():
        return None
    candidates = [p for p in out_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # written last by the Trainer: missing or torn means the save did not finish
        return str(path)
    return None


def world_size() -> int:
    """How many trainer ranks this job runs on (1 outside a torch.distributed group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def fsdp_arguments() -> dict[str, Any]:
    """FSDP2 through accelerate, for a job on several ranks: every decoder layer sharded (`fully_shard`), the
    weights resharded after forward, checkpoints sharded (torch.distributed.checkpoint) so N ranks save and
    resume their own shards. A one-rank job gets none of it: today's single-process path."""
    if world_size() == 1:
        return {}
    return {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                                                  "state_dict_type": "SHARDED_STATE_DICT",
                                                  "cpu_ram_efficient_loading": False}}


def trainer_arguments(settings: Any, out_dir: Path, seed: int, precision: Precision) -> dict[str, Any]:
    """The TrainingArguments that SFT and GRPO set alike from their phase settings (`SFTSettings`,
    `GRPOSettings`): optimizer, checkpoints, device, precision, quiet output, FSDP2 on several ranks.

    `bf16` and `fp16` are always given, from the job's `precision`: TRL's configs default to bf16 even on a
    CPU, which on an AVX2 machine runs SFT several times slower than fp32. `batch_size` is per rank, as TRL's
    `per_device_train_batch_size`: the global batch is batch_size × ranks × gradient accumulation."""
    import torch

    return {**fsdp_arguments(), "output_dir": str(out_dir), "learning_rate": settings.learning_rate,
            "warmup_steps": settings.warmup_ratio,  # below 1: a share of the steps
            "per_device_train_batch_size": settings.batch_size, "save_steps": settings.save_steps,
            "save_total_limit": 2, "report_to": "none", "seed": seed, "use_cpu": not torch.cuda.is_available(),
            "bf16": resolve_precision(precision) == "bf16", "fp16": False,
            "gradient_checkpointing": settings.gradient_checkpointing, "disable_tqdm": True,
            "dataloader_num_workers": 0}


def fit(trainer: Any, tokenizer: Any, out_dir: Path,
        on_log: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train (resuming from the newest checkpoint in `out_dir`), save `<out_dir>/final`, return it."""
    from transformers import PrinterCallback, TrainerCallback

    class Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log is not None and logs:
                on_log(state.global_step, {k: float(v) for k, v in logs.items() if isinstance(v, int | float)})

    trainer.add_callback(Metrics())
    trainer.remove_callback(PrinterCallback)  # metrics go to `on_log` and the job store, not stdout
    resume = last_checkpoint(out_dir)
    if resume is not None and on_log is not None:  # the job store shows where a restarted job picked up
        on_log(int(resume.rsplit("-", 1)[-1]), {"resumed_from_step": float(resume.rsplit("-", 1)[-1])})
    trainer.train(resume_from_checkpoint=resume)
    final = out_dir / "final"
    save_final(trainer, tokenizer, final)
    return final


def save_final(trainer: Any, tokenizer: Any, final: Path) -> None:
    """A plain transformers directory (what vLLM loads and `retort report` reads). On several ranks every rank
    gathers the FSDP2 shards (a collective) and rank 0 writes the full weights."""
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(final))
        tokenizer.save_pretrained(final)
        return
    from storage.checkpoints import write_full_model

    state = trainer.accelerator.get_state_dict(trainer.model)  # the full state on rank 0, empty elsewhere
    if trainer.accelerator.is_main_process:
        write_full_model(trainer.accelerator.unwrap_model(trainer.model), state, final)
        tokenizer.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()


class CpuFsdp:
    """Mixed into TRL's trainers: FSDP2 on CPU ranks (gloo) too.

    accelerate turns its FSDP plugin on only for GPU-like distributed types (`AcceleratorState` keeps a CPU
    group `MULTI_CPU`, and the Trainer then wraps the model in DDP); the FSDP2 path itself (`fully_shard` on a
    CPU device mesh, sharded checkpoints through torch.distributed.checkpoint) runs on CPUs. So once the
    accelerator exists, a CPU group with an FSDP config is marked FSDP, exactly as a GPU group is."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            # every later AcceleratorState() copies PartialState's fields over its own: mark both
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True
