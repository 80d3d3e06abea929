"""Teachers split once into trunk and head, and a store that loads heads on demand.

A teacher checkpoint is split a single time (`split_teacher`) into::

    <dest>/trunk/        the transformers checkpoint without its prediction head
    <dest>/head.safetensors   the head alone: {"weight": (V, d)}
    <dest>/teacher.json  where it came from, shapes, dtype

`dest` is a local path or any fsspec URL (``s3://…``, ``gs://…``, ``memory://…``).
The trunk runs once over the student's sequences (see `opd.hidden_cache`); the head
is needed inside the loss, per teacher, so `HeadStore` loads heads on demand under a
byte budget (and a head count), evicts the least recently used, and counts loads,
bytes moved and time spent. Every load reads the head from storage: an evicted head
is read again, and nothing is kept in host memory between loads. On CUDA a loaded
head is copied to the device through a pinned buffer made for that copy; keeping
heads pinned in host memory and prefetching the next one (DESIGN.md: 23 ms from
pinned memory against 924 ms from a cold disk) is not built yet.
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
    loads: int = 0
    hits: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    max_resident: int = 0


class HeadStore:
    """Teacher heads on demand: least-recently-used under `budget_bytes` and `max_heads`."""

    def __init__(self, locations: dict[int, str], *, max_heads: int = 2, budget_bytes: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        if max_heads < 1:
            raise ValueError(f"max_heads must be at least 1, got {max_heads}")
        self.locations, self.max_heads, self.budget_bytes = dict(locations), max_heads, budget_bytes
        self.device, self.dtype = torch.device(device), dtype
        self._resident: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.stats = HeadStats()

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._resident.values())

    def resident(self) -> list[int]:
        return list(self._resident)

    def get(self, index: int) -> torch.Tensor:
        """The head of teacher `index`, (V, d); loaded now if it is not resident."""
        if index in self._resident:
            self.stats.hits += 1
            self._resident.move_to_end(index)
            return self._resident[index]
        if index not in self.locations:
            raise KeyError(f"no teacher with index {index}; known: {sorted(self.locations)}")
        start = time.perf_counter()
        with fsspec.open(_join(self.locations[index], "head.safetensors"), "rb") as f:
            head = load_safetensors(f.read())["weight"]
        if self.dtype is not None:
            head = head.to(self.dtype)
        size = head.numel() * head.element_size()
        if self.budget_bytes is not None and size > self.budget_bytes:
            raise MemoryError(f"teacher {index}'s head is {size} bytes, over the head budget of {self.budget_bytes}")
        while self._resident and (len(self._resident) >= self.max_heads or (
                self.budget_bytes is not None and self.resident_bytes + size > self.budget_bytes)):
            self._resident.popitem(last=False)
            self.stats.evictions += 1
        if self.device.type == "cuda":
            head = head.pin_memory().to(self.device, non_blocking=True)
        self._resident[index] = head
        self.stats.loads += 1
        self.stats.bytes_loaded += size
        self.stats.load_seconds += time.perf_counter() - start
        self.stats.max_resident = max(self.stats.max_resident, len(self._resident))
        return head
