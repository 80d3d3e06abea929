"""Teachers split once into trunk and head, and a store that loads heads on demand.

A teacher checkpoint is split a single time (`split_teacher`) into::

    <dest>/trunk/        the transformers checkpoint without its prediction head
    <dest>/head.safetensors   the head alone: {"weight": (V, d)}
    <dest>/teacher.json  where it came from, shapes, dtype

`dest` is a local path or any fsspec URL (``s3://…``, ``gs://…``, ``memory://…``).
The trunk runs once over the student's sequences (see `opd.hidden_cache`); the head
is needed inside the loss, per teacher, so `HeadStore` keeps heads the way DESIGN.md
prices them (one 1.24 GB head: 23 ms from pinned memory, 924 ms from a cold disk):
read from storage once per run into pinned host memory, copied to the device on a
side stream while the previous teacher's loss computes, at most `max_heads` on the
device.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

HEAD_KEYS = ("lm_head.weight", "model.embed_tokens.weight")  # untied head first; tied models reuse embeddings
TRUNK_FILES = ("config.json", "generation_config.json")


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _read_state(checkpoint: str) -> dict[str, torch.Tensor]:
    """Every tensor of a local or fsspec checkpoint (single file or sharded safetensors)."""
    fs, root = fsspec.core.url_to_fs(checkpoint)
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no .safetensors files (is it a transformers checkpoint?)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with fs.open(path, "rb") as f:
            state.update(load_safetensors(f.read()))
    return state


@dataclass(frozen=True)
class TeacherInfo:
    index: int
    location: str  # where split_teacher wrote it
    vocab_size: int
    hidden_size: int
    head_bytes: int


def split_teacher(checkpoint: str, dest: str, index: int) -> TeacherInfo:
    """Split `checkpoint` into trunk and head under `dest` (skipped when `dest` already holds the split)."""
    fs, root = fsspec.core.url_to_fs(dest)
    meta_path = _join(root, "teacher.json")
    if fs.exists(meta_path):
        with fs.open(meta_path) as f:
            meta = json.load(f)
        return TeacherInfo(index, dest, meta["vocab_size"], meta["hidden_size"], meta["head_bytes"])
    state = _read_state(checkpoint)
    key = next((k for k in HEAD_KEYS if k in state), None)
    if key is None:
        raise KeyError(f"{checkpoint}: no prediction head ({' or '.join(HEAD_KEYS)}) among its tensors")
    head = state[key]
    trunk = {k: v for k, v in state.items() if k != "lm_head.weight"}
    src_fs, src_root = fsspec.core.url_to_fs(checkpoint)
    fs.makedirs(_join(root, "trunk"), exist_ok=True)
    for name in TRUNK_FILES:
        if src_fs.exists(_join(src_root, name)):
            with src_fs.open(_join(src_root, name), "rb") as src, fs.open(_join(root, "trunk", name), "wb") as dst:
                dst.write(src.read())
    with fs.open(_join(root, "trunk", "model.safetensors"), "wb") as f:
        f.write(save_safetensors(trunk))
    with fs.open(_join(root, "head.safetensors"), "wb") as f:
        f.write(save_safetensors({"weight": head.contiguous()}))
    meta = {"source": checkpoint, "vocab_size": head.shape[0], "hidden_size": head.shape[1],
            "dtype": str(head.dtype), "head_bytes": head.numel() * head.element_size()}
    with fs.open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return TeacherInfo(index, dest, head.shape[0], head.shape[1], meta["head_bytes"])


def local_trunk(location: str, cache_dir: str | None = None) -> str:
    """A local directory holding the teacher's trunk (downloaded once when `location` is remote)."""
    fs, root = fsspec.core.url_to_fs(location)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return _join(root, "trunk")
    target = Path(cache_dir or tempfile.mkdtemp(prefix="retort-trunk-"))
    fs.get(_join(root, "trunk") + "/", str(target), recursive=True)
    return str(target)


@dataclass
class HeadStats:
    loads: int = 0  # heads made resident on the device (a copy from host memory; a storage read first if needed)
    reads: int = 0  # heads read from storage into host memory (once per run within the host budget)
    hits: int = 0  # asked for while already resident
    evictions: int = 0  # device heads dropped (LRU)
    host_evictions: int = 0  # host copies dropped (LRU beyond the host budget: read again when next needed)
    bytes_loaded: int = 0  # bytes made resident on the device
    load_seconds: float = 0.0  # host wall time of reads and of issuing copies
    prefetches: int = 0  # copies issued ahead of their use
    copy_seconds: float = 0.0  # host-to-device copy time, from CUDA events (0 on a CPU: nothing is copied)
    exposed_seconds: float = 0.0  # the part of copy time the compute stream waited for (CUDA events)
    max_resident: int = 0

    @property
    def hidden_fraction(self) -> float:
        """Share of copy time hidden behind compute (1 when nothing was copied)."""
        return 1.0 - self.exposed_seconds / self.copy_seconds if self.copy_seconds else 1.0


@dataclass
class _Copy:
    """A head on its way to the device: the tensor, and the events around its copy (CUDA only)."""

    head: torch.Tensor
    started: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None


class HeadStore:
    """Teacher heads on demand, as the design has them.

    Each head is read from storage once per run into host memory (pinned on CUDA), least recently used beyond
    `host_budget_bytes` going back to storage. On the device at most `max_heads` (and `budget_bytes`) are
    resident, LRU. `prefetch(i)` issues teacher i's copy on a side CUDA stream; `get(i)` makes the compute
    stream wait for that copy's event (no host synchronisation) and returns the head. A caller that prefetches
    teacher i+1 before computing teacher i's loss hides the copy behind that compute; `settle()` reads the
    copies' CUDA events into `stats` (copy time and the part the compute stream waited for). `events` logs
    every read, copy and use in order, which is how a test sees the ordering on a CPU. On a CPU the host copy is
    the head (nothing to copy).
    """

    def __init__(self, locations: dict[int, str], *, max_heads: int = 2, budget_bytes: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 host_budget_bytes: int | None = None):
        if max_heads < 1:
            raise ValueError(f"max_heads must be at least 1, got {max_heads}")
        self.locations, self.max_heads, self.budget_bytes = dict(locations), max_heads, budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.device, self.dtype = torch.device(device), dtype
        self.cuda = self.device.type == "cuda"
        self._host: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._resident: OrderedDict[int, _Copy] = OrderedDict()
        self._in_use: int | None = None  # the head `get` returned last: a prefetch never evicts it
        self._unsettled: list[tuple[torch.cuda.Event, ...]] = []  # (copy started, copy done, wait began, wait ended)
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.events: list[tuple[str, int]] = []
        self.stats = HeadStats()

    @property
    def resident_bytes(self) -> int:
        return sum(c.head.numel() * c.head.element_size() for c in self._resident.values())

    def resident(self) -> list[int]:
        return list(self._resident)

    def host_resident(self) -> list[int]:
        return list(self._host)

    def _read(self, index: int) -> torch.Tensor:
        """Teacher `index`'s head in host memory: kept from an earlier read, or read from storage now."""
        if index in self._host:
            self._host.move_to_end(index)
            return self._host[index]
        if index not in self.locations:
            raise KeyError(f"no teacher with index {index}; known: {sorted(self.locations)}")
        with fsspec.open(_join(self.locations[index], "head.safetensors"), "rb") as f:
            head = load_safetensors(f.read())["weight"]
        if self.dtype is not None:
            head = head.to(self.dtype)
        if self.cuda:
            head = head.pin_memory()  # copies from pinned memory run at full bandwidth, asynchronously
        self.stats.reads += 1
        self.events.append(("read", index))
        size = head.numel() * head.element_size()
        while self._host and self.host_budget_bytes is not None and (
                sum(t.numel() * t.element_size() for t in self._host.values()) + size > self.host_budget_bytes):
            self._host.popitem(last=False)
            self.stats.host_evictions += 1
        if self.host_budget_bytes is None or size <= self.host_budget_bytes:
            self._host[index] = head
        return head

    def _make_room(self, size: int, keep: int | None) -> bool:
        """Evict LRU device heads (never `keep`) until one of `size` bytes fits; False if it cannot."""
        def full() -> bool:
            return len(self._resident) >= self.max_heads or (
                self.budget_bytes is not None and self.resident_bytes + size > self.budget_bytes)

        while full():
            victim = next((i for i in self._resident if i != keep), None)
            if victim is None:
                return False
            del self._resident[victim]
            self.stats.evictions += 1
        return True

    def prefetch(self, index: int) -> bool:
        """Start bringing teacher `index`'s head to the device without waiting for it; False when it cannot be
        (no room beside the head in use: `max_heads` 1)."""
        if index in self._resident:
            return True
        return self._load(index, keep=self._in_use, ahead=True)

    def _load(self, index: int, *, keep: int | None, ahead: bool) -> bool:
        start = time.perf_counter()
        host = self._read(index)
        size = host.numel() * host.element_size()
        if self.budget_bytes is not None and size > self.budget_bytes:
            raise MemoryError(f"teacher {index}'s head is {size} bytes, over the head budget of {self.budget_bytes}")
        if not self._make_room(size, keep):
            self.stats.load_seconds += time.perf_counter() - start
            return False
        if self.cuda:
            with torch.cuda.stream(self._stream):
                started, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                started.record()
                copy = _Copy(host.to(self.device, non_blocking=True), started, done)
                done.record()
        else:
            copy = _Copy(host)
        self._resident[index] = copy
        self.events.append(("prefetch" if ahead else "copy", index))
        self.stats.loads += 1
        self.stats.prefetches += ahead
        self.stats.bytes_loaded += size
        self.stats.load_seconds += time.perf_counter() - start
        self.stats.max_resident = max(self.stats.max_resident, len(self._resident))
        return True

    def get(self, index: int) -> torch.Tensor:
        """The head of teacher `index`, (V, d), ready for the compute stream; loaded now if not resident."""
        if index in self._resident:
            self.stats.hits += 1
            self._resident.move_to_end(index)
        else:
            self._load(index, keep=None, ahead=False)
        copy = self._resident[index]
        self._in_use = index
        self.events.append(("use", index))
        if copy.done is not None:  # make the compute stream, not the host, wait for the copy
            compute = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(copy.done)
            after.record(compute)
            copy.head.record_stream(compute)  # made on the side stream, used on this one
            self._unsettled.append((copy.started, copy.done, before, after))
            copy.done = None  # waited for once; later hits need no wait
        return copy.head

    def settle(self) -> None:
        """Read the finished copies' CUDA events into `stats` (one synchronisation, at the end of a step)."""
        for started, done, before, after in self._unsettled:
            after.synchronize()
            self.stats.copy_seconds += started.elapsed_time(done) / 1e3
            self.stats.exposed_seconds += max(0.0, before.elapsed_time(after) / 1e3)
        self._unsettled.clear()
