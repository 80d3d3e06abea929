"""Fused chunked distillation loss vs a dense reference: forward+backward time and peak extra memory.

Side by side in one run, same sizes, same inputs. Prints one JSON object:
``{"fused": {"ms": …, "peak_extra_bytes": …}, "dense": {…}, "ratios": {…}}``, plus
``gemm_ms`` (one [N,d]×[d,V] GEMM) on CUDA.

On CPU each variant runs in its own subprocess and its peak extra memory is the rise
of the process's peak RSS over the inputs; on CUDA it is torch's peak allocation over
the inputs.

    python benchmarks/bench_opd_loss.py                       # CPU: N=2048, d=256, V=32000, float32
    python benchmarks/bench_opd_loss.py --device cuda --tokens 8192 --hidden 4096 --vocab 151936 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from opd.loss import dense_divergence, fused_linear_divergence


def make_inputs(args, device):
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rand(args.tokens, args.hidden).requires_grad_()
    ws = rand(args.vocab, args.hidden, scale=args.hidden ** -0.5).requires_grad_()
    ht = rand(args.tokens, args.hidden)
    wt = rand(args.vocab, args.hidden, scale=args.hidden ** -0.5)
    return hs, ws, ht, wt


def step(variant: str, hs, ws, ht, wt, chunk: int) -> None:
    if variant == "fused":
        loss = fused_linear_divergence(hs, ws, ht, wt, chunk_size=chunk)
    else:
        loss = dense_divergence(hs @ ws.T, (ht @ wt.T).detach())
    loss.backward()
    hs.grad = ws.grad = None


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args) -> dict:
    device = torch.device(args.device)
    inputs = make_inputs(args, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(args.variant, *inputs, args.chunk)
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(args.variant, *inputs, args.chunk)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(args.variant, *inputs, args.chunk)
        sync(device)
        times.append(time.perf_counter() - start)
    out = {"ms": round(1000 * statistics.median(times), 2), "peak_extra_bytes": int(peak)}
    if device.type == "cuda" and args.variant == "fused":
        hs, _, _, wt = inputs
        gemm = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            hs.detach() @ wt.T
            sync(device)
            gemm.append(time.perf_counter() - start)
        out["gemm_ms"] = round(1000 * statistics.median(gemm), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", choices=["fused", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child process: one variant, one JSON line
        print(json.dumps(measure(args)))
        return
    result = {"device": args.device, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
              "dtype": args.dtype, "chunk": args.chunk}
    for variant in ("fused", "dense"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True,
                               text=True, check=True)
        result[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    if "gemm_ms" in result["fused"]:
        result["gemm_ms"] = result["fused"].pop("gemm_ms")
        result["fused_over_4_gemms"] = round(result["fused"]["ms"] / (4 * result["gemm_ms"]), 3)
    result["ratios"] = {
        "time_fused_over_dense": round(result["fused"]["ms"] / result["dense"]["ms"], 3),
        "memory_fused_over_dense": round(result["fused"]["peak_extra_bytes"] / result["dense"]["peak_extra_bytes"], 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
