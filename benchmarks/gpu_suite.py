"""One command for the GPU path: the loss, the heads, generation, weight pushes and a step of each trainer.

    python benchmarks/gpu_suite.py            # on one GPU (H200: under 8 minutes); prints one JSON object
    python benchmarks/gpu_suite.py --readme   # ... and puts the figures in benchmarks/README.md
    python benchmarks/gpu_suite.py --small    # the same code on a CPU at toy sizes (CI runs it, under 2 minutes)
    python3 benchmarks/gpu_suite.py --parts loss,heads,fsdp   # PyTorch only: a GPU box without vLLM, TRL or Ray

Side by side in one run, every model built here with random weights (no hub):

1. loss — forward + backward at the anchor size (N=8,192 tokens, d=4,096, V=151,936, bf16): four [N,d]×[d,V]
   GEMMs (the floor), Retort's fused loss (compiled chunk math; and eager), Liger-Kernel's fused linear JSD
   (β=1; installed with pip if absent, GPU only) and the dense reverse KL that materialises the logits; time
   (median of 5) and peak extra memory of each.
2. heads — one distillation mini-batch over 10 teachers, each group's fused loss with that teacher's head:
   every head already on the device, against heads streamed from pinned host memory (prefetched one teacher
   ahead, two on the device) and the first mini-batch (heads read from storage); the share of step time that
   head loading adds, and how much copy time the prefetch hid.
3. fsdp — one FSDP2 trainer rank on nccl (bf16 compute, fp32 master weights) training distillation
   mini-batches of a ~1B-parameter Llama-shaped model (64 × 256 completion tokens; its own teacher, the trunk
   a frozen FSDP2 module): step time and peak memory.
4. generation — vLLM against Retort's transformers engine on a ~1B-parameter Llama-shaped model (256 prompts ×
   512 tokens), each with and without the WAL (the rollout service).
5. push — new weights into vLLM in-process, ms per GB.
6. steps — one GRPO step (TRL's GRPOTrainer through the rollout service, 8 × 8 completions) and one
   distillation step (that model as student and teacher) of the same model.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GIB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeat: int) -> dict:
    """Median seconds of `fn()` after one warm-up call, and its peak extra memory on a GPU (GiB)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    out = {"ms": round(statistics.median(times) * 1e3, 3)}
    if device.type == "cuda":
        out["extra_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / GIB, 3)
    return out


def liger_jsd():
    """Liger-Kernel's fused linear JSD module (β=1), installing the package if it is missing."""
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "liger-kernel"], check=True)
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    try:
        return LigerFusedLinearJSD(jsd_beta=1.0)
    except AssertionError:  # older releases take β in the open interval only
        return LigerFusedLinearJSD(jsd_beta=0.999)


# --- 1. the loss -------------------------------------------------------------------------------------------


def bench_loss(device: torch.device, dtype: torch.dtype, n: int, d: int, v: int, chunk: int, repeat: int) -> dict:
    from opd.loss import dense_divergence, fused_linear_divergence

    g = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
    ws = (0.02 * torch.randn(v, d, device=device, dtype=dtype, generator=g)).requires_grad_()
    ht = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    wt = 0.02 * torch.randn(v, d, device=device, dtype=dtype, generator=g)

    def clear() -> None:
        hs.grad = ws.grad = None

    def floor() -> None:  # the four GEMMs any full-vocabulary loss needs: two logits, two gradients
        with torch.no_grad():
            s, t = hs @ ws.T, ht @ wt.T
            _ = s @ ws, t.T @ hs
            del s, t

    def fused(compile_chunks: bool):
        def run() -> None:
            clear()
            fused_linear_divergence(hs, ws, ht, wt, chunk_size=chunk, compile_chunks=compile_chunks).backward()
        return run

    def dense() -> None:
        clear()
        dense_divergence(hs @ ws.T, ht @ wt.T).backward()

    out = {"tokens": n, "hidden": d, "vocab": v, "dtype": str(dtype).removeprefix("torch."), "chunk": chunk,
           "floor_4_gemms": measure(floor, device, repeat), "fused": measure(fused(device.type == "cuda"), device,
                                                                                repeat)}
    if device.type == "cuda":
        out["fused_eager"] = measure(fused(False), device, repeat)
        try:
            jsd = liger_jsd()

            def liger() -> None:
                clear()
                jsd(hs, ws, ht, wt).backward()
            out["liger_fused_linear_jsd"] = measure(liger, device, repeat)
        except Exception as error:
            out["liger_fused_linear_jsd"] = {"error": f"{type(error).__name__}: {error}"}
    else:
        out["liger_fused_linear_jsd"] = {"skipped": "Liger-Kernel's Triton kernels need a GPU"}
    out["dense"] = measure(dense, device, repeat)
    out["fused_over_floor"] = round(out["fused"]["ms"] / out["floor_4_gemms"]["ms"], 3)
    return out


# --- 2. heads ----------------------------------------------------------------------------------------------


def bench_heads(root: Path, device: torch.device, dtype: torch.dtype, n: int, d: int, v: int, chunk: int,
                teachers: int) -> dict:
    from safetensors.torch import save_file

    from opd.loss import fused_linear_divergence
    from opd.teachers import HeadStore

    locations = {}
    for i in range(teachers):
        (root / f"t{i}").mkdir(parents=True, exist_ok=True)
        save_file({"weight": 0.02 * torch.randn(v, d, dtype=dtype)}, str(root / f"t{i}" / "head.safetensors"))
        locations[i] = str(root / f"t{i}")
    per = n // teachers
    hs = torch.randn(per * teachers, d, device=device, dtype=dtype).requires_grad_()
    ws = (0.02 * torch.randn(v, d, device=device, dtype=dtype)).requires_grad_()
    ht = torch.randn(per * teachers, d, device=device, dtype=dtype)

    def minibatch(store: HeadStore) -> float:
        """The scheduler's loop: head i in use, head i+1 in flight, group i's loss; seconds of the whole."""
        sync(device)
        started = time.perf_counter()
        hs.grad = ws.grad = None
        total = torch.zeros((), device=device)
        for i in range(teachers):
            head = store.get(i)
            if i + 1 < teachers:
                store.prefetch(i + 1)
            part = slice(i * per, (i + 1) * per)
            total = total + fused_linear_divergence(hs[part], ws, ht[part], head, chunk_size=chunk) / teachers
        total.backward()
        store.settle()
        sync(device)
        return time.perf_counter() - started

    resident = HeadStore(locations, max_heads=teachers, device=device, dtype=dtype)
    minibatch(resident)  # reads and copies every head once: afterwards all stay on the device
    on_device = statistics.median(minibatch(resident) for _ in range(3))
    streamed = HeadStore(locations, max_heads=2, device=device, dtype=dtype)
    first = minibatch(streamed)  # heads read from storage (the page cache, after writing them)
    copies_before = streamed.stats.copy_seconds, streamed.stats.exposed_seconds
    steady = statistics.median(minibatch(streamed) for _ in range(3))
    copied = streamed.stats.copy_seconds - copies_before[0]
    exposed = streamed.stats.exposed_seconds - copies_before[1]
    return {"teachers": teachers, "head_mb": round(v * d * torch.finfo(dtype).bits / 8 / 1e6, 1),
            "heads_on_device_ms": round(on_device * 1e3, 2), "heads_from_host_ms": round(steady * 1e3, 2),
            "first_from_storage_ms": round(first * 1e3, 2),
            "loading_adds": round(steady / on_device - 1, 4),
            "copy_ms_per_minibatch": round(copied / 3 * 1e3, 2),
            "copy_hidden_fraction": round(1 - exposed / copied, 3) if copied else None}


# --- 3-5. a ~1B model: generation, push, steps ----------------------------------------------------------------


def build_model(root: Path, small: bool) -> Path:
    from specialists.base_model import TinyModelShape, init_base_model

    shape = TinyModelShape() if small else TinyModelShape(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)  # ~1.1B parameters
    return init_base_model(root / "model", seed=0, shape=shape)


def bench_generation(engine, hf, model: Path, root: Path, prompts: int, max_tokens: int) -> dict:
    """benchmarks/bench_rollout.py's measurements (same prompts, seeds and timers) on this suite's model."""
    from transformers import AutoTokenizer

    from benchmarks.bench_rollout import make_requests, time_engine, time_service

    tokenizer = AutoTokenizer.from_pretrained(model)
    out = {"prompts": prompts, "max_tokens": max_tokens}
    for name, e in (("vllm", engine), ("hf", hf)):
        time_engine(e, make_requests(tokenizer, 8, 8))  # warm-up: the first batch pays for allocations, not tokens
        seconds, tokens = time_engine(e, make_requests(tokenizer, prompts, max_tokens))
        out[f"{name}_tokens_per_s"] = round(tokens / seconds)
        seconds, tokens = time_service(e, make_requests(tokenizer, prompts, max_tokens, offset=prompts),
                                       root / f"wal-{name}", "b")
        out[f"{name}_wal_tokens_per_s"] = round(tokens / seconds)
    out["vllm_over_hf"] = round(out["vllm_tokens_per_s"] / out["hf_tokens_per_s"], 2)
    out["wal_costs_vllm"] = round(1 - out["vllm_wal_tokens_per_s"] / out["vllm_tokens_per_s"], 4)
    return out


def bench_push(engine, model: Path, device: torch.device) -> dict:
    from safetensors.torch import load_file

    state = {k: v.to(device) for k, v in load_file(model / "model.safetensors").items()}
    gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    times = []
    for _ in range(4):
        sync(device)
        started = time.perf_counter()
        engine.load_weights(state.items())
        sync(device)
        times.append(time.perf_counter() - started)
    ms = statistics.median(times[1:]) * 1e3
    return {"gb": round(gb, 3), "ms": round(ms, 1), "ms_per_gb": round(ms / gb, 1)}


def bench_steps(engine, model: Path, root: Path, small: bool) -> dict:
    from opd.config import DistillationRun
    from opd.train import Distiller
    from specialists.config import SpecialistJob
    from specialists.domains import write_demo_data
    from specialists.grpo import build_grpo_trainer

    data = write_demo_data(root / "data", n_train=200, n_eval=16)["math"]
    cap = 8 if small else 64
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "suite-grpo", "domain": "math", "base_model": str(model),
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}, "sft": {"enabled": False},
        "grpo": {"max_steps": 3, "batch_size": 64, "num_generations": 8, "max_completion_length": cap,
                 "learning_rate": 1e-6, "gradient_checkpointing": not small, "save_steps": 1000},
        "rewards": [{"name": "math"}],
    })
    trainer, _ = build_grpo_trainer(spec, str(model), root / "grpo", engine)
    trainer.train()
    grpo = [row["step_time"] for row in trainer.state.log_history if "step_time" in row]
    del trainer
    run = DistillationRun.model_validate({
        "kind": "distillation", "name": "suite-distill", "student": {"init": str(model)},
        "teachers": [{"index": 0, "name": "math", "checkpoint": str(model)}],
        "mixture": [{"domain": "math", "prompts": str(data / "train.jsonl"), "teacher": 0}],
        "steps": 3, "batch_size": 64, "generation": {"max_new_tokens": cap}, "eval_every": 1000,
        "save_every": 1000, "max_resident_trunks": 1, "chunk_size": 512,
    })
    Distiller(run, root / "distill", engine=engine).train()
    rows = [json.loads(line) for line in (root / "distill" / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in rows if r["step"] >= 1]
    distill = [b - a for a, b in itertools.pairwise(stamps)]
    return {"completion_cap": cap, "grpo_step_s": round(statistics.median(grpo[1:] or grpo), 3),
            "distill_step_s": round(statistics.median(distill or [float("nan")]), 3),
            "distill_breakdown_s": {k.removeprefix("time/"): round(v, 4) for k, v in rows[-1]["metrics"].items()
                                    if k.startswith("time/")}}


def bench_fsdp(root: Path, device: torch.device, small: bool) -> dict:
    """One FSDP2 trainer rank (nccl on a GPU, gloo on a CPU) training distillation mini-batches of the ~1B model
    as its own teacher: the student sharded with bf16 compute over fp32 master weights, the teacher's trunk a
    frozen FSDP2 module, the fused loss inside the student's registered FSDP forward; step time (teacher pass,
    loss, backward, AdamW) and peak memory. What each rank of a multi-GPU distillation runs, collectives and
    all (PyTorch and transformers only)."""
    import socket

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from opd.hidden_cache import HiddenStateCache, RoutedSequence
    from opd.scheduler import shard_student, shard_trunk
    from opd.teachers import HeadStore, split_teacher

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    model = build_model(root, small)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if gpu else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        info = split_teacher(str(model), str(root / "teacher"), 0)
        heads = HeadStore({0: info.location}, max_heads=1, dtype=dtype, device=device)
        cache = HiddenStateCache(storage_dtype=dtype, compute_dtype=dtype, device=device, max_resident_trunks=1,
                                 shard=shard_trunk)
        student = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device)
        params = sum(p.numel() for p in student.parameters())
        student = shard_student(student, "bf16" if gpu else "fp32")
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
        sequences, prompt, completion = (64, 64, 256) if not small else (8, 8, 16)
        generator = torch.Generator().manual_seed(0)
        vocab = student.config.vocab_size

        def ids(n: int) -> tuple[int, ...]:
            return tuple(torch.randint(4, vocab, (n,), generator=generator).tolist())

        batch = [RoutedSequence(f"s{i}", 0, ids(prompt), ids(completion)) for i in range(sequences)]
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(4):
            sync(device)
            started = time.perf_counter()
            cache.clear()
            cache.fill(batch, {0: info.location}, {0: info.vocab_size}, teachers=[0])
            loss, _ = student.distillation_loss(batch, cache, heads, max_batch_tokens=None,
                                                chunk_size=1024 if gpu else 128)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sync(device)
            times.append(time.perf_counter() - started)
        peak = round(torch.cuda.max_memory_allocated() / GIB, 2) if gpu else None
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "params_m": round(params / 1e6, 1), "tokens": sequences * completion,
            "step_s": round(statistics.median(times[1:]), 3), "first_step_s": round(times[0], 3),
            "peak_gib": peak}


# --- the suite ---------------------------------------------------------------------------------------------


PARTS = ("loss", "heads", "fsdp", "generation", "push", "steps")


def run(small: bool, parts: tuple[str, ...] = PARTS) -> dict:
    """The suite's `parts` (loss, heads and fsdp need only PyTorch; the rest need vLLM, TRL and the project's
    install)."""
    gpu = torch.cuda.is_available() and not small
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    root = Path(tempfile.mkdtemp(prefix="retort-gpu-suite-"))
    started = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "small": small,
                    "torch": torch.__version__}
    n, d, v = (8192, 4096, 151936) if not small else (512, 128, 4096)
    if "loss" in parts:
        result["loss"] = bench_loss(device, dtype, n, d, v, chunk=1024 if gpu else 128, repeat=5 if gpu else 2)
        if gpu:
            torch.cuda.empty_cache()
    if "heads" in parts:
        result["heads"] = bench_heads(root / "heads", device, dtype, n, d, v, chunk=1024 if gpu else 128,
                                      teachers=10)
        if gpu:
            torch.cuda.empty_cache()
    if "fsdp" in parts:
        result["fsdp"] = bench_fsdp(root / "fsdp", device, small)
        if gpu:
            torch.cuda.empty_cache()
    if not {"generation", "push", "steps"} & set(parts):
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return result
    from rollout.engine import HFEngine, VLLMEngine

    model = build_model(root, small)
    engine = VLLMEngine(str(model), dtype="bfloat16" if gpu else "float32", max_model_len=1024,
                        gpu_memory_utilization=0.3)
    hf = HFEngine(str(model), device=str(device), dtype=dtype)
    prompts, max_tokens = (256, 512) if not small else (16, 16)
    if "generation" in parts:
        result["generation"] = bench_generation(engine, hf, model, root, prompts, max_tokens)
    del hf
    if "push" in parts:
        result["push"] = bench_push(engine, model, device)
    if "steps" in parts:
        result["steps"] = bench_steps(engine, model, root, small)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


README_START, README_END = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"


def write_readme(result: dict) -> None:
    """Replace the suite's block in benchmarks/README.md with this run's figures."""
    path = ROOT / "benchmarks" / "README.md"
    text = path.read_text()
    block = (f"{README_START}\nLast run: {time.strftime('%Y-%m-%d')} on {result['device']} "
             f"(`python benchmarks/gpu_suite.py --readme`, {result['wall_s']} s):\n\n```json\n"
             f"{json.dumps(result, indent=2)}\n```\n{README_END}")
    if README_START in text:
        text = text[:text.index(README_START)] + block + text[text.index(README_END) + len(README_END):]
    else:
        text = text.rstrip("\n") + "\n\n## GPU suite — `python benchmarks/gpu_suite.py`\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="toy sizes on the CPU (what CI runs)")
    parser.add_argument("--readme", action="store_true", help="write the figures into benchmarks/README.md")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of " + ", ".join(PARTS) + " (loss, heads, fsdp need PyTorch only)")
    args = parser.parse_args()
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if not args.small and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --small for the CPU check, or on a GPU for the figures")
    with contextlib.redirect_stdout(sys.stderr):  # trainers print their logs: stdout is the JSON alone
        result = run(args.small, parts)
    if args.readme:
        write_readme(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
