"""Metrics to the trackers TRL and verl users watch: TensorBoard, Weights & Biases, MLflow.

The job store stays the source of truth; a job's `report_to` sends the same metrics, under
the same names (``<phase>/<name>``: ``sft/loss``, ``grpo/reward``, ``distill/eval/math/score``),
to each tracker as well, from the one place every metric passes (a specialist's `record`, the
distiller's `_log`). TRL's own `report_to` callbacks are not used: they would name metrics
differently from the job store and open a W&B run per phase instead of one per job.

- ``tensorboard``: event files in ``<run_dir>/tensorboard/``.
- ``wandb``: a run whose files land in ``<run_dir>/wandb/``; offline unless ``WANDB_MODE`` says
  otherwise (these machines reach no network), to be synced later with ``wandb sync``.
- ``mlflow``: a file store in ``<run_dir>/mlruns/`` unless ``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Trackers:
    """The trackers of one job; `log` is a no-op for ``report_to: none``."""

    def __init__(self, report_to: Sequence[str], run_dir: str | Path, run_name: str,
                 config: dict[str, Any] | None = None):
        self.names = [n for n in report_to if n != "none"]
        self.run_dir = Path(run_dir)
        self._tensorboard = self._wandb = self._mlflow = None
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if "wandb" in self.names:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(dir=str(self.run_dir), name=run_name, config=config or {}, reinit="create_new")
        if "mlflow" in self.names:
            try:
                import mlflow
            except ImportError:
                raise RuntimeError("report_to: mlflow needs the mlflow package (pip install mlflow)") from None
            if "MLFLOW_TRACKING_URI" not in os.environ:
                mlflow.set_tracking_uri((self.run_dir / "mlruns").resolve().as_uri())
            self._mlflow = mlflow
            mlflow.start_run(run_name=run_name)

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        named = {f"{phase}/{k}": float(v) for k, v in metrics.items()}
        if self._tensorboard is not None:
            for tag, value in named.items():
                self._tensorboard.add_scalar(tag, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({**named, f"{phase}/step": step})
        if self._mlflow is not None:
            self._mlflow.log_metrics(named, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()
