"""Placement: a job with several processes gets one Ray placement group for all of them.

Bundles 0…W-1 hold the trainer ranks (`resources.workers` of them, each `resources` big), the bundles after
them one rollout engine each (its `rollout` block: every tensor-parallel rank's CPUs and GPUs in one bundle,
so an engine's ranks share a node). The group is PACKed: on one node when it fits, spread over nodes
otherwise (Ray's PACK is best-effort, as verl and OpenRLHF use it). A bundle larger than every node is
refused before anything is reserved; the controller removes the group when the job succeeds, fails or is
cancelled. A one-rank job without rollout workers is one plain Ray task, as before.
"""

from __future__ import annotations

from typing import Any

from rollout.worker import ENGINE_HINT, bundle_problem
from storage.models import Job
from storage.specfile import RolloutSettings


def trainer_bundle(job: Job) -> dict[str, float]:
    """The Ray resources a job's spec declares for its own process (CPU, GPU, memory in bytes)."""
    declared = job.spec.get("resources") or {}
    need = {"CPU": float(declared.get("cpus", 1.0)), "GPU": float(declared.get("gpus", 0.0))}
    if declared.get("memory_gb"):
        need["memory"] = float(declared["memory_gb"]) * 2**30
    return need


def trainer_ranks(job: Job) -> int:
    return int((job.spec.get("resources") or {}).get("workers", 1))


def job_bundles(job: Job) -> list[dict[str, float]]:
    """One bundle per trainer rank, then one per rollout engine (none for an in-process engine)."""
    rollout = RolloutSettings.model_validate(job.spec.get("rollout") or {})
    return [trainer_bundle(job)] * trainer_ranks(job) + rollout.bundles()


def total(bundles: list[dict[str, float]]) -> dict[str, float]:
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    return need


def _for_ray(bundles: list[dict[str, float]]) -> list[dict[str, float]]:
    """Bundles as Ray takes them: no zero entries (a trainer without GPUs asks for none, not for 0)."""
    return [{k: v for k, v in b.items() if v} for b in bundles]


TRAINER_HINT = ("each trainer rank's resources sit on one node: lower resources.cpus/gpus per rank (and raise "
                "resources.workers), or add a bigger node")


def unplaceable(job: Job, bundles: list[dict[str, float]]) -> str | None:
    """Why these bundles (`job_bundles(job)`) can never be placed on this cluster's nodes, or None."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    ranks = trainer_ranks(job)
    hints = [TRAINER_HINT if i < ranks else ENGINE_HINT for i in range(len(bundles))]
    return bundle_problem(_for_ray(bundles), nodes, hints)


def reserve(job: Job, bundles: list[dict[str, float]]) -> Any:
    """The job's placement group (Ray places it when the resources are free; the task waits for it)."""
    import ray

    return ray.util.placement_group(_for_ray(bundles), strategy="PACK", name=f"retort-job-{job.id}")


def release(group: Any) -> None:
    import ray

    if group is not None:
        ray.util.remove_placement_group(group)
