"""Both engines on the tiny model: streaming, agreement, seeds, weight pushes, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rollout.engine import EngineError, GenerationRequest, HFEngine, VLLMEngine


def collect(engine, requests):
    """Run a batch; returns {id: (tokens, logprobs, finish)} and the number of steps seen."""
    out, steps = {}, 0
    for step in engine.generate(requests):
        steps += 1
        for chunk in step:
            tokens, logprobs, _ = out.get(chunk.id, ([], [], None))
            out[chunk.id] = (tokens + chunk.token_ids, logprobs + chunk.logprobs, chunk.finish_reason)
    return out, steps


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tuple(tokenizer(f"<|user|>{i}*{i}=?\n<|assistant|>")["input_ids"]) for i in range(6)]


def test_greedy_agrees_across_engines_and_streams(vllm_engine, hf_engine, prompts) -> None:
    requests = [GenerationRequest(f"r{i}", p, max_tokens=12, temperature=0.0) for i, p in enumerate(prompts)]
    fast, fast_steps = collect(vllm_engine, requests)
    slow, _ = collect(hf_engine, requests)
    assert fast_steps >= 12  # tokens arrive step by step, not at the end
    for rid, (tokens, logprobs, finish) in fast.items():
        assert tokens == slow[rid][0]
        assert finish in ("stop", "length") and len(tokens) == len(logprobs)
        assert all(lp <= 0 for lp in logprobs)
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(slow[rid][1]), atol=1e-3)


@pytest.mark.parametrize("engine_name", ["vllm_engine", "hf_engine"])
def test_seeds_make_sampling_reproducible(engine_name: str, request, prompts) -> None:
    engine = request.getfixturevalue(engine_name)
    alone, _ = collect(engine, [GenerationRequest("x", prompts[0], 16, temperature=1.0, seed=7)])
    crowd = [GenerationRequest(f"o{i}", p, 16, temperature=1.0, seed=100 + i) for i, p in enumerate(prompts)]
    together, _ = collect(engine, [*crowd, GenerationRequest("x", prompts[0], 16, temperature=1.0, seed=7)])
    assert alone["x"][0] == together["x"][0]  # same seed, same tokens, whatever else is in the batch
    other, _ = collect(engine, [GenerationRequest("x", prompts[0], 16, temperature=1.0, seed=8)])
    assert other["x"][0] != alone["x"][0]


def test_pushed_weights_change_outputs_and_restore(vllm_engine, hf_engine, tiny_model_dir: Path, prompts) -> None:
    original = load_file(tiny_model_dir / "model.safetensors")
    requests = [GenerationRequest(f"r{i}", p, 10, temperature=0.0) for i, p in enumerate(prompts)]
    before, _ = collect(vllm_engine, requests)
    generator = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=generator) if k == "lm_head.weight" else v
                 for k, v in original.items()}
    try:
        vllm_engine.load_weights(perturbed.items())
        hf_engine.load_weights(perturbed.items())
        changed, _ = collect(vllm_engine, requests)
        assert tokens_of(changed) != tokens_of(before)
        assert tokens_of(changed) == tokens_of(collect(hf_engine, requests)[0])  # both took the same weights
    finally:
        vllm_engine.load_weights(original.items())
        hf_engine.load_weights(original.items())
    assert tokens_of(collect(vllm_engine, requests)[0]) == tokens_of(before)


@pytest.mark.parametrize("engine_name", ["vllm_engine", "hf_engine"])
def test_a_batch_stopped_early_leaves_the_engine_clean(engine_name: str, request, prompts) -> None:
    engine = request.getfixturevalue(engine_name)
    requests = [GenerationRequest(f"r{i}", p, 12, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
    steps = engine.generate(requests)
    next(steps), next(steps)
    steps.close()  # what the rollout service does on preemption
    assert tokens_of(collect(engine, requests)[0]) == tokens_of(collect(engine, requests)[0])
    if engine_name == "vllm_engine":
        assert not engine.llm.llm_engine.engine_core.engine_core.scheduler.has_unfinished_requests()


def tokens_of(results) -> dict[str, list[int]]:
    return {rid: tokens for rid, (tokens, _, _) in results.items()}


def test_bad_input_is_one_clear_line(tmp_path: Path, hf_engine, prompts) -> None:
    with pytest.raises(EngineError, match=f"model {tmp_path / 'nope'}: no such directory"):
        VLLMEngine(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="not a transformers checkpoint"):
        HFEngine(str(tmp_path / "empty"))
    too_long = GenerationRequest("big", tuple([5] * 2100), 4)
    with pytest.raises(EngineError, match="request 'big': prompt is 2100 tokens, the model's context is 2048"):
        collect(hf_engine, [too_long])
    with pytest.raises(EngineError, match="unknown weight names"):
        hf_engine.load_weights([("not.a.weight", torch.zeros(1))])


def test_max_tokens_capped_to_context(hf_engine) -> None:
    near_end = GenerationRequest("edge", tuple([5] * 2044), 50, temperature=0.0)
    out, _ = collect(hf_engine, [near_end])
    tokens, _, finish = out["edge"]
    assert len(tokens) <= 4 and finish in ("stop", "length")


def test_a_shared_engine_generates_with_the_trainers_own_weights(hf_engine, tiny_model_dir: Path, prompts) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    shared = HFEngine.sharing(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    requests = [GenerationRequest(f"r{i}", p, 10, temperature=0.0) for i, p in enumerate(prompts)]
    rng = torch.get_rng_state()
    assert tokens_of(collect(shared, requests)[0]) == tokens_of(collect(hf_engine, requests)[0])
    assert torch.equal(torch.get_rng_state(), rng)  # greedy decoding draws nothing from the trainer's RNG
    assert model.training  # put back in train mode after sampling in eval mode
    original = load_file(tiny_model_dir / "model.safetensors")
    with torch.no_grad():  # what an optimizer step does to the trainer's model: no push follows
        model.lm_head.weight.add_(0.5 * torch.randn(model.lm_head.weight.shape,
                                                    generator=torch.Generator().manual_seed(1)))
    shared.load_weights(iter([("not.a.weight", torch.zeros(1))]))  # a no-op: its weights are the model's
    try:
        hf_engine.load_weights(model.state_dict().items())
        changed = tokens_of(collect(shared, requests)[0])
        assert changed == tokens_of(collect(hf_engine, requests)[0])
        assert changed != tokens_of(collect(HFEngine(str(tiny_model_dir)), requests)[0])
    finally:
        hf_engine.load_weights(original.items())


def test_sample_rows_inverts_each_rows_cdf_at_its_own_draw() -> None:
    from rollout.engine import sample_rows

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]))
    temperatures = torch.tensor([1.0, 1.0, 0.0, 1.0])
    top_ps = torch.tensor([1.0, 1.0, 1.0, 0.6])  # the last row keeps only its top two (0.5, 0.3)
    # row 0: 0.25 falls in (0.1, 0.3] -> token 1; row 1: 0.9 in (0.8, 1.0] -> 2; row 2 is greedy -> 0;
    # row 3 keeps tokens 1 (0.5) and 2 (0.3): 0.7 of that mass is 0.56, past token 1's 0.5 -> 2
    tokens = sample_rows(logits, temperatures, top_ps, torch.tensor([0.25, 0.9, 0.99, 0.7]))
    assert tokens.tolist() == [1, 2, 0, 2]
    assert sample_rows(logits, temperatures, top_ps, torch.tensor([0.0, 0.0, 0.0, 0.0])).tolist() == [0, 0, 0, 1]
    flat = sample_rows(torch.zeros(1, 4), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.99999]))
    assert flat.tolist() == [3]
