"""The teacher hidden-state cache: each teacher's trunk runs once, only last-layer states are kept.

For every teacher, in teacher-index order, its trunk is loaded, run over the student
sequences routed to it, and dropped again; what stays is, per (rollout id, teacher
index), the last-layer hidden states of the positions that predict completion tokens:
``(completion_len, d)`` instead of ``(completion_len, V)`` logits (V/d times smaller:
about 18× at d=7168, V=129k). The head is applied later, chunk by chunk, in the loss.

Teachers that fit in memory beside the student can stay loaded between steps
(`max_resident_trunks`, least recently used beyond it): reading the demo's three tiny
trunks from disk took ~80 ms of a ~500 ms step. Trunks run in index order every step,
so fewer slots than routed teachers evict each trunk before it is needed again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from opd.teachers import local_trunk


@dataclass(frozen=True)
class RoutedSequence:
    """A student generation and the teacher that scores it. An agent trajectory's completion holds tool results
    too: `loss_mask` (one per completion token, None: every one) says which tokens are the student's own, the
    only ones the loss scores; the others are context."""

    rollout_id: str
    teacher_index: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...] | None = None

    @property
    def scored_tokens(self) -> int:
        return len(self.completion_ids) if self.loss_mask is None else sum(self.loss_mask)


def completion_positions(prompt_len: int, completion_len: int) -> slice:
    """Positions whose next-token prediction is a completion token: prompt_len-1 … prompt_len+L-2."""
    return slice(prompt_len - 1, prompt_len + completion_len - 1)


def length_buckets(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into forward batches of similar length, each at most `max_batch_tokens` padded.

    Right-padding a 20-token arithmetic sequence to a 110-token code answer's width wastes
    five sixths of its compute; sorted by length, each batch pads only to its own longest.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:  # descending: a batch's first row is its widest
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def last_hidden_states(trunk: torch.nn.Module, sequences: Sequence[RoutedSequence], pad_id: int,
                       device: torch.device, max_batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Run a trunk (a transformers base model) over the sequences; completion-position states each, in order.

    Sequences go through in length-sorted, right-padded batches of at most `max_batch_tokens`.
    """
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in sequences]
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for rows in length_buckets(lengths, max_batch_tokens):
        width = lengths[rows[0]]
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            ids[row, :lengths[i]] = torch.tensor(sequences[i].prompt_ids + sequences[i].completion_ids)
            mask[row, :lengths[i]] = 1
        hidden = trunk(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (B, T, d)
        for row, i in enumerate(rows):
            out[i] = hidden[row, completion_positions(len(sequences[i].prompt_ids), len(sequences[i].completion_ids))]
    return out  # type: ignore[return-value]


@dataclass
class CacheReport:
    teachers: list[int] = field(default_factory=list)  # in the order their trunks ran
    sequences: int = 0
    tokens: int = 0
    bytes_stored: int = 0
    logits_bytes: int = 0  # what (tokens × V) logits in the same dtype would have taken
    trunk_loads: int = 0  # trunks read from storage (the others were resident)

    @property
    def savings(self) -> float:
        return self.logits_bytes / max(self.bytes_stored, 1)


class HiddenStateCache:
    """(rollout id, teacher index) → teacher last-layer hidden states at completion positions, (L, d)."""

    def __init__(self, storage_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_batch_tokens: int = 4096, compute_dtype: torch.dtype | None = None,
                 max_resident_trunks: int = 0, shard: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        """`compute_dtype` is the trunks' dtype (default: as saved); `storage_dtype` what the cache keeps;
        `max_resident_trunks` how many trunks stay loaded between fills (0: each is read every fill).

        `shard` makes each trunk, once loaded, a frozen FSDP2 module over the trainer ranks (each keeps 1/N
        of it): every rank then runs every teacher of a fill, once, even with nothing routed to it, so the
        trunks' all-gathers pair up across ranks."""
        if max_resident_trunks < 0:
            raise ValueError(f"max_resident_trunks must be 0 or more, got {max_resident_trunks}")
        self.storage_dtype, self.device = storage_dtype, torch.device(device)
        self.shard = shard
        self.max_batch_tokens = max_batch_tokens
        self.compute_dtype = compute_dtype
        self.max_resident_trunks = max_resident_trunks
        self.entries: dict[tuple[str, int], torch.Tensor] = {}
        self._trunks: OrderedDict[str, torch.nn.Module] = OrderedDict()

    def resident_trunks(self) -> list[str]:
        return list(self._trunks)

    def _trunk(self, location: str, report: CacheReport) -> torch.nn.Module:
        """The trunk stored at `location`: resident, or read now (and kept if there is a slot)."""
        from transformers import AutoModel

        if location in self._trunks:
            self._trunks.move_to_end(location)
            return self._trunks[location]
        trunk = AutoModel.from_pretrained(local_trunk(location), dtype=self.compute_dtype or "auto")
        trunk = trunk.to(self.device).eval().requires_grad_(False)
        if self.shard is not None:
            trunk = self.shard(trunk)
        report.trunk_loads += 1
        if self.max_resident_trunks:
            while len(self._trunks) >= self.max_resident_trunks:
                self._trunks.popitem(last=False)
            self._trunks[location] = trunk
        return trunk

    def get(self, rollout_id: str, teacher_index: int) -> torch.Tensor:
        return self.entries[(rollout_id, teacher_index)]

    def clear(self) -> None:
        self.entries.clear()

    def fill(self, sequences: Sequence[RoutedSequence], locations: dict[int, str], vocab_sizes: dict[int, int],
             pad_id: int = 0, teachers: Sequence[int] | None = None) -> CacheReport:
        """Run every routed teacher's trunk once, in teacher-index order, and keep only hidden states;
        `teachers` (sharded trunks: those of the whole step, on every rank) are run even with nothing here."""
        # FSDP2 gathers into buffers it keeps across calls: not inference tensors, so no inference mode
        with torch.no_grad() if self.shard is not None else torch.inference_mode():
            return self._fill(sequences, locations, vocab_sizes, pad_id, teachers)

    def _fill(self, sequences: Sequence[RoutedSequence], locations: dict[int, str], vocab_sizes: dict[int, int],
              pad_id: int, teachers: Sequence[int] | None) -> CacheReport:
        report = CacheReport()
        for index in sorted(set(teachers) if teachers is not None else {s.teacher_index for s in sequences}):
            routed = [s for s in sequences if s.teacher_index == index and s.completion_ids]
            trunk = self._trunk(locations[index], report)
            if self.shard is not None and not routed:  # its part of the trunk's all-gathers, on one pad token
                trunk(input_ids=torch.full((1, 1), pad_id, device=self.device))
                report.teachers.append(index)
                continue
            width = None if self.shard is None else \
                sum(len(s.prompt_ids) + len(s.completion_ids) for s in routed) * len(routed)  # one forward
            states = last_hidden_states(trunk, routed, pad_id, self.device, width or self.max_batch_tokens)
            for s, hidden in zip(routed, states, strict=True):
                stored = hidden.to(self.device, self.storage_dtype).clone()  # (L, d), where the loss runs
                self.entries[(s.rollout_id, index)] = stored
                report.tokens += stored.shape[0]
                report.bytes_stored += stored.numel() * stored.element_size()
                report.logits_bytes += stored.shape[0] * vocab_sizes[index] * stored.element_size()
            report.teachers.append(index)
            report.sequences += len(routed)
            del trunk  # unless resident, released before the next teacher's trunk loads
        return report
