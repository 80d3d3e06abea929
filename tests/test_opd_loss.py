"""The fused full-vocabulary loss against a dense float64 reference and TRL's own GKD loss."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd.loss import dense_divergence, fused_linear_divergence

CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]


def inputs(n=29, d=12, dt=20, v=41, dtype=torch.float64, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*lead, n, d, generator=g, dtype=dtype, requires_grad=True)
    ws = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    ht = torch.randn(*lead, n, dt, generator=g, dtype=dtype, requires_grad=True)
    wt = torch.randn(v, dt, generator=g, dtype=dtype, requires_grad=True)
    mask = torch.rand(*lead, n, generator=g) > 0.25
    return hs, ws, ht, wt, mask


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("chunk", [1, 5, 29, 64])
def test_loss_and_all_gradients_match_dense_float64(divergence, beta, temperature, chunk) -> None:
    hs, ws, ht, wt, mask = inputs()
    fused = fused_linear_divergence(hs, ws, ht, wt, mask, divergence, beta, temperature, chunk_size=chunk)
    grads = torch.autograd.grad(fused, (hs, ws, ht, wt))
    dense = dense_divergence(hs @ ws.T, ht @ wt.T, mask, divergence, beta, temperature)
    ref_grads = torch.autograd.grad(dense, (hs, ws, ht, wt))
    assert float(fused) == pytest.approx(float(dense), abs=1e-10)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())


def test_batched_shapes_scaled_backward_and_teacher_without_grad() -> None:
    hs, ws, ht, wt, mask = inputs(n=7, lead=(3,))
    ht, wt = ht.detach(), wt.detach()
    loss = fused_linear_divergence(hs, ws, ht, wt, mask, chunk_size=4)
    (3.0 * loss).backward()
    dense = dense_divergence(hs @ ws.T, ht @ wt.T, mask)
    ref = torch.autograd.grad(3.0 * dense, (hs, ws))
    assert torch.allclose(hs.grad, ref[0], atol=1e-6) and torch.allclose(ws.grad, ref[1], atol=1e-6)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_float_mask_weights_tokens(divergence, beta) -> None:
    hs, ws, ht, wt, mask = inputs()
    weights = torch.rand(hs.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64) * mask
    fused = fused_linear_divergence(hs, ws, ht, wt, weights, divergence, beta, chunk_size=5)
    per_token = [dense_divergence(hs[i:i + 1] @ ws.T, ht[i:i + 1] @ wt.T, None, divergence, beta)
                 for i in range(hs.shape[0])]
    want = sum(w * d for w, d in zip(weights, per_token, strict=True)) / weights.sum()  # Σ w·D / Σ w
    assert float(fused) == pytest.approx(float(want), abs=1e-10)
    grads = torch.autograd.grad(fused, (hs, ws))
    ref = torch.autograd.grad(want, (hs, ws))
    for got, expected in zip(grads, ref, strict=True):
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_masked_tokens_do_not_count() -> None:
    hs, ws, ht, wt, _ = inputs()
    nothing = torch.zeros(hs.shape[0], dtype=torch.bool)
    loss = fused_linear_divergence(hs, ws, ht, wt, nothing)
    loss.backward()
    assert float(loss) == 0.0 and float(hs.grad.abs().sum()) == 0.0
    same = fused_linear_divergence(hs.detach(), ws.detach(), hs.detach(), ws.detach())
    assert float(same) == pytest.approx(0.0, abs=1e-12)  # identical distributions: no divergence


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_values_match_trl_generalized_jsd_loss(beta: float, temperature: float) -> None:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    hs, ws, ht, wt, mask = inputs(n=9, lead=(2,), dtype=torch.float32)
    student_logits, teacher_logits = (hs @ ws.T).detach(), (ht @ wt.T).detach()  # (2, 9, V)
    labels = torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -100, dtype=torch.long))
    trl = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                         temperature=temperature)
    ours = fused_linear_divergence(hs.detach(), ws.detach(), ht.detach(), wt.detach(), mask, "jsd", beta, temperature)
    assert float(ours) == pytest.approx(float(trl), rel=1e-5, abs=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_whole_batch_logits_tensor_is_ever_built() -> None:
    n, v, d, chunk = 512, 3000, 16, 32
    hs, ws, ht, wt, mask = inputs(n=n, d=d, dt=d, v=v, dtype=torch.float32)
    with LargestTensor() as watch:
        loss = fused_linear_divergence(hs, ws, ht.detach(), wt.detach(), mask, chunk_size=chunk)
        loss.backward()
    assert watch.largest <= chunk * v < n * v  # at most one chunk of logits at a time
    with LargestTensor() as dense_watch:
        dense_divergence(hs @ ws.T, ht @ wt.T, mask).backward()
    assert dense_watch.largest >= n * v  # the reference does build them: the check can fail


def test_bad_arguments_say_what_is_wrong() -> None:
    hs, ws, ht, wt, _ = inputs()
    with pytest.raises(ValueError, match="divergence must be"):
        fused_linear_divergence(hs, ws, ht, wt, divergence="kl")
    with pytest.raises(ValueError, match="beta must be in"):
        fused_linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="must cover the same tokens"):
        fused_linear_divergence(hs, ws, ht[:3], wt)
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_linear_divergence(hs, ws, ht, wt[:5])


@pytest.mark.slow
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_compiled_chunk_math_equals_the_eager_reference(divergence, beta) -> None:
    """What CUDA runs by default (torch.compile, fullgraph: a graph break would raise), checked on the CPU."""
    hs, ws, ht, wt, mask = inputs(dtype=torch.float32)
    got = fused_linear_divergence(hs, ws, ht, wt, mask, divergence, beta, 0.7, chunk_size=8, compile_chunks=True)
    grads = torch.autograd.grad(got, (hs, ws, ht, wt))
    want = fused_linear_divergence(hs, ws, ht, wt, mask, divergence, beta, 0.7, chunk_size=8, compile_chunks=False)
    ref_grads = torch.autograd.grad(want, (hs, ws, ht, wt))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("divergence,beta", CASES[:3])
def test_on_cuda_bf16_loss_and_gradients_match_float64(divergence, beta) -> None:
    hs, ws, ht, wt, mask = inputs(n=300, d=64, dt=64, v=1000)
    dense = dense_divergence(hs @ ws.T, ht @ wt.T, mask, divergence, beta)
    ref = torch.autograd.grad(dense, (hs, ws))
    on = [t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in (hs, ws, ht, wt)]
    fused = fused_linear_divergence(*on, mask.cuda(), divergence, beta, chunk_size=64)  # compiled on CUDA
    grads = torch.autograd.grad(fused, on[:2])
    assert float(fused) == pytest.approx(float(dense), rel=2e-2)
    for got, want in zip(grads, ref, strict=True):
        assert torch.allclose(got.double().cpu(), want, atol=2e-2 * float(want.abs().max()))
