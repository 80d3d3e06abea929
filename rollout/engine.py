"""Generation engines: token ids in, token chunks with logprobs out, as they are produced.

Two engines share one small interface (`Engine`):

- `VLLMEngine` (the default): an in-process vLLM `LLMEngine` that we step
  ourselves, so every step's new tokens can be written to the WAL before the next
  step runs. New policy weights go in with vLLM's `reload_weights`.
- `HFEngine`: a plain transformers decoding loop (batched, KV cache, finished
  rows dropped from the batch) for machines where vLLM cannot run.

Both return *raw* logprobs (log-softmax of the unscaled logits, vLLM's default)
of each sampled token, and seed sampling per request, so a request with the same
seed samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


class EngineError(ValueError):
    """A request or model the engine cannot serve; the message says which and why."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue; `max_tokens` counts new tokens only."""

    id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(slots=True)  # one per request per step: no per-instance dict to build and free
class TokenChunk:
    """The tokens one engine step produced for one request."""

    id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # "stop" (EOS) or "length"; None while still running


class Engine(Protocol):
    """What the rollout service needs from a generation backend."""

    model_path: str
    eos_token_id: int
    max_model_len: int

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenChunk]]:
        """Yield, per engine step, the new tokens of every request that produced some."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights (names as in the checkpoint) in place."""
        ...


def generate_whole(engine: Engine, requests: Sequence[GenerationRequest]) -> dict[str, TokenChunk]:
    """Each request's whole completion (one chunk holding every token, the final finish reason), for callers that
    score or decode answers and have no use for the step-by-step stream a WAL writer reads."""
    whole = {r.id: TokenChunk(r.id, [], []) for r in requests}
    for step in engine.generate(requests):
        for chunk in step:
            done = whole[chunk.id]
            done.token_ids += chunk.token_ids
            done.logprobs += chunk.logprobs
            done.finish_reason = chunk.finish_reason
    return whole


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> tuple[int, ...]:
    """Token ids of a user prompt, wrapped in the tokenizer's chat template when it has one."""
    if chat_template and tokenizer.chat_template:
        return tuple(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=False))
    return tuple(tokenizer(prompt)["input_ids"])


def check_model_path(model: str) -> None:
    """A local model must be a transformers checkpoint; anything else is taken as a hub id."""
    path = Path(model).expanduser()
    looks_local = model.startswith(("/", ".", "~")) or path.exists()
    if not looks_local:
        return
    if not path.is_dir():
        raise EngineError(f"model {model}: no such directory")
    if not (path / "config.json").is_file():
        raise EngineError(f"model {model}: not a transformers checkpoint (no config.json in it)")


def check_request(request: GenerationRequest, max_model_len: int) -> GenerationRequest:
    """Reject a prompt that does not fit the context; cap max_tokens to the room left."""
    room = max_model_len - len(request.prompt_ids)
    if not request.prompt_ids:
        raise EngineError(f"request {request.id!r}: empty prompt")
    if room < 1:
        raise EngineError(
            f"request {request.id!r}: prompt is {len(request.prompt_ids)} tokens, the model's context is "
            f"{max_model_len}; shorten the prompt or raise max_model_len"
        )
    if request.max_tokens < 1:
        raise EngineError(f"request {request.id!r}: max_tokens must be at least 1, got {request.max_tokens}")
    if request.max_tokens > room:
        return GenerationRequest(**{**request.__dict__, "max_tokens": room})
    return request


CPU_KV_CACHE_GB = 1.0  # ~23k tokens of SmolLM2-135M, ~500k of the tiny demo model


class VLLMEngine:
    """In-process vLLM, stepped by us so tokens can be logged as they appear."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        seed: int = 0,
        kv_cache_gb: float | None = None,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool | None = None,
        async_scheduling: bool = True,
        tensor_parallel_size: int = 1,
        weight_transfer_backend: str | None = None,
    ):
        """`async_scheduling` lets vLLM schedule step t+1 while step t runs (on GPUs; vLLM's CPU platform
        turns it off whatever is asked). On a CPU the KV cache gets `kv_cache_gb` (default 1 GiB),
        not vLLM's default of 90% of the machine's memory.

        `enforce_eager` (default: eager on a CPU, compiled on a GPU) skips torch.compile. On a CPU that
        compile costs 20-30 s for every new checkpoint path (vLLM's compile cache is keyed by it, and every
        specialist and student is a new path) and generates no faster: `benchmarks/bench_engine_start.py`
        measured a start of 22 s eager against 43 s compiled, and 12.0k against 8.3k tokens/s.

        `tensor_parallel_size` > 1 shards the model over that many ranks (vLLM's own worker processes; gloo
        on a CPU). `weight_transfer_backend` (nccl on GPUs, gloo as `rollout.transport` registers it) opens
        vLLM's weight-transfer API, through which a trainer in another process broadcasts new weights.
        """
        check_model_path(model)
        # In-process engine: weights can be pushed with collective_rpc without pickling them.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        if enforce_eager is None:
            enforce_eager = not torch.cuda.is_available()
        if torch.cuda.is_available():
            kwargs = {"gpu_memory_utilization": gpu_memory_utilization}
        else:
            # vLLM's CPU runner crashes on seeded requests whose prefill is split across steps
            # ("CPU Generator does not use offset"); without chunked prefill no prompt is split.
            kwargs = {"enable_chunked_prefill": False}
            # On a CPU vLLM otherwise reserves 90% of the machine's memory for its KV cache, so a
            # second engine (another job beside this one) runs the machine out of memory.
            if kv_cache_gb is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kv_cache_gb = CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if tensor_parallel_size > 1:  # vLLM's own rank processes, even inside a Ray actor (its Ray executor
            # does not run on a CPU, and the actor's placement bundle already holds every rank's share)
            kwargs.update(tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="mp")
        if weight_transfer_backend is not None:
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer_backend)
        self.llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enable_prefix_caching=False, enforce_eager=enforce_eager,
                       async_scheduling=async_scheduling, **kwargs)
        self.model_path = model
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        tokenizer = self.llm.get_tokenizer()
        self.eos_token_id = tokenizer.eos_token_id

    def _params(self, request: GenerationRequest):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenChunk]]:
        """Step vLLM's engine core directly and read each step's new token ids and logprobs from its outputs.

        `LLMEngine.step()` would also run vLLM's output processor, which builds a `RequestOutput` per
        request per step (detokenizer state, logprob dicts, stop strings): on a small model that is a
        fifth of the step time, and we need none of it (ids in, ids out, no stop strings)."""
        engine = self.llm.llm_engine
        core = engine.engine_core  # in-process or multiprocess client: same add/get/abort calls
        checked = [check_request(r, self.max_model_len) for r in requests]
        tasks = engine.get_supported_tasks()
        names: dict[str, str] = {}  # vLLM's internal request id (ours plus a random suffix) -> ours
        for request in checked:
            core_request = engine.input_processor.process_inputs(
                request.id, {"prompt_token_ids": list(request.prompt_ids)}, self._params(request),
                supported_tasks=tasks)
            engine.input_processor.assign_request_id(core_request)
            names[core_request.request_id] = request.id
            core.add_request(core_request)
        pending = set(names)
        try:
            while pending:
                chunks = []
                for output in core.get_output().outputs:
                    name = names.get(output.request_id)
                    if name is None:  # a late output of an aborted earlier batch
                        continue
                    finish = output.finish_reason
                    if finish is not None:
                        pending.discard(output.request_id)
                        finish = str(finish)  # "stop" (EOS) or "length"
                    logprobs = output.new_logprobs  # [tokens, 1]: the sampled token's raw logprob
                    chunks.append(TokenChunk(name, list(output.new_token_ids),
                                             logprobs.logprobs[:, 0].tolist() if logprobs is not None else [],
                                             finish))
                if chunks:
                    yield chunks
        finally:
            if pending:  # stopped early (preemption, error): free the engine for the next batch
                core.abort_requests(list(pending))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(named_tensors))})


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` (B, V), for the whole batch at once: argmax where the temperature is 0, else
    the inverse CDF of the row's tempered (and nucleus-truncated) distribution at the row's own uniform draw.

    Each row's uniform comes from its request's own generator, so a seeded request samples the same tokens
    whatever else is in the batch; everything else is one tensor operation per step, not one per row."""
    greedy = temperatures == 0
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temperatures)[:, None], dim=-1)  # (B, V)
    if bool((top_ps < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs > top_ps[:, None], 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)  # (B, V)
    sampled = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
    return torch.where(greedy, logits.argmax(-1), sampled.clamp(max=logits.shape[-1] - 1))


class HFEngine:
    """A transformers decoding loop: the fallback where vLLM cannot run, and the benchmark baseline."""

    def __init__(self, model: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_model_len: int | None = None):
        check_model_path(model)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._attach(AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval(),
                     AutoTokenizer.from_pretrained(model), model, max_model_len, shared=False)

    @classmethod
    def sharing(cls, model: torch.nn.Module, tokenizer: Any, *, max_model_len: int | None = None) -> HFEngine:
        """An engine that generates with the trainer's own `model`, not a copy: a weight push costs nothing, as in
        TRL's generation without vLLM. On a CPU with a small model vLLM's work per step outweighs the model's
        (`benchmarks/bench_vs_trl.py`); this is the engine for that case (`engine: hf` in a spec)."""
        engine = cls.__new__(cls)
        engine._attach(model, tokenizer, str(getattr(model.config, "_name_or_path", "") or "shared"), max_model_len,
                       shared=True)
        return engine

    def _attach(self, model: torch.nn.Module, tokenizer: Any, path: str, max_model_len: int | None,
                *, shared: bool) -> None:
        self.model, self.shared, self.model_path = model, shared, path
        self.device = next(model.parameters()).device
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.max_model_len = max_model_len or model.config.max_position_embeddings

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenChunk]]:
        training = self.model.training
        self.model.eval()  # a shared model is the trainer's, in train mode: no dropout while sampling
        try:
            yield from self._generate(requests)
        finally:
            self.model.train(training)

    @torch.inference_mode()
    def _generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenChunk]]:
        from transformers import DynamicCache

        reqs = [check_request(r, self.max_model_len) for r in requests]
        if not reqs:
            return
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_token_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for row, r in enumerate(reqs):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in reqs]
        temperatures = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=self.device)
        top_ps = torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=self.device)
        produced = [0] * len(reqs)
        alive = list(range(len(reqs)))  # request index of each batch row
        cache = DynamicCache()
        step_input = ids
        while alive:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1]:]
            out = self.model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()  # (B, V)
            rows = torch.tensor(alive, device=self.device)
            uniforms = torch.tensor([float(torch.rand((), generator=generators[i])) if reqs[i].temperature else 0.0
                                     for i in alive], device=self.device)  # (B,): greedy rows draw nothing
            tokens = sample_rows(logits, temperatures[rows], top_ps[rows], uniforms)  # (B,)
            token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
            next_tokens = tokens.tolist()
            chunks, keep = [], []
            for row, (i, token) in enumerate(zip(alive, next_tokens, strict=True)):
                produced[i] += 1
                finish = None
                if token == self.eos_token_id and not reqs[i].ignore_eos:
                    finish = "stop"
                elif produced[i] >= reqs[i].max_tokens:
                    finish = "length"
                chunks.append(TokenChunk(reqs[i].id, [token], [token_logprobs[row]], finish))
                if finish is None:
                    keep.append(row)
            yield chunks
            step_input = tokens.unsqueeze(-1)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(step_input)], dim=-1)
            if len(keep) < len(alive):  # drop finished rows from the batch and the KV cache
                index = torch.tensor(keep, device=self.device, dtype=torch.long)
                cache.batch_select_indices(index)
                step_input, mask = step_input[index], mask[index]
                alive = [alive[row] for row in keep]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.shared:  # its weights are the trainer's: already the new ones
            return
        state = dict(named_tensors)
        missing = set(state) - set(self.model.state_dict())
        if missing:
            raise EngineError(f"unknown weight names for {self.model_path}: {sorted(missing)[:5]}")
        self.model.load_state_dict(state, strict=False)
