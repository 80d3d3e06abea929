"""The fused, chunked, full-vocabulary distillation loss.

    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                   mask, divergence="reverse_kl", chunk_size=256)

Both distributions are rebuilt from hidden states and prediction heads chunk by chunk:
for each chunk of C tokens the student and teacher logits ``(C, V)`` are formed, the
per-token divergence and its gradient with respect to the student logits are computed
in closed form, and the gradients for the hidden states and the head weights are
accumulated right away (the Liger-Kernel approach). No ``(N, V)`` tensor ever exists;
extra memory is O(C × V) plus one head-sized gradient.

Divergences follow TRL's `GKDTrainer.generalized_jsd_loss`: logits are divided by the
temperature, ``jsd`` with β uses the mixture m = (1-β)·p_student + β·p_teacher and
β·KL(teacher‖m) + (1-β)·KL(student‖m), with β=0 being forward KL(teacher‖student) and
β=1 reverse KL(student‖teacher). The result is the mean over unmasked tokens.

Gradients, per token, with p = student and q = teacher probabilities (s, t their logits):

    reverse KL  D = Σ p (log p − log q)   ∂D/∂s = p ⊙ (log p − log q − D)        ∂D/∂t = q − p
    forward KL  D = Σ q (log q − log p)   ∂D/∂s = p − q                          ∂D/∂t = q ⊙ (log q − log p − D)
    JSD(β)      a = (1−β)(log p − log m)  ∂D/∂s = p ⊙ (a − Σ p a)   likewise ∂D/∂t with b = β(log q − log m)
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

Divergence = Literal["reverse_kl", "forward_kl", "jsd"]


def _resolve(divergence: str, beta: float) -> tuple[str, float]:
    """TRL's endpoints: JSD with β=0 is forward KL and with β=1 reverse KL."""
    if divergence not in ("reverse_kl", "forward_kl", "jsd"):
        raise ValueError(f"divergence must be reverse_kl, forward_kl or jsd, got {divergence!r}")
    if divergence == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return "forward_kl", beta
        if beta == 1.0:
            return "reverse_kl", beta
    return divergence, beta


def chunk_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float, need_teacher_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token divergence (C,) and its gradients w.r.t. the (temperature-scaled) logits (C, V).

    `log_p`, `log_q` are float32 log-softmaxes of one chunk; they are consumed (overwritten).
    """
    if divergence == "reverse_kl":
        p = log_p.exp()
        diff = log_p.sub_(log_q)  # log p − log q, in place
        value = torch.linalg.vecdot(p, diff)
        grad_t = (log_q.exp_() - p) if need_teacher_grad else None
        grad_s = diff.sub_(value[:, None]).mul_(p)
        return value, grad_s, grad_t
    if divergence == "forward_kl":
        q = log_q.exp()
        diff = log_q.sub_(log_p)  # log q − log p
        value = torch.linalg.vecdot(q, diff)
        grad_s = log_p.exp_().sub_(q)
        grad_t = diff.sub_(value[:, None]).mul_(q) if need_teacher_grad else None
        return value, grad_s, grad_t
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
    a = log_p.sub_(log_m).mul_(1.0 - beta)  # (1−β)(log p − log m)
    b = log_q.sub_(log_m).mul_(beta)  # β(log q − log m)
    del log_m
    value = torch.linalg.vecdot(p, a) + torch.linalg.vecdot(q, b)  # β KL(q‖m) + (1−β) KL(p‖m)
    grad_s = a.sub_(torch.linalg.vecdot(p, a)[:, None]).mul_(p)
    grad_t = b.sub_(torch.linalg.vecdot(q, b)[:, None]).mul_(q) if need_teacher_grad else None
    return value, grad_s, grad_t


def chunk_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, w: torch.Tensor, count: torch.Tensor,
                temperature: float, divergence: str, beta: float, need_teacher_grad: bool, acc: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk from its logits (C, V): the weighted divergence sum and the scaled logit gradients.

    Everything between the GEMMs: softmaxes, divergence and gradients. On CUDA this is what `torch.compile`
    fuses (fullgraph: no graph breaks, no host syncs), so each chunk's logits are read a few times, not a dozen."""
    log_p = s_logits.to(acc).div(temperature).log_softmax(-1)  # (C, V)
    log_q = t_logits.to(acc).div(temperature).log_softmax(-1)  # (C, V)
    value, grad_s, grad_t = chunk_divergence(log_p, log_q, divergence, beta, need_teacher_grad)
    scale = (w / (count * temperature))[:, None]  # mean over tokens; d(s/T)/ds = 1/T
    return torch.dot(value, w), grad_s.mul_(scale), (grad_t.mul_(scale) if grad_t is not None else None)


@functools.cache
def compiled_chunk_terms():
    """`chunk_terms` compiled once per process (dynamic shapes: the last chunk is shorter)."""
    return torch.compile(chunk_terms, fullgraph=True, dynamic=True)


class _FusedLinearDivergence(torch.autograd.Function):
    """Forward computes the loss *and* all gradients chunk by chunk; backward only scales them.

    No host synchronisation inside the chunk loop on a GPU (a fully masked chunk is skipped only on a CPU, where
    checking costs nothing), and head gradients accumulate in fp32 (float64 for float64 inputs) whatever the
    heads' dtype: summing dozens of chunks' bf16 gradients in bf16 loses their low bits."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, divergence, beta,
                temperature, chunk_size, compile_chunks):
        n = student_hidden.shape[0]
        # float32 math for 16-bit inputs; float64 stays float64 (the tests compare against a float64 reference)
        acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
        weights = mask.to(acc)  # (N,) 1 for tokens that count, 0 for the rest (or any non-negative weight)
        count = weights.sum().clamp_min(1.0)
        need = ctx.needs_input_grad
        on_cpu = student_hidden.device.type == "cpu"
        terms = compiled_chunk_terms() if compile_chunks else chunk_terms
        grad_sh = torch.zeros_like(student_hidden) if need[0] else None
        grad_sw = torch.zeros(student_weight.shape, dtype=acc, device=student_weight.device) if need[1] else None
        grad_th = torch.zeros_like(teacher_hidden) if need[2] else None
        grad_tw = torch.zeros(teacher_weight.shape, dtype=acc, device=teacher_weight.device) if need[3] else None
        total = torch.zeros((), dtype=acc, device=student_hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            w = weights[start:end]
            if on_cpu and not bool(w.any()):
                continue  # a fully masked chunk costs nothing
            hs, ht = student_hidden[start:end], teacher_hidden[start:end]  # (C, d), (C, d_t)
            value, grad_s, grad_t = terms(hs @ student_weight.T, ht @ teacher_weight.T, w, count, temperature,
                                          divergence, beta, need[2] or need[3], acc)
            total += value
            if need[0] or need[1]:
                if need[0]:
                    grad_sh[start:end] = grad_s.to(student_hidden.dtype) @ student_weight
                if need[1]:
                    grad_sw.addmm_(grad_s.T, hs.to(acc))
            if grad_t is not None:
                if need[2]:
                    grad_th[start:end] = grad_t.to(teacher_hidden.dtype) @ teacher_weight
                if need[3]:
                    grad_tw.addmm_(grad_t.T, ht.to(acc))
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_sh, grad_sw, grad_th,
                                                                                   grad_tw)))
        ctx.dtypes = (student_weight.dtype, teacher_weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_sh, grad_sw, grad_th, grad_tw = ctx.saved_tensors
        need = ctx.needs_input_grad
        # loss.backward() passes 1: on a CPU, hand the buffers over without a copy; on a GPU, scale them anyway
        # rather than read grad_output back to the host to find out
        one = grad_output.device.type == "cpu" and bool(grad_output == 1.0)

        def scaled(grad: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            out = grad if dtype is None else grad.to(dtype)  # a 16-bit head's fp32 gradient: converted first
            if one:
                return out
            return out.mul_(grad_output) if out is not grad else out * grad_output  # never scale a saved buffer

        out = [
            scaled(grad_sh) if need[0] else None,
            scaled(grad_sw, ctx.dtypes[0]) if need[1] else None,
            scaled(grad_th) if need[2] else None,
            scaled(grad_tw, ctx.dtypes[1]) if need[3] else None,
        ]
        return (*out, None, None, None, None, None, None)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    divergence: Divergence = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 256,
    compile_chunks: bool | None = None,
) -> torch.Tensor:
    """Mean full-vocabulary divergence between student and teacher over unmasked tokens.

    `compile_chunks` (default: on CUDA) runs each chunk's softmax-divergence-gradient math through
    `torch.compile`; the eager PyTorch path is the reference, and what CPUs run.

    Shapes: hidden states ``(..., d)`` and ``(..., d_t)`` with the same leading dims,
    head weights ``(V, d)`` and ``(V, d_t)``, mask ``(...)`` (True/1 = counts). A float mask
    holds per-token weights w ≥ 0 and gives the weighted mean Σ w·D / Σ w.
    """
    divergence, beta = _resolve(divergence, beta)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
                         f"{tuple(teacher_hidden.shape)} must cover the same tokens")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, d)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # (N, d_t)
    flat_mask = torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device) if mask is None else \
        mask.reshape(-1).to(hs.device)
    if compile_chunks is None:
        compile_chunks = hs.device.type == "cuda"
    return _FusedLinearDivergence.apply(hs, student_weight, ht, teacher_weight, flat_mask, divergence, beta,
                                        temperature, chunk_size, compile_chunks)


def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    divergence: Divergence = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The same loss from whole logits tensors, by plain autograd: the reference the fused one must match."""
    divergence, beta = _resolve(divergence, beta)
    log_p = torch.log_softmax(student_logits / temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "reverse_kl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif divergence == "forward_kl":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        per_token = (beta * (log_q.exp() * (log_q - log_m)).sum(-1)
                     + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1))
    weights = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)
