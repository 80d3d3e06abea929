"""Light job bodies for the controller's scheduling tests; real jobs run in the slow tests.

Each writes when it starts and ends to the log file its spec names, so a test can
prove that no job ran twice at once and that a cancelled one stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from storage import jobs
from storage.db import open_store


def logged_sleep(db_url: str, job_id: int) -> dict:
    store = open_store(db_url)
    spec = jobs.get(store, job_id).spec
    jobs.set_progress(store, job_id, "sleeping", process=f"test:{os.getpid()}")
    log = Path(spec["log"])
    with log.open("a") as f:
        f.write(f"start {job_id} {time.time()}\n")
    time.sleep(spec.get("sleep_s", 0.2))
    if spec.get("fail"):
        raise ValueError(f"job {job_id} was told to fail")
    with log.open("a") as f:
        f.write(f"end {job_id} {time.time()}\n")
    return {"run_dir": str(log.parent)}


def placed(db_url: str, job_id: int) -> dict:
    """Report the placement group this job's task runs in, and start an actor in its first rollout bundle."""
    import ray

    group = ray.util.get_current_placement_group()
    if group is None:
        return {"bundles": None}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0.5)
    class Probe:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    probe = Probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, 1)).remote()
    node = ray.get(probe.node.remote())
    return {"bundles": group.bundle_specs, "task_node": ray.get_runtime_context().get_node_id(), "probe_node": node}


def ranks_allreduce(db_url: str, job_id: int) -> dict:
    """Every trainer rank of the job adds rank+1 in a gloo all-reduce and reports its node (rank 0's result:
    each rank's node, the sum); `sleep_s` keeps it running, `fail` makes rank 1 raise."""
    from controller.worker import on_ranks
    from storage.specfile import Resources

    spec = jobs.get(open_store(db_url), job_id).spec
    args = (float(spec.get("sleep_s", 0.0)), bool(spec.get("fail")))
    return on_ranks(Resources.model_validate(spec["resources"]), lambda: _allreduce_rank(*args), _allreduce_rank,
                    args)


def _allreduce_rank(sleep_s: float, fail: bool) -> dict:
    import ray
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    if fail and rank == 1:
        raise ValueError("rank 1 was told to fail")
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    time.sleep(sleep_s)
    return {"sum": float(total), "nodes": nodes, "backend": dist.get_backend(),
            "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}}
