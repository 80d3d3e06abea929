"""One mini-batch of the distillation loss, ordered by teacher index.

The mini-batch's sequences are grouped by teacher and the groups visited in index
order, so each teacher's head is fetched from the `HeadStore` once per mini-batch and
only `max_heads` are ever resident; the next teacher's head is prefetched before the
current group's loss runs, so on a GPU its copy overlaps that compute. The student runs
once over all sequences; each group's loss is the fused full-vocabulary divergence between the student's hidden
states (with its own head) and the cached teacher hidden states (with that teacher's
head). `normalization` says what the total is a mean over: every token ("token", so
long answers dominate) or every sequence ("sequence": each sequence's own token mean,
so a 3-token arithmetic answer weighs as much as a 40-token essay).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from opd.hidden_cache import HiddenStateCache, RoutedSequence, last_hidden_states
from opd.loss import fused_linear_divergence
from opd.teachers import HeadStore


def by_teacher(sequences: Sequence[RoutedSequence]) -> list[tuple[int, list[RoutedSequence]]]:
    """Groups of sequences per teacher, in ascending teacher index."""
    groups: dict[int, list[RoutedSequence]] = {}
    for s in sequences:
        groups.setdefault(s.teacher_index, []).append(s)
    return sorted(groups.items())


def shard_by_tokens(sequences: Sequence[RoutedSequence], ranks: int) -> list[list[RoutedSequence]]:
    """Each rank's share of a step's sequences: about equal completion tokens (longest first, each to the rank
    with the fewest so far), each share in teacher-index order (the batch's order within a teacher)."""
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i].completion_ids), i))
    shares: list[list[int]] = [[] for _ in range(ranks)]
    tokens = [0] * ranks
    for i in order:
        rank = min(range(ranks), key=lambda r: (tokens[r], r))
        shares[rank].append(i)
        tokens[rank] += len(sequences[i].completion_ids)
    return [[sequences[i] for i in sorted(share, key=lambda i: (sequences[i].teacher_index, i))]
            for share in shares]


def loss_weight(sequences: Sequence[RoutedSequence], normalization: str) -> int:
    """What a loss over `sequences` is the mean over: their scored completion tokens, or the sequences that have
    some."""
    if normalization == "token":
        return sum(s.scored_tokens for s in sequences)
    if normalization == "sequence":
        return sum(1 for s in sequences if s.scored_tokens)
    raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")


@dataclass
class MiniBatchLoss:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the student
    tokens: int
    weight: float  # what the loss is a mean over (tokens or sequences): micro-batches combine by it
    per_teacher: dict[int, torch.Tensor] = field(default_factory=dict)  # mean divergence per teacher (detached:
    # read back to the host once the step is done, not between groups)
    teacher_order: list[int] = field(default_factory=list)


def distillation_loss(
    student: torch.nn.Module,
    sequences: Sequence[RoutedSequence],
    cache: HiddenStateCache,
    heads: HeadStore,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 256,
    pad_id: int = 0,
    normalization: str = "token",
    max_batch_tokens: int | None = 4096,
) -> MiniBatchLoss:
    """The mini-batch loss; `student` is a transformers causal LM (its base model and `lm_head`).

    `max_batch_tokens` None runs the student once over all sequences (what FSDP2 ranks need: each runs every
    layer's forward, and so its all-gathers, the same number of times); a rank with nothing to score still
    runs it once, on one pad token, for a zero loss that reaches every parameter."""
    total_weight = loss_weight(sequences, normalization)
    sequences = [s for s in sequences if s.scored_tokens]
    device = next(student.parameters()).device
    weight = student.get_output_embeddings().weight  # (V, d)
    if not sequences:
        idle = student.get_decoder()(input_ids=torch.full((1, 1), pad_id, device=device)).last_hidden_state
        return MiniBatchLoss((idle.sum() + weight.sum()) * 0.0, 0, float(total_weight))
    groups = by_teacher(sequences)
    ordered = [s for _, group in groups for s in group]
    width = max_batch_tokens or sum(len(s.prompt_ids) + len(s.completion_ids) for s in ordered) * len(ordered)
    student_states = last_hidden_states(student.get_decoder(), ordered, pad_id, device, width)  # [(L, d)], grad
    total = torch.zeros((), device=device)
    tokens = loss_weight(ordered, "token")
    result = MiniBatchLoss(total, tokens, float(total_weight))
    offset = 0
    for k, (index, group) in enumerate(groups):
        head = heads.get(index)  # once per teacher per mini-batch; on a GPU its copy was issued one group ago
        if k + 1 < len(groups):
            heads.prefetch(groups[k + 1][0])  # the next teacher's head travels while this group's loss computes
        hs = torch.cat(student_states[offset:offset + len(group)])  # (N_g, d)
        ht = torch.cat([cache.get(s.rollout_id, index) for s in group]).to(device, hs.dtype)  # (N_g, d_t)
        offset += len(group)
        if any(s.loss_mask is not None for s in group):  # an agent's tool results: context, never scored
            keep = torch.tensor([m for s in group for m in (s.loss_mask or (True,) * len(s.completion_ids))],
                                device=device)
            hs, ht = hs[keep], ht[keep]
        token_weights = None  # every scored token counts once
        if normalization == "sequence":  # 1/length per token: each sequence's tokens sum to one
            token_weights = torch.cat([torch.full((s.scored_tokens,), 1.0 / s.scored_tokens)
                                       for s in group]).to(device)
        group_loss = fused_linear_divergence(hs, weight, ht, head.to(hs.dtype), token_weights, divergence, beta,
                                             temperature, chunk_size)
        heads.events.append(("loss", index))
        total = total + group_loss * (loss_weight(group, normalization) / max(total_weight, 1))
        result.per_teacher[index] = group_loss.detach()
        result.teacher_order.append(index)
    result.loss = total
    return result


def _registered_loss(self: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple:
    """`distillation_loss` as a forward method of the FSDP2 student: FSDP gathers the root's parameters (the
    embeddings and the head) before it and hooks the returned loss for backward."""
    result = distillation_loss(self, *args, **kwargs)
    return result.loss, result


def shard_student(student: torch.nn.Module, precision: str) -> torch.nn.Module:
    """FSDP2 over every rank of the group: each decoder layer its own unit (resharded after forward), then the
    root (embeddings, norm, head: kept gathered from forward to backward, which needs them at once)."""
    import types

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for layer in student.get_decoder().layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
    fully_shard(student, mp_policy=policy, reshard_after_forward=False)
    student.distillation_loss = types.MethodType(_registered_loss, student)
    register_fsdp_forward_method(student, "distillation_loss")
    return student


def shard_trunk(trunk: torch.nn.Module) -> torch.nn.Module:
    """A teacher's trunk (frozen, in its own dtype) as FSDP2 units over the ranks: each decoder layer, then the
    rest; every rank keeps 1/N of it resident and gathers one layer at a time."""
    from torch.distributed.fsdp import fully_shard

    for layer in trunk.layers:
        fully_shard(layer, reshard_after_forward=True)
    return fully_shard(trunk, reshard_after_forward=True)
