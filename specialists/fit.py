"""What SFT and GRPO do alike with a TRL trainer: report metrics, resume, save the final model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None


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
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir))
    final = out_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    return final
