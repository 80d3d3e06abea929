"""Weight transports: how a trainer's new policy weights reach a rollout worker's engine in another process.

`weight_sync` in a spec's `rollout` block picks one:

- ``inprocess``: no transport. The engine sits in the trainer's process and takes the tensors themselves
  (`Engine.load_weights`); the demo's path, and the one the other two are compared against.
- ``path``: the trainer writes the weights as safetensors under the run directory (shared storage), and every
  rank of every engine reloads them from there with vLLM's `reload_weights(weights_path=...)`. Works across
  nodes and with tensor parallelism; costs a write and a read per push.
- ``broadcast``: vLLM's weight-transfer API (`init_weight_transfer_engine`, `start_weight_update`,
  `update_weights`, `finish_weight_update`). The trainer joins one process group with every engine rank and
  broadcasts each tensor; each rank loads what it receives (sharding it as vLLM's loader does). On GPUs this
  is vLLM's own ``nccl`` backend; on CPUs the ``gloo`` backend defined here, registered with vLLM's factories
  (in every vLLM process through the ``vllm.general_plugins`` entry point), so the same code path runs in
  this machine's tests.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch

WeightSync = Literal["inprocess", "path", "broadcast"]


# --- path ------------------------------------------------------------------------------------------------


def write_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], root: Path, version: int) -> Path:
    """Write one push as `root/v<version>/model.safetensors` (renamed into place whole) and return the directory.

    The directory is what vLLM's `reload_weights(weights_path=...)` reads. Older versions are removed once
    this one is in place: a restarted worker needs only the latest."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version:08d}"
    tmp = root / f".v{version:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in named_tensors}
    save_file(state, str(tmp / "model.safetensors"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in root.glob("v*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --- broadcast: the gloo backend of vLLM's weight-transfer API ---------------------------------------------


def open_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _process_group(address: str, port: int, rank: int, world_size: int):
    """A gloo group of its own (not torch.distributed's default one, which vLLM's ranks already use)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(address, port, rank, world_size, backend="gloo")


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


@dataclass
class ParamInfo:
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


@functools.cache
def _worker_engine_class():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo

    @dataclass
    class GlooWeightTransferInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank_offset: int  # this engine's first rank in the trainer's group (the trainer is rank 0)
        world_size: int

    @dataclass
    class GlooWeightTransferUpdateInfo(ParamInfo):
        pass

    class GlooWeightTransferEngine(WeightTransferEngine):
        """vLLM's side of a gloo broadcast: receive each tensor from rank 0 and load it into the model."""

        init_info_cls = GlooWeightTransferInitInfo
        update_info_cls = GlooWeightTransferUpdateInfo

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.group = None

        def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
            rank = init_info.rank_offset + self.parallel_config.rank
            self.group = _process_group(init_info.master_address, init_info.master_port, rank,
                                        init_info.world_size)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
            for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes,
                                               strict=True):
                weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
                _broadcast(self.group, weight)
                self.model.load_weights([(name, weight.to(self.device))])

        def update_weights(self, update_info: dict[str, Any]) -> None:
            self.receive_weights(self.parse_update_info(update_info))  # no device to synchronise on a CPU

        def shutdown(self) -> None:
            if self.group is not None:
                from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

                stateless_destroy_torch_distributed_process_group(self.group)
                self.group = None

    return GlooWeightTransferEngine


@functools.cache
def _trainer_engine_class():
    from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

    @dataclass
    class GlooTrainerInitInfo(TrainerInitInfo):
        backend: ClassVar[str] = "gloo"
        master_address: str
        master_port: int
        world_size: int
        rank_offsets: tuple[int, ...] = (1,)  # one per engine, in the client's order

    class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine):
        """The trainer's side: rank 0 of the group, broadcasting every tensor of the source each round."""

        init_info_cls = GlooTrainerInitInfo

        @classmethod
        def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: Any, source: Any = None):
            if source is None:
                raise ValueError("gloo weight transfer needs a WeightSource")
            engine = cls(client=client, source=source, is_sender=init_info.is_sender)
            worker_infos = [{"master_address": init_info.master_address, "master_port": init_info.master_port,
                             "rank_offset": offset, "world_size": init_info.world_size}
                            for offset in init_info.rank_offsets]
            joined = _Background(client.init_weight_transfer_engine, worker_infos)  # the ranks block in the rendezvous
            engine.group = _process_group(init_info.master_address, init_info.master_port, 0, init_info.world_size)
            joined.result()
            return engine

        def send_weights(self) -> None:
            meta = self.source.metadata()
            info = ParamInfo([m.name for m in meta], [str(m.dtype).removeprefix("torch.") for m in meta],
                             [list(m.shape) for m in meta])
            self.client.start_weight_update()
            received = _Background(self.client.update_weights, asdict(info))  # receives while we send
            for _, tensor in self.source:
                _broadcast(self.group, tensor.detach().contiguous().cpu())
            received.result()
            self.client.finish_weight_update()

        def shutdown(self) -> None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.group)

    return GlooTrainerInitInfo, GlooTrainerWeightTransferEngine


class _Background:
    """A call on its own thread (each side of a rendezvous blocks until the other arrives); `result()` joins it
    and raises what it raised."""

    def __init__(self, fn: Any, *args: Any):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as error:  # handed to the caller in result()
            self.error = error

    def result(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def register_gloo_backend() -> None:
    """Register Retort's gloo weight-transfer backend with vLLM (its `vllm.general_plugins` entry point, run in
    every vLLM process; calling it again does nothing)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", _worker_engine_class())
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", _trainer_engine_class()[1])


class LatestWeights:
    """A vLLM `WeightSource` over the tensors of the latest push (references, not copies): what a broadcast
    sends, and sends again to an engine that was restarted."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, torch.Tensor]] = []

    def metadata(self) -> list[Any]:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in self.pairs]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.pairs)


class SyncClient(Protocol):
    """The four calls vLLM's trainer engines drive (`VLLMWeightSyncClient`), fanned out to every engine."""

    def init_weight_transfer_engine(self, init_info: Any) -> None: ...
    def start_weight_update(self) -> None: ...
    def update_weights(self, update_info: Any) -> None: ...
    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


class Broadcaster:
    """The trainer's end of `broadcast`: one process group with every engine rank, opened once (again after an
    engine restarts), every push sent over it. `backend` is nccl (vLLM's, on GPUs) or gloo (CPUs)."""

    def __init__(self, client: SyncClient, *, engines: int, tensor_parallel: int, backend: str, address: str):
        self.client, self.engines, self.tensor_parallel = client, engines, tensor_parallel
        self.backend, self.address = backend, address
        self.source = LatestWeights()
        self.trainer: Any = None

    def connect(self) -> None:
        from vllm.distributed.weight_transfer.base import WeightSource

        register_gloo_backend()
        source = self.source
        WeightSource.register(type(source))  # an ABC: ours is one by its methods
        world = 1 + self.engines * self.tensor_parallel
        port = open_port()
        if self.backend == "gloo":
            info_cls, engine_cls = _trainer_engine_class()
            offsets = tuple(1 + e * self.tensor_parallel for e in range(self.engines))
            self.trainer = engine_cls.trainer_init(info_cls(master_address=self.address, master_port=port,
                                                            world_size=world, rank_offsets=offsets, rank=0),
                                                   client=self.client, source=source)
        else:  # vLLM's own nccl engine: its workers' ranks follow the trainer's in the client's engine order
            if self.engines != 1:
                raise ValueError("broadcast over nccl drives one engine per trainer group; use weight_sync: path "
                                 "for several engines")
            from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            self.trainer = WeightTransferTrainerFactory.trainer_init(
                NCCLTrainerInitInfo(master_address=self.address, master_port=port, world_size=world, rank=0),
                client=self.client, source=source)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | None) -> None:
        """Send `named_tensors` to every engine (None: the last push again, to a restarted engine)."""
        if named_tensors is not None:
            self.source.pairs = [(name, tensor.detach()) for name, tensor in named_tensors]
        if self.trainer is None:
            self.connect()
        self.trainer.send_weights()

    def disconnect(self) -> None:
        if self.trainer is not None:
            trainer, self.trainer = self.trainer, None
            with contextlib.suppress(Exception):
                trainer.shutdown()
