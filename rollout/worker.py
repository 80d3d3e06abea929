"""Rollout workers: vLLM engines in their own Ray actors, behind the interfaces the in-process engine has.

A `RolloutWorker` actor owns one vLLM engine (tensor parallel over its own ranks, on its own bundle of a
placement group) and, once a trainer opens one, the rollout service with its WAL: exactly one writer, in the
process that generates. A `RolloutWorkers` client holds one or more of them:

- `workers.engine` is an `Engine` (`generate`, `load_weights`): evaluation and GRM judging use it unchanged;
- `workers.service(run_dir)` has the calls a trainer makes of a `RolloutService` (`run_or_resume`,
  `load_weights`, `timings`): each batch is split between the workers, each generating its share through its
  own WAL (`run_dir/worker-<i>`);
- weights reach the workers over a transport (`rollout.transport`: `path` or `broadcast`), and every push
  records the policy version the WAL stamps on later tokens.

A worker that dies mid-batch (killed, preempted, out of memory) is started again by the client, given the
latest weights, and asked for the same batch: its service resumes from the WAL, so committed tokens are kept
and a greedy batch comes out as if nothing had happened. `open_service` is what trainers call: an in-process
`RolloutService` for an in-process engine, the workers' service for `workers.engine`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rollout.engine import Engine, GenerationRequest, TokenChunk
from rollout.service import Rollout, RolloutRequest, RolloutService, ServiceTimings
from rollout.transport import Broadcaster, write_weights
from storage.specfile import RolloutSettings, WeightSync, engine_bundle

MAX_RESTARTS = 3  # per call: a worker that dies again and again is a failure, not a preemption


class WorkerError(RuntimeError):
    """A rollout worker could not start, or kept dying; the message says which and why."""


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker of a client starts with (from a spec's `rollout` block and the run's precision)."""

    model: str
    tensor_parallel: int = 1
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    seed: int = 0
    weight_sync: WeightSync = "path"
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def bundle(self) -> dict[str, float]:
        return engine_bundle(self.tensor_parallel, self.cpus_per_rank, self.gpus_per_rank)

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus_per_rank else "gloo"


class RolloutWorker:
    """The actor: one engine, and the service of the run a trainer opened on it."""

    def __init__(self, options: WorkerOptions):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: we step it
        for name, value in options.env.items():
            os.environ[name] = value
        if options.tensor_parallel > 1 and not options.gpus_per_rank:
            # vLLM's CPU ranks each bind their own cores ("0|1"); the ranks are this worker's processes
            cores = sorted(os.sched_getaffinity(0))
            per_rank = max(1, len(cores) // options.tensor_parallel)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
                ",".join(map(str, cores[r * per_rank:(r + 1) * per_rank] or cores[-1:]))
                for r in range(options.tensor_parallel))
        from rollout.engine import VLLMEngine
        from rollout.transport import register_gloo_backend

        register_gloo_backend()
        self.options = options
        self.engine = VLLMEngine(options.model, dtype=options.dtype, max_model_len=options.max_model_len,
                                 seed=options.seed, gpu_memory_utilization=options.gpu_memory_utilization,
                                 tensor_parallel_size=options.tensor_parallel,
                                 weight_transfer_backend=options.backend if options.weight_sync == "broadcast"
                                 else None)
        self.service: RolloutService | None = None

    def info(self) -> dict[str, Any]:
        return {"model_path": self.engine.model_path, "eos_token_id": self.engine.eos_token_id,
                "max_model_len": self.engine.max_model_len, "pid": os.getpid()}

    # --- the engine ------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenChunk]]:
        yield from self.engine.generate(requests)

    def load_weights_from_path(self, path: str) -> float:
        started = time.perf_counter()
        self.engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        return time.perf_counter() - started

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.engine.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.llm.collective_rpc("shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self.engine.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.engine.llm.collective_rpc("update_weights", args=(update_info,))

    def finish_weight_update(self) -> None:
        self.engine.llm.collective_rpc("finish_weight_update")

    # --- the service -----------------------------------------------------------------------------------------

    def open_service(self, run_dir: str, policy_version: int) -> None:
        if self.service is not None:
            self.service.close()
        self.service = RolloutService(self.engine, run_dir, policy_version=policy_version)

    def set_policy_version(self, version: int) -> None:
        if self.service is not None:
            self.service.policy_version = version

    def run_or_resume(self, batch: str, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        return self._service().run_or_resume(batch, requests)

    def timings(self) -> ServiceTimings:
        return self._service().timings_snapshot()

    def close_service(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None

    def _service(self) -> RolloutService:
        if self.service is None:
            raise WorkerError("no rollout service open on this worker: call open_service first")
        return self.service


def split(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    """`items` in `parts` contiguous shares, sizes differing by at most one (the same split every time, so a
    restarted worker is asked for the same share again)."""
    size, extra = divmod(len(items), parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (part < extra))
    return [items[bounds[p]:bounds[p + 1]] for p in range(parts)]


class _FanOut:
    """vLLM's `VLLMWeightSyncClient` over every worker of a client: each call reaches all of them."""

    def __init__(self, workers: RolloutWorkers):
        self.workers = workers

    def _all(self, method: str, args: Sequence[tuple] | None = None) -> None:
        """`method` on every worker at once (worker i with `args[i]`), waiting for all of them."""
        import ray

        handles = self.workers.handles
        args = args if args is not None else [()] * len(handles)
        ray.get([getattr(h, method).remote(*a) for h, a in zip(handles, args, strict=True)])

    def init_weight_transfer_engine(self, init_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One init info per engine (Retort's gloo backend), or one for all (vLLM's nccl backend: one engine)."""
        infos = init_info if isinstance(init_info, list) else [init_info] * len(self.workers.handles)
        self._all("init_weight_transfer_engine", [(info,) for info in infos])

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("update_weights", [(update_info,)] * len(self.workers.handles))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")


class RolloutWorkers:
    """A client of `engines` rollout workers. Every call is made of all of them; a dead one is restarted."""

    def __init__(self, options: WorkerOptions, *, engines: int = 1, placement_group: Any = None,
                 first_bundle: int = 0, weights_dir: str | Path | None = None):
        """`placement_group` (with one bundle per engine from `first_bundle` on) places the workers; without one,
        the client makes its own from `options.bundle()` and removes it in `close()`. `weights_dir` is where
        `path` pushes go: storage every worker's node can read (a job passes its run directory's `weights/`;
        the default, a directory under this machine's TMPDIR, serves only workers on this machine)."""
        import ray

        if options.weight_sync == "inprocess":
            raise WorkerError("weight_sync inprocess keeps the engine in the trainer's process; rollout workers "
                              "take path or broadcast")
        self.options, self.engines = options, engines
        self.own_group = placement_group is None
        if placement_group is None:
            placement_group = make_placement_group([options.bundle()] * engines)
        self.placement_group, self.first_bundle = placement_group, first_bundle
        self._actor = ray.remote(RolloutWorker)
        self.handles: list[Any] = [None] * engines
        self.restarts = 0
        self.version = 0
        self.push_seconds = 0.0
        self._weights_dir = Path(weights_dir) if weights_dir is not None else \
            Path(os.environ.get("TMPDIR", "/tmp")) / f"retort-weights-{os.getpid()}"
        self._last_path: str | None = None
        self._path_pushes = 0
        self._broadcaster = (Broadcaster(_FanOut(self), engines=engines, tensor_parallel=options.tensor_parallel,
                                         backend=options.backend, address=ray.util.get_node_ip_address())
                             if options.weight_sync == "broadcast" else None)
        self._pushed = False
        self._services: list[WorkersService] = []
        for i in range(engines):
            self.handles[i] = self._start(i)
        infos = ray.get([h.info.remote() for h in self.handles])
        self.engine = RemoteEngine(self, infos[0])
        self.pids = [info["pid"] for info in infos]

    def _start(self, i: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self.options.bundle()
        strategy = PlacementGroupSchedulingStrategy(self.placement_group,
                                                    placement_group_bundle_index=self.first_bundle + i)
        env = {"OMP_NUM_THREADS": str(max(1, int(bundle["CPU"]))), "TOKENIZERS_PARALLELISM": "false",
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"), **self.options.env}
        return self._actor.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                   scheduling_strategy=strategy, max_restarts=0, max_concurrency=1,
                                   runtime_env={"env_vars": env}).remote(self.options)

    # --- restarts -------------------------------------------------------------------------------------------

    def restart(self, i: int) -> None:
        """Start worker `i` again with the latest weights and the services its predecessor had open."""
        import ray

        self.restarts += 1
        with contextlib.suppress(Exception):
            ray.kill(self.handles[i])
        if self._broadcaster is not None:  # the group lost a rank: every engine joins a new one
            self._broadcaster.disconnect()
            for j, handle in enumerate(self.handles):
                if j != i:
                    with contextlib.suppress(Exception):
                        ray.get(handle.shutdown_weight_transfer_engine.remote())
        self.handles[i] = self._start(i)
        self.pids[i] = ray.get(self.handles[i].info.remote())["pid"]
        if self._pushed:
            self._send(None)
        for service in self._services:
            if service.open:
                ray.get(self.handles[i].open_service.remote(str(service.worker_dir(i)), self.version))

    def call(self, i: int, method: str, *args: Any) -> Any:
        """`method` of worker `i`, restarting the worker (up to MAX_RESTARTS times) if it dies during the call."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(MAX_RESTARTS + 1):
            try:
                return ray.get(getattr(self.handles[i], method).remote(*args))
            except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
                if attempt == MAX_RESTARTS:
                    raise WorkerError(f"rollout worker {i} died {attempt + 1} times in {method}: {error}") from error
                self.restart(i)
        raise AssertionError("unreachable")

    def call_all(self, method: str, per_worker: Sequence[tuple]) -> list[Any]:
        """`method` on every worker at once (worker i gets `per_worker[i]`); a worker that dies is restarted and
        asked again, the others' results kept."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        refs = [getattr(h, method).remote(*args) for h, args in zip(self.handles, per_worker, strict=True)]
        results = []
        for i, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                self.restart(i)
                results.append(self.call(i, method, *per_worker[i]))
        return results

    # --- weights --------------------------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Push new weights to every worker over the transport; later tokens carry `version` (if given)."""
        started = time.perf_counter()
        self._send(named_tensors)
        self.push_seconds += time.perf_counter() - started
        self._pushed = True
        if version is not None:
            self.version = version
            self.call_all("set_policy_version", [(version,)] * self.engines)

    def _send(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | None) -> None:
        if self._broadcaster is not None:
            self._broadcaster.push(named_tensors)
            return
        if named_tensors is not None:
            self._path_pushes += 1
            self._last_path = str(write_weights(named_tensors, self._weights_dir, self._path_pushes))
        self.call_all("load_weights_from_path", [(self._last_path,)] * self.engines)

    # --- services and shutdown ------------------------------------------------------------------------------

    def service(self, run_dir: str | Path, *, policy_version: int = 0) -> WorkersService:
        """The rollout service of `run_dir`, spread over the workers (each writes `run_dir/worker-<i>`)."""
        service = WorkersService(self, Path(run_dir), policy_version)
        self._services = [s for s in self._services if s.open] + [service]
        return service

    def close(self) -> None:
        import ray

        if self._broadcaster is not None:
            self._broadcaster.disconnect()
        for handle in self.handles:
            with contextlib.suppress(Exception):
                ray.kill(handle)
        if self.own_group and self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None


class WorkersService:
    """What a trainer calls of a `RolloutService`, answered by the workers: each generates its share of a batch."""

    def __init__(self, workers: RolloutWorkers, run_dir: Path, policy_version: int):
        self.workers, self.run_dir, self.open = workers, run_dir, True
        self.engine = workers.engine
        self.policy_version = policy_version
        workers.version = policy_version
        workers.call_all("open_service", [(str(self.worker_dir(i)), policy_version)
                                          for i in range(workers.engines)])

    def worker_dir(self, i: int) -> Path:
        return self.run_dir / f"worker-{i}"

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.workers.load_weights(named_tensors, version)
        self.policy_version = version

    def run_or_resume(self, batch: str, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        shares = split(list(requests), self.workers.engines)
        results = self.workers.call_all("run_or_resume", [(batch, share) for share in shares])
        return [rollout for share in results for rollout in share]

    @property
    def timings(self) -> ServiceTimings:
        """The workers' timings summed (engine time is the sum of their engines', not wall time), plus pushes."""
        total = ServiceTimings()
        for timings in self.workers.call_all("timings", [()] * self.workers.engines):
            total = ServiceTimings(*(a + b for a, b in zip(vars(total).values(), vars(timings).values(),
                                                             strict=True)))
        total.push = self.workers.push_seconds
        return total

    def timings_snapshot(self) -> ServiceTimings:
        return replace(self.timings)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.workers.call_all("close_service", [()] * self.workers.engines)


class RemoteEngine:
    """The workers as one `Engine`: callers (evaluation, GRM judging) do not know where the engine lives."""

    def __init__(self, workers: RolloutWorkers, info: dict[str, Any]):
        self.workers = workers
        self.model_path = info["model_path"]
        self.eos_token_id = info["eos_token_id"]
        self.max_model_len = info["max_model_len"]

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenChunk]]:
        """Each worker generates its share at once; their steps come back worker by worker."""
        import ray

        shares = [(i, share) for i, share in enumerate(split(list(requests), self.workers.engines)) if share]
        streams = [(i, self.workers.handles[i].generate.options(num_returns="streaming").remote(share))
                   for i, share in shares]
        for i, stream in streams:
            try:
                for ref in stream:
                    yield ray.get(ref)
            except ray.exceptions.RayActorError:
                # plain generation has no WAL and its steps already went to the caller: restart, and say so
                self.workers.restart(i)
                raise WorkerError(f"rollout worker {i} died while generating (restarted); generate again") from None

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.workers.load_weights(named_tensors)


def open_service(engine: Engine, run_dir: str | Path, *, policy_version: int = 0) -> RolloutService | WorkersService:
    """The rollout service a trainer generates through: on the workers behind `engine` when it is theirs,
    else in this process."""
    if isinstance(engine, RemoteEngine):
        return engine.workers.service(run_dir, policy_version=policy_version)
    return RolloutService(engine, run_dir, policy_version=policy_version)


def make_placement_group(bundles: list[dict[str, float]], *, strategy: str = "PACK", timeout_s: float = 600) -> Any:
    """A placement group of `bundles`, refused at once (with the reason) if one of them fits no node."""
    import ray

    problem = bundle_problem(bundles, [node["Resources"] for node in ray.nodes() if node.get("Alive")])
    if problem:
        raise WorkerError(problem)
    group = ray.util.placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise WorkerError(f"placement group {bundles} not ready after {timeout_s:g} s: the cluster is busy")
    return group


ENGINE_HINT = ("an engine's tensor-parallel ranks share one node: lower tensor_parallel or cpus/gpus per rank, or add "
               "a bigger node")


def bundle_problem(bundles: Sequence[dict[str, float]], nodes: Sequence[dict[str, float]],
                   hints: Sequence[str] | None = None) -> str | None:
    """Why a bundle can never be placed (no node has that much of something), or None; `hints` say per bundle
    what to change (default: an engine's)."""
    for index, bundle in enumerate(bundles):
        if not any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes):
            largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in bundle}
            want = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
            have = ", ".join(f"{k} {v:g}" for k, v in largest.items())
            hint = hints[index] if hints else ENGINE_HINT
            return f"bundle {index} needs {want} on one node, but the largest node has {have}; {hint}"
    return None


def start_engine(settings: RolloutSettings, model: str, *, dtype: str, seed: int, run_dir: str | Path,
                 max_model_len: int | None = None) -> Engine:
    """The engine a job's `rollout` block asks for: vLLM in this process (inprocess), or rollout workers behind a
    `RemoteEngine`, placed in this job's placement group when it runs in one (its last bundles, after the
    trainer ranks'), else in a group of their own; `path` pushes go to `run_dir/weights`. `stop_engine` ends
    what this started."""
    from rollout.engine import VLLMEngine

    if not settings.workers:
        return VLLMEngine(model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                          gpu_memory_utilization=settings.gpu_memory_utilization)
    import ray

    if not ray.is_initialized():  # a foreground job: a local Ray, or the cluster at RAY_ADDRESS
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    options = WorkerOptions(model, tensor_parallel=settings.tensor_parallel, dtype=dtype,
                            gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=max_model_len,
                            seed=seed, weight_sync=settings.weight_sync, cpus_per_rank=settings.cpus_per_rank,
                            gpus_per_rank=settings.gpus_per_rank)
    group = ray.util.get_current_placement_group()  # the job's: trainer ranks first, then one bundle per engine
    placed = {"placement_group": group, "first_bundle": len(group.bundle_specs) - settings.engines} \
        if group is not None and len(group.bundle_specs) > settings.engines else {}
    return RolloutWorkers(options, engines=settings.engines, weights_dir=Path(run_dir) / "weights", **placed).engine


def stop_engine(engine: Engine) -> None:
    """Stop the rollout workers behind `engine` (an in-process engine goes with its process)."""
    if isinstance(engine, RemoteEngine):
        engine.workers.close()
