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


def trainer_arguments(settings: Any, out_dir: Path, seed: int, precision: Precision) -> dict[str, Any]:
    """The TrainingArguments that SFT and GRPO set alike from their phase settings (`SFTSettings`,
    `GRPOSettings`): optimizer, checkpoints, device, precision, quiet output.

    `bf16` and `fp16` are always given, from the job's `precision`: TRL's configs default to bf16 even on a
    CPU, which on an AVX2 machine runs SFT several times slower than fp32."""
    import torch

    return {"output_dir": str(out_dir), "learning_rate": settings.learning_rate,
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
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    return final
