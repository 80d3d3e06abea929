"""Model state on disk for jobs on several trainer ranks: sharded checkpoints and full exports.

A sharded checkpoint is torch.distributed.checkpoint's: every rank writes its own FSDP2 shards of the model
and the optimizer state, and N ranks read them back (resharding if the mesh changed). An export is what
everything else reads — vLLM, `retort report`, a teacher of a later distillation: a plain transformers
directory with the full weights, gathered from the shards and written by rank 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHARDED = "sharded"  # the torch.distributed.checkpoint directory inside a checkpoint


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of an FSDP2 module on rank 0, on the CPU (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_full_model(model: Any, state: dict[str, torch.Tensor], directory: Path) -> None:
    """`state` (full tensors, e.g. `full_state`) as a transformers directory: config, generation config, one
    safetensors file; a tied head is stored once, as `save_pretrained` does. (`save_pretrained` of the sharded
    module itself would read the storages FSDP2 freed.)"""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors = {k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank's shards of `model` and `optimizer` under `directory/sharded` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDED))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read `save_sharded`'s shards back into this rank's `model` and `optimizer` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill, optimizer state included
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory / SHARDED))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
