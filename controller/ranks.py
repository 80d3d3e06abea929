"""Trainer ranks: a job's training processes, one per trainer bundle of its placement group.

Rank 0 is the job's own process (it holds the run directory's lock, writes the job store and owns the rollout
engine); ranks 1… are `TrainerRank` Ray actors on bundles 1…W-1. Every rank gets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT and joins one torch.distributed group (nccl when its bundle has
GPUs, gloo otherwise) before the job body runs, so accelerate, TRL's trainers and FSDP2 find it initialised, as
under torchrun. A rank that dies breaks the group's next collective on every other rank: the attempt fails and
the job is retried from its last sharded checkpoint, like any failed job.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # rank 0 evaluates between phases while the others wait


@dataclass(frozen=True)
class Rendezvous:
    """Where a job's ranks meet: rank 0's address and a free port there, and the collective backend."""

    world_size: int
    master_addr: str
    master_port: int
    backend: str  # nccl | gloo

    def env(self, rank: int, local_rank: int, local_world_size: int) -> dict[str, str]:
        return {"RANK": str(rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def join(rendezvous: Rendezvous, rank: int, local_rank: int, local_world_size: int) -> None:
    """Set this process's rank variables and join the job's process group (blocks until every rank has)."""
    import torch.distributed as dist

    os.environ.update(rendezvous.env(rank, local_rank, local_world_size))
    if rendezvous.backend == "nccl":
        import torch

        torch.cuda.set_device(local_rank)
    dist.init_process_group(rendezvous.backend, rank=rank, world_size=rendezvous.world_size,
                            init_method=f"tcp://{rendezvous.master_addr}:{rendezvous.master_port}",
                            timeout=COLLECTIVE_TIMEOUT)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)


def local_ranks(nodes: Sequence[str], uses_gpus: bool) -> list[tuple[int, int]]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) per rank, from the node each rank runs on.

    On GPUs Ray shows each rank only its own devices (CUDA_VISIBLE_DEVICES), so its device is cuda:0 and its
    LOCAL_RANK 0 — what accelerate indexes devices with; on CPUs it is the rank's place among its node's ranks."""
    out = []
    for rank, node in enumerate(nodes):
        peers = [r for r, n in enumerate(nodes) if n == node]
        out.append((0, 1) if uses_gpus else (peers.index(rank), len(peers)))
    return out


INHERITED = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")
INHERITED_PREFIXES = ("RETORT_", "HF_", "VLLM_", "TRITON_", "NCCL_", "GLOO_")


def inherited_env() -> dict[str, str]:
    """What rank 0's environment passes on to the other ranks: threads, Retort's home and database, hub and
    backend settings (Ray gives an actor OMP_NUM_THREADS=1 and little else of its own)."""
    return {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith(INHERITED_PREFIXES)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class TrainerRank:
    """One rank > 0 of a job (a Ray actor on its trainer bundle): joins the group, then runs the job body."""

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def join(self, rendezvous: Rendezvous, rank: int, local_rank: int, local_world_size: int) -> None:
        join(rendezvous, rank, local_rank, local_world_size)

    def run(self, body: Callable[..., Any], *args: Any) -> Any:
        import torch.distributed as dist

        rank = dist.get_rank()
        try:
            return body(*args)
        except Exception as exc:
            raise RankFailed(rank, time.time(), f"{type(exc).__name__}: {exc}") from exc
        finally:
            leave()


def run_ranks(world_size: int, lead: Callable[[], Any], follower: Callable[..., Any], follower_args: tuple = (), *,
              bundle: dict[str, float], env: dict[str, str] | None = None) -> Any:
    """Run `lead()` here as rank 0 and `follower(*follower_args)` on ranks 1…world_size-1 (actors on the
    trainer bundles); returns the lead's result once every rank has finished, or raises the first error, a
    lost rank's first (the others' errors are then only its echo: a broken collective).

    The ranks go into the placement group this process runs in (the job's: its bundles 1…world_size-1 are
    the other trainer ranks'), else into a group of their own, removed after."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rollout.worker import make_placement_group

    if not ray.is_initialized():  # a foreground job: a local Ray, or the cluster at RAY_ADDRESS
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    group = ray.util.get_current_placement_group()
    own_group, first = group is None, 1
    if own_group:  # a foreground job: rank 0 is this process, outside any group; ranks 1… get a bundle each
        group, first = make_placement_group([{k: v for k, v in bundle.items() if v}] * (world_size - 1)), 0
    uses_gpus = bundle.get("GPU", 0.0) > 0
    actor = ray.remote(TrainerRank)
    ranks = [actor.options(num_cpus=bundle.get("CPU", 1.0), num_gpus=bundle.get("GPU", 0.0),
                           memory=bundle.get("memory"), max_restarts=0,
                           runtime_env={"env_vars": inherited_env() | dict(env or {})},
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               group, placement_group_bundle_index=first + i))
             .remote() for i in range(world_size - 1)]
    try:
        nodes = [ray.get_runtime_context().get_node_id(), *ray.get([r.node.remote() for r in ranks])]
        rendezvous = Rendezvous(world_size, ray.util.get_node_ip_address(), _free_port(),
                                "nccl" if uses_gpus else "gloo")
        local = local_ranks(nodes, uses_gpus)
        joined = [r.join.remote(rendezvous, i, *local[i]) for i, r in enumerate(ranks, start=1)]
        join(rendezvous, 0, *local[0])
        ray.get(joined)
        refs = [r.run.remote(follower, *follower_args) for r in ranks]
        try:
            result = lead()
        except Exception as error:
            cause = _first_failure(refs, before=time.time())
            if cause is None:
                raise
            raise cause from error
        finally:
            leave()
        if cause := _first_failure(refs, before=None):
            raise cause
        return result
    finally:
        for rank in ranks:
            ray.kill(rank)
        if own_group:
            ray.util.remove_placement_group(group)


class RankLost(RuntimeError):
    """A trainer rank's process died (killed, preempted, out of memory): the attempt fails as a whole."""


class RankFailed(RuntimeError):
    """A trainer rank > 0 raised; `when` (its clock) tells its own error from the broken collectives it caused."""

    def __init__(self, rank: int, when: float, error: str):
        super().__init__(rank, when, error)
        self.rank, self.when, self.error = rank, when, error

    def __str__(self) -> str:
        return f"trainer rank {self.rank} failed: {self.error}"


def _first_failure(refs: list[Any], *, before: float | None, wait_s: float = 10.0) -> Exception | None:
    """What ended the job, once rank 0 failed at `before` (or finished: None): a rank whose process died, else
    the earliest rank that raised before rank 0 did (when a rank raises, every other rank's next collective
    breaks: those errors are only its echo). gloo notices a dead peer at once; Ray may take a moment to
    report the actor's death, hence the wait."""
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s if before is not None else None)
    failures: list[RankFailed] = []
    for index, ref in enumerate(refs, start=1):
        if ref not in ready:
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            return RankLost(f"trainer rank {index} died: {str(exc).splitlines()[0]}")
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, RankFailed):
                failures.append(exc.cause)
            elif before is None:  # not the job's own code (arguments that would not unpickle, …)
                return exc
    failures = [f for f in failures if before is None or f.when < before]
    return min(failures, key=lambda f: f.when) if failures else None
