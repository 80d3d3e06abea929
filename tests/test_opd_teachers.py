"""Teacher split, the head store, the hidden-state cache and the teacher-ordered mini-batch loss."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.hidden_cache import HiddenStateCache, RoutedSequence, completion_positions, last_hidden_states, length_buckets
from opd.loss import dense_divergence
from opd.scheduler import distillation_loss
from opd.teachers import HeadStore, split_teacher
from specialists.base_model import TinyModelShape, init_base_model
from tests.test_opd_loss import LargestTensor

SHAPE = TinyModelShape(vocab_size=4096)  # a vocabulary large enough that whole-batch logits would stand out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opd-models")
    return {name: init_base_model(root / name, seed=seed, shape=SHAPE)
            for name, seed in (("student", 0), ("t0", 1), ("t1", 2), ("t2", 3))}


@pytest.fixture(scope="module")
def teachers(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("teacher-store")
    locations = {0: str(root / "t0"), 1: "memory://retort-test/t1", 2: f"file://{root / 't2'}"}  # path and URLs
    for index, location in locations.items():
        split_teacher(str(models[f"t{index}"]), location, index)
    return locations


def sequences(n: int, seed: int = 0) -> list[RoutedSequence]:
    rng = random.Random(seed)
    out = [RoutedSequence(f"r{i}", i % 3, tuple(rng.randrange(7, 100) for _ in range(rng.randint(3, 9))),
                          tuple(rng.randrange(7, 4000) for _ in range(rng.randint(2, 12)))) for i in range(n)]
    rng.shuffle(out)
    return out


def test_split_keeps_the_head_apart(models, teachers) -> None:
    info = split_teacher(str(models["t0"]), teachers[0], 0)  # a second split is a no-op
    assert (info.vocab_size, info.hidden_size) == (4096, 128)
    original = load_file(models["t0"] / "model.safetensors")
    trunk = load_file(Path(teachers[0]) / "trunk" / "model.safetensors")
    assert "lm_head.weight" not in trunk and trunk.keys() == original.keys() - {"lm_head.weight"}
    store = HeadStore(teachers, max_heads=3)
    assert torch.equal(store.get(0), original["lm_head.weight"])


def test_length_buckets_pad_little_and_respect_the_budget() -> None:
    lengths = [20, 110, 21, 90, 19, 108, 500]
    batches = length_buckets(lengths, max_batch_tokens=240)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget on its own: a batch of one
    for batch in batches[1:]:
        assert len(batch) * max(lengths[i] for i in batch) <= 240
    assert batches[-1] == [0, 4]  # sorted by length: the shortest pad only to each other


def test_bucketed_hidden_states_equal_one_padded_batch(models) -> None:
    trunk = AutoModelForCausalLM.from_pretrained(models["t0"], dtype=torch.float64).get_decoder()
    batch = sequences(11, seed=5)
    one = last_hidden_states(trunk, batch, 0, torch.device("cpu"), max_batch_tokens=10**6)
    bucketed = last_hidden_states(trunk, batch, 0, torch.device("cpu"), max_batch_tokens=40)
    for a, b in zip(one, bucketed, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_head_store_lru_budget_and_counters(teachers) -> None:
    store = HeadStore(teachers, max_heads=2)
    for index in (0, 1, 0, 2, 1):
        store.get(index)
    head_bytes = 4096 * 128 * 4
    assert (store.stats.loads, store.stats.hits, store.stats.evictions) == (4, 1, 2)
    assert store.stats.bytes_loaded == 4 * head_bytes and store.stats.load_seconds > 0
    assert store.resident() == [2, 1] and store.stats.max_resident == 2
    tight = HeadStore(teachers, max_heads=3, budget_bytes=head_bytes + 10)
    tight.get(0)
    tight.get(1)
    assert tight.resident() == [1] and tight.resident_bytes == head_bytes
    with pytest.raises(MemoryError, match="over the head budget"):
        HeadStore(teachers, budget_bytes=1000).get(0)
    with pytest.raises(KeyError, match="no teacher with index 7"):
        store.get(7)


def test_cached_hidden_states_plus_head_equal_a_full_teacher_forward(models, teachers) -> None:
    batch = sequences(9)
    cache = HiddenStateCache(storage_dtype=torch.float64, compute_dtype=torch.float64)
    report = cache.fill(batch, teachers, {i: 4096 for i in teachers})
    assert report.teachers == [0, 1, 2]  # trunks ran once each, in index order
    assert report.bytes_stored == report.tokens * 128 * 8 and report.logits_bytes == report.tokens * 4096 * 8
    assert report.savings == 4096 / 128
    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float64)
    fused = distillation_loss(student, batch, cache, HeadStore(teachers, max_heads=1, dtype=torch.float64))
    fused.loss.backward()
    fused_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()

    full = {i: AutoModelForCausalLM.from_pretrained(models[f"t{i}"], dtype=torch.float64) for i in teachers}
    s_logits, t_logits = [], []
    for s in batch:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        where = completion_positions(len(s.prompt_ids), len(s.completion_ids))
        s_logits.append(student(ids).logits[0, where])
        t_logits.append(full[s.teacher_index](ids).logits[0, where].detach())
    dense = dense_divergence(torch.cat(s_logits), torch.cat(t_logits))
    dense.backward()
    assert float(fused.loss) == pytest.approx(float(dense), rel=1e-9)
    assert torch.allclose(fused_grad, student.lm_head.weight.grad, atol=1e-9)


def test_masked_tokens_are_context_only_the_loss_scores_the_rest(models, teachers) -> None:
    """An agent trajectory's tool results sit in its completion with loss_mask False: the teacher and the student
    read them, the loss is over the other tokens alone, in both normalizations; an all-masked sequence counts
    nowhere."""
    rng = random.Random(5)
    batch = [RoutedSequence(s.rollout_id, s.teacher_index, s.prompt_ids, s.completion_ids,
                            tuple(rng.random() < 0.6 for _ in s.completion_ids)) for s in sequences(9, seed=4)]
    batch[0] = RoutedSequence(batch[0].rollout_id, batch[0].teacher_index, batch[0].prompt_ids,
                              batch[0].completion_ids, (False,) * len(batch[0].completion_ids))
    batch[1] = RoutedSequence(batch[1].rollout_id, batch[1].teacher_index, batch[1].prompt_ids,
                              batch[1].completion_ids)  # no mask: every token scored
    cache = HiddenStateCache(storage_dtype=torch.float64, compute_dtype=torch.float64)
    cache.fill(batch, teachers, {i: 4096 for i in teachers})
    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float64)
    heads = HeadStore(teachers, max_heads=1, dtype=torch.float64)
    full = {i: AutoModelForCausalLM.from_pretrained(models[f"t{i}"], dtype=torch.float64) for i in teachers}
    per_sequence = []
    for s in batch:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        where = completion_positions(len(s.prompt_ids), len(s.completion_ids))
        keep = torch.tensor(s.loss_mask or (True,) * len(s.completion_ids))
        if keep.any():
            per_sequence.append((int(keep.sum()), student(ids).logits[0, where][keep],
                                 full[s.teacher_index](ids).logits[0, where][keep].detach()))
    by_token = distillation_loss(student, batch, cache, heads)
    assert by_token.tokens == by_token.weight == sum(n for n, _, _ in per_sequence) < sum(
        len(s.completion_ids) for s in batch)
    dense = dense_divergence(torch.cat([s for _, s, _ in per_sequence]), torch.cat([t for _, _, t in per_sequence]))
    assert float(by_token.loss) == pytest.approx(float(dense), rel=1e-9)
    by_token.loss.backward()
    fused_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    dense.backward()
    assert torch.allclose(fused_grad, student.lm_head.weight.grad, atol=1e-9)
    by_sequence = distillation_loss(student, batch, cache, heads, normalization="sequence")
    assert by_sequence.weight == len(per_sequence) == len(batch) - 1
    each = [dense_divergence(s, t) for _, s, t in per_sequence]
    assert float(by_sequence.loss) == pytest.approx(float(sum(each) / len(each)), rel=1e-9)


def test_resident_trunks_skip_the_reload_and_change_nothing(teachers) -> None:
    vocab = {i: 4096 for i in teachers}
    fresh = HiddenStateCache()
    resident, thrashing = HiddenStateCache(max_resident_trunks=3), HiddenStateCache(max_resident_trunks=2)
    for step in range(2):
        batch = sequences(9, seed=step)
        loads = [cache.fill(batch, teachers, vocab).trunk_loads for cache in (fresh, resident, thrashing)]
        assert loads == [3, 3 if step == 0 else 0, 3]  # index order 0,1,2 evicts 0 before it is needed again
        for s in batch:
            assert torch.equal(resident.get(s.rollout_id, s.teacher_index), fresh.get(s.rollout_id, s.teacher_index))
    assert resident.resident_trunks() == [teachers[0], teachers[1], teachers[2]]
    assert thrashing.resident_trunks() == [teachers[1], teachers[2]]
    with pytest.raises(ValueError, match="max_resident_trunks"):
        HiddenStateCache(max_resident_trunks=-1)


def test_sequence_normalization_is_the_mean_of_each_sequences_mean(models, teachers) -> None:
    batch = sequences(9, seed=3)
    cache = HiddenStateCache(storage_dtype=torch.float64, compute_dtype=torch.float64)
    cache.fill(batch, teachers, {i: 4096 for i in teachers})
    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float64)
    heads = HeadStore(teachers, max_heads=1, dtype=torch.float64)
    by_sequence = distillation_loss(student, batch, cache, heads, normalization="sequence")
    assert by_sequence.weight == len(batch) and by_sequence.tokens == sum(len(s.completion_ids) for s in batch)
    each = [distillation_loss(student, [s], cache, heads).loss for s in batch]  # one sequence: its token mean
    assert float(by_sequence.loss) == pytest.approx(float(sum(each) / len(each)), rel=1e-9)
    by_token = distillation_loss(student, batch, cache, heads)
    lengths = [len(s.completion_ids) for s in batch]
    assert float(by_token.loss) == pytest.approx(float(sum(n * x for n, x in zip(lengths, each, strict=True))
                                                       / sum(lengths)), rel=1e-9)
    with pytest.raises(ValueError, match="normalization must be"):
        distillation_loss(student, batch, cache, heads, normalization="batch")


def test_each_head_loads_once_per_minibatch_and_no_batch_logits(models, teachers) -> None:
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    heads = HeadStore(teachers, max_heads=1)
    cache = HiddenStateCache()
    for step in range(2):
        batch = sequences(24, seed=step)
        assert [s.teacher_index for s in batch] != sorted(s.teacher_index for s in batch)  # really shuffled
        cache.clear()
        cache.fill(batch, teachers, {i: 4096 for i in teachers})
        with LargestTensor() as watch:
            result = distillation_loss(student, batch, cache, heads, chunk_size=16)
            result.loss.backward()
        assert result.teacher_order == [0, 1, 2]
        assert heads.stats.loads == 3 * (step + 1)  # each teacher's head once per mini-batch
        assert watch.largest < result.tokens * 4096  # never a whole-batch [tokens × vocab] tensor
    assert heads.stats.max_resident == 1


def test_next_head_is_prefetched_before_the_current_groups_loss(models, teachers) -> None:
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    head_bytes = 4096 * 128 * 4
    heads = HeadStore(teachers, max_heads=2)
    cache = HiddenStateCache()
    for step in range(2):
        batch = sequences(18, seed=step)
        cache.clear()
        cache.fill(batch, teachers, {i: 4096 for i in teachers})
        heads.events.clear()
        distillation_loss(student, batch, cache, heads).loss.backward()
        log = [event for event in heads.events if event[0] != "read"]
        assert log == [("copy", 0), ("use", 0), ("prefetch", 1), ("loss", 0),  # 1's copy issued before 0's loss
                       ("use", 1), ("prefetch", 2), ("loss", 1), ("use", 2), ("loss", 2)]
    assert heads.stats.reads == 3  # each head read from storage once in the run, then copied from host memory
    assert heads.stats.prefetches == 4 and heads.host_resident() == [0, 1, 2]
    assert heads.stats.copy_seconds == 0 and heads.stats.hidden_fraction == 1.0  # nothing to copy on a CPU

    tight = HeadStore(teachers, max_heads=2, host_budget_bytes=2 * head_bytes)  # two heads of host memory
    for index in (0, 1, 2, 0):
        tight.get(index)
    assert tight.stats.reads == 4 and tight.stats.host_evictions == 2 and tight.host_resident() == [2, 0]
    single = HeadStore(teachers, max_heads=1)
    single.get(0)
    assert not single.prefetch(1) and single.resident() == [0]  # no room beside the head in use


@pytest.mark.gpu
def test_on_cuda_heads_copy_on_a_side_stream_and_the_loss_matches(models, teachers) -> None:
    device = torch.device("cuda")
    heads = HeadStore(teachers, max_heads=2, device=device, dtype=torch.bfloat16)
    assert heads.get(0).device.type == "cuda" and heads.get(0).is_contiguous()
    assert heads.prefetch(1) and heads.events[-1] == ("prefetch", 1)
    head = heads.get(1)
    heads.settle()
    assert heads.stats.copy_seconds > 0 and 0.0 <= heads.stats.hidden_fraction <= 1.0
    assert torch.equal(head.cpu(), heads._host[1])
    assert heads._host[1].is_pinned()
    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float64)
    batch = sequences(12, seed=5)
    cpu_cache = HiddenStateCache(storage_dtype=torch.float64, compute_dtype=torch.float64)
    cpu_cache.fill(batch, teachers, {i: 4096 for i in teachers})
    reference = distillation_loss(student, batch, cpu_cache, HeadStore(teachers, max_heads=1, dtype=torch.float64))
    gpu_cache = HiddenStateCache(storage_dtype=torch.bfloat16, compute_dtype=torch.bfloat16, device=device)
    gpu_cache.fill(batch, teachers, {i: 4096 for i in teachers})
    on_gpu = distillation_loss(student.to(device, torch.bfloat16), batch, gpu_cache, heads)
    assert float(on_gpu.loss) == pytest.approx(float(reference.loss), rel=3e-2)  # bf16 against float64
