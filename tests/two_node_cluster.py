"""Run on a simulated two-node Ray cluster (ray.cluster_utils.Cluster, 2 CPUs per node) what the trainer-rank
test checks: where a two-rank job's ranks land, a gloo all-reduce across the nodes, refused, failed and
cancelled jobs, no placement group left behind, and a real pipeline through `retort controller`.

    python -m tests.two_node_cluster OUT.json PIPELINE.yaml      (tests/test_trainer_ranks.py runs it)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import ray
from ray.cluster_utils import Cluster

from controller.controller import Controller
from storage import jobs
from storage.db import database_url, open_store
from tests.controller_tasks import ranks_allreduce


def scheduling(store, url: str) -> dict:
    ranked = {"resources": {"cpus": 2, "workers": 2}}  # a 2-CPU bundle per rank: one per node
    ids = {"ok": jobs.submit(store, "specialist", "ok", ranked).id,
           "huge": jobs.submit(store, "specialist", "huge", {"resources": {"cpus": 3, "workers": 2}}).id,
           "fails": jobs.submit(store, "specialist", "fails", {**ranked, "fail": True}, max_attempts=1).id,
           "cancelled": jobs.submit(store, "specialist", "cancelled", {**ranked, "sleep_s": 300}).id}
    results: dict = {}
    ctl = Controller(store, url, execute=ranks_allreduce, poll_s=0.1)
    ctl.connect()
    original = ctl._finish

    def keep(task) -> None:
        try:
            results[task.job_id] = ray.get(task.ref)
        except Exception as exc:  # the failing job's error, which the controller reports too
            results[task.job_id] = repr(exc)
        original(task)

    ctl._finish = keep
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ctl.tick()
        if jobs.get(store, ids["cancelled"]).state == "running" and ctl.running.get(ids["cancelled"]):
            jobs.transition(store, ids["cancelled"], jobs.JobState.CANCELLED)  # what `retort cancel` does
        if all(jobs.get(store, i).state in {s.value for s in jobs.FINAL_STATES} for i in ids.values()) \
                and not ctl.running:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    return {"jobs": {name: {"state": jobs.get(store, i).state, "error": jobs.get(store, i).error,
                            "attempts": jobs.get(store, i).attempts, "result": results.get(i)}
                     for name, i in ids.items()},
            "groups": [g["state"] for g in ray.util.placement_group_table().values()],
            "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}


def pipeline(path: str, address: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": address}
    retort = [sys.executable, "-m", "controller.cli"]
    submitted = subprocess.run([*retort, "submit", path], env=env, capture_output=True, text=True)
    ran = subprocess.run([*retort, "controller", "--until-idle"], env=env, capture_output=True, text=True,
                         timeout=900)
    return {"submit": submitted.stdout + submitted.stderr, "controller": ran.stdout + ran.stderr,
            "returncode": ran.returncode, "groups": [g["state"] for g in ray.util.placement_group_table().values()]}


def main(out: str, pipeline_file: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        url = database_url()
        report = {"scheduling": scheduling(open_store(url), url)}
        report["pipeline"] = pipeline(pipeline_file, cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(out, "w") as f:
        json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
