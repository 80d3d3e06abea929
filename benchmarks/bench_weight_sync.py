"""Weight pushes per transport against model size, and rollout throughput in-process against a rollout worker.

For each model size (random weights, Llama-shaped, built here), side by side in one run:

- `inprocess`: the engine in this process takes the tensors (`VLLMEngine.load_weights`, vLLM's reload_weights);
- `path`: a rollout worker (Ray actor) reloads the safetensors this process writes (write + reload);
- `broadcast`: a rollout worker receives every tensor over vLLM's weight-transfer API (gloo on a CPU, nccl
  with `--device cuda`); its first push also opens the group and is reported apart.

Each push is timed `--pushes` times (median); the JSON gives ms per push and ms per GB of fp32 weights. Then
rollout throughput, after one warm-up batch each: the same batch (`--prompts` × `--max-tokens`, sampled, EOS
allowed) through the rollout service in this process and through one worker, in alternating rounds; tokens
per second and their ratio.

    python benchmarks/bench_weight_sync.py [--sizes 128x2,512x4,1024x8] [--pushes 5] [--rounds 3]
    python benchmarks/bench_weight_sync.py --device cuda --sizes 2048x16 --vocab 32000 --readme   # ~1B, one GPU

`--readme` puts the JSON into benchmarks/README.md (its weight-sync block, one per device kind).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(root: Path, hidden: int, layers: int, vocab: int) -> Path:
    from specialists.base_model import TinyModelShape, init_base_model

    heads = hidden // 64
    shape = TinyModelShape(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=vocab)
    return init_base_model(root / f"h{hidden}-l{layers}", seed=0, shape=shape)


def timed(push, state: dict, pushes: int) -> list[float]:
    """Seconds of each of `pushes` calls of `push(named_tensors)`."""
    out = []
    for _ in range(pushes):
        started = time.perf_counter()
        push(state.items())
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x2,512x4,1024x8", help="hidden x layers, comma-separated")
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--readme", action="store_true", help="write the figures into benchmarks/README.md")
    args = parser.parse_args()

    import ray
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from benchmarks.bench_rollout import make_requests
    from rollout.engine import VLLMEngine
    from rollout.service import RolloutService
    from rollout.worker import RolloutWorkers, WorkerOptions

    gpu = args.device == "cuda"
    dtype = "bfloat16" if gpu else "float32"
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    root = Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    result: dict = {"device": args.device, "dtype": dtype, "pushes": args.pushes, "sizes": []}
    for size in args.sizes.split(","):
        hidden, layers = map(int, size.split("x"))
        model = build(root, hidden, layers, args.vocab)
        state = {k: v.to("cuda") if gpu else v for k, v in load_file(model / "model.safetensors").items()}
        gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
        params = sum(t.numel() for t in state.values())
        row: dict = {"hidden": hidden, "layers": layers, "params": params, "mb": gb * 1e3}
        engine = VLLMEngine(str(model), dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3)
        row["inprocess_ms"] = statistics.median(timed(engine.load_weights, state, args.pushes)) * 1e3
        del engine
        if gpu:
            torch.cuda.empty_cache()
        for sync in ("path", "broadcast"):
            workers = RolloutWorkers(WorkerOptions(str(model), weight_sync=sync, dtype=dtype, max_model_len=512,
                                                   gpu_memory_utilization=0.3, cpus_per_rank=1.0,
                                                   gpus_per_rank=1.0 if gpu else 0.0), engines=1)
            times = timed(workers.load_weights, state, args.pushes + 1)
            if sync == "broadcast":
                row["broadcast_first_ms"] = times[0] * 1e3  # opens the process group
            row[f"{sync}_ms"] = statistics.median(times[1:]) * 1e3
            workers.close()
        for key in ("inprocess", "path", "broadcast"):
            row[f"{key}_ms_per_gb"] = row[f"{key}_ms"] / gb
        result["sizes"].append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(result["sizes"][-1]), file=sys.stderr)

    # throughput: the same batch through the service here and on one worker, alternating rounds
    model = build(root, 128, 2, args.vocab)
    engine = VLLMEngine(str(model), dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3)
    workers = RolloutWorkers(WorkerOptions(str(model), weight_sync="path", dtype=dtype, max_model_len=512,
                                           gpu_memory_utilization=0.3, gpus_per_rank=1.0 if gpu else 0.0), engines=1)
    here, there = RolloutService(engine, root / "here"), workers.service(root / "there")
    tokenizer = AutoTokenizer.from_pretrained(model)
    rates: dict[str, list[float]] = {"inprocess": [], "worker": []}
    for service in (here, there):  # warm-up: each engine's first batch pays for allocations, not tokens
        service.run_or_resume("warm-up", make_requests(tokenizer, args.prompts, args.max_tokens, offset=10**6))
    for r in range(args.rounds):
        order = [("inprocess", here), ("worker", there)][:: 1 if r % 2 == 0 else -1]
        for name, service in order:
            batch = make_requests(tokenizer, args.prompts, args.max_tokens, offset=r * args.prompts)
            started = time.perf_counter()
            rollouts = service.run_or_resume(f"round-{r}", batch)
            rates[name].append(sum(len(x.completion_ids) for x in rollouts) / (time.perf_counter() - started))
    workers.close()
    result["throughput"] = {"prompts": args.prompts, "max_tokens": args.max_tokens,
                            "inprocess_tokens_per_s": [round(x) for x in rates["inprocess"]],
                            "worker_tokens_per_s": [round(x) for x in rates["worker"]],
                            "worker_over_inprocess": round(statistics.median(
                                w / i for w, i in zip(rates["worker"], rates["inprocess"], strict=True)), 3)}
    if args.readme:
        write_readme(result)
    print(json.dumps(result, indent=2))


def write_readme(result: dict) -> None:
    """Replace this device kind's weight-sync block in benchmarks/README.md (added at the end the first time)."""
    path = Path(__file__).resolve().parent / "README.md"
    start, end = f"<!-- weight-sync-{result['device']}:start -->", f"<!-- weight-sync-{result['device']}:end -->"
    block = (f"{start}\nLast run {time.strftime('%Y-%m-%d')} on {result['device']} "
             f"(`python benchmarks/bench_weight_sync.py --readme ...`):\n\n```json\n{json.dumps(result, indent=2)}\n"
             f"```\n{end}")
    text = path.read_text()
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n### Weight sync on {result['device']}\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
