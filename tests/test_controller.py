"""The controller's scheduling on a real local Ray: claims, results, retries, leases, cancel, two controllers.

Job bodies here are light (tests/controller_tasks.py) so the logic is tested in
seconds; tests/test_pipeline.py runs real specialists and distillation through it.
"""

from __future__ import annotations

import itertools
import socket
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from controller.controller import Controller, holder_is_dead, job_resources, worker_name
from storage import jobs
from storage.db import database_url
from storage.models import Job, JobState, utcnow
from tests.controller_tasks import logged_sleep, placed


def _controller(store, db_url: str, **kwargs) -> Controller:
    ctl = Controller(store, db_url, execute=logged_sleep, poll_s=0.1, **kwargs)
    ctl.connect()
    return ctl


def _queue(store, log: Path, n: int, **spec) -> list[int]:
    return [jobs.submit(store, "specialist", f"j{i}", {"log": str(log), **spec}, max_attempts=2).id
            for i in range(n)]


def _final(store, ids: list[int]) -> bool:
    return all(jobs.get(store, i).state in {s.value for s in jobs.FINAL_STATES} for i in ids)


def _intervals(log: Path) -> dict[int, list[tuple[float, float]]]:
    starts: dict[int, list[float]] = {}
    runs: dict[int, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines():
        what, job_id, at = line.split()
        if what == "start":
            starts.setdefault(int(job_id), []).append(float(at))
        else:
            runs.setdefault(int(job_id), []).append((starts[int(job_id)].pop(0), float(at)))
    return runs


def test_holder_names_say_whether_the_holder_lives() -> None:
    me = worker_name("controller")
    assert not holder_is_dead(me)
    assert holder_is_dead(f"controller@{socket.gethostname()}:999999999:abc")
    assert not holder_is_dead("controller@some-other-host:1:abc")  # another machine: wait out the lease
    assert not holder_is_dead(None)


def test_resources_come_from_the_spec() -> None:
    job = Job(spec={"resources": {"cpus": 2, "gpus": 0.5, "memory_gb": 1}})
    assert job_resources(job) == {"CPU": 2.0, "GPU": 0.5, "memory": 2**30}
    assert job_resources(Job(spec={})) == {"CPU": 1.0, "GPU": 0.0}


def test_a_job_with_rollout_workers_runs_in_its_own_placement_group(store, local_ray) -> None:
    workers = {"weight_sync": "path", "engines": 1, "cpus_per_rank": 0.5}
    job = Job(spec={"resources": {"cpus": 1}, "rollout": workers})
    assert job_resources(job) == {"CPU": 1.5, "GPU": 0.0}
    ok = jobs.submit(store, "specialist", "placed", {"resources": {"cpus": 1}, "rollout": workers}).id
    huge = jobs.submit(store, "specialist", "huge", {"rollout": {**workers, "tensor_parallel": 8}}).id
    results = {}
    ctl = Controller(store, database_url(), execute=placed, poll_s=0.1)
    ctl.connect()
    original = ctl._finish

    def keep(task) -> None:
        results[task.job_id] = local_ray.get(task.ref)
        original(task)

    ctl._finish = keep
    ctl.run(until=lambda: _final(store, [ok, huge]), timeout_s=120)
    refused = jobs.get(store, huge)
    assert refused.state == "failed" and refused.attempts == 0  # at once, without running
    assert "cannot place: bundle 1 needs CPU 4 on one node, but the largest node has CPU 2" in refused.error
    assert jobs.get(store, ok).state == "succeeded"
    assert results[ok]["bundles"] == [{"CPU": 1.0}, {"CPU": 0.5}]  # the trainer's bundle, then the engine's
    assert all(g["state"] == "REMOVED" for g in local_ray.util.placement_group_table().values())


def test_jobs_run_once_each_and_succeed_or_fail(any_store, db_url: str, tmp_path: Path, local_ray) -> None:
    log = tmp_path / "runs.log"
    ok = _queue(any_store, log, 3, resources={"cpus": 1})
    bad = jobs.submit(any_store, "specialist", "bad", {"log": str(log), "fail": True, "resources": {"cpus": 1}},
                      max_attempts=2).id
    events = []
    ctl = _controller(any_store, db_url, on_event=events.append)
    ctl.run(until=lambda: _final(any_store, [*ok, bad]), timeout_s=120)
    assert [jobs.get(any_store, i).state for i in ok] == ["succeeded"] * 3
    failed = jobs.get(any_store, bad)
    assert failed.state == "failed" and failed.attempts == 2
    assert "ValueError: job" in failed.error and "told to fail" in failed.error
    assert [e.what for e in events if e.job_id == bad] == ["launched", "retried", "launched", "failed"]
    runs = _intervals(log)
    assert all(len(runs[i]) == 1 for i in ok)


def test_two_controllers_never_run_a_job_twice(any_store, db_url: str, tmp_path: Path, local_ray) -> None:
    log = tmp_path / "runs.log"
    ids = _queue(any_store, log, 8, sleep_s=0.3, resources={"cpus": 0.5})
    first, second = _controller(any_store, db_url), _controller(any_store, db_url)
    deadline = time.monotonic() + 120
    for ctl in itertools.cycle([first, second]):
        ctl.tick()
        if _final(any_store, ids) and not first.running and not second.running:
            break
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.05)
    runs = _intervals(log)
    assert sorted(runs) == sorted(ids)
    assert all(len(runs[i]) == 1 for i in ids), runs  # each job ran exactly once
    holders = {jobs.get(any_store, i).state for i in ids}
    assert holders == {"succeeded"}


def test_resources_limit_what_runs_side_by_side(store, tmp_path: Path, local_ray) -> None:
    from storage.db import database_url

    log = tmp_path / "runs.log"
    ids = _queue(store, log, 3, sleep_s=1.0, resources={"cpus": 2})  # the local Ray has 2 CPUs
    huge = jobs.submit(store, "specialist", "huge", {"log": str(log), "resources": {"cpus": 64}}).id
    ctl = _controller(store, database_url())
    ctl.run(until=lambda: _final(store, [*ids, huge]), timeout_s=120)
    runs = sorted(span for i in ids for span in _intervals(log)[i])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(runs)), "2-CPU jobs overlapped on a 2-CPU cluster"
    refused = jobs.get(store, huge)
    assert refused.state == "failed" and refused.attempts == 0
    assert "needs CPU 64" in refused.error and "whole cluster has CPU 2" in refused.error


def test_restarted_controller_recovers_its_predecessors_jobs(any_store, db_url: str, tmp_path: Path,
                                                             local_ray) -> None:
    log = tmp_path / "runs.log"
    dead_here, silent_elsewhere, live = _queue(any_store, log, 3)
    for job_id, holder in ((dead_here, f"controller@{socket.gethostname()}:999999999:old"),
                           (silent_elsewhere, "controller@other-host:42:old"),
                           (live, "controller@other-host:43:alive")):
        jobs.claim(any_store, job_id, holder)
    with any_store.session() as session, session.begin():  # the other host's first controller went quiet
        session.execute(update(Job).where(Job.id == silent_elsewhere)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    ctl = _controller(any_store, db_url, lease_s=60)
    ctl._recover()
    assert jobs.get(any_store, dead_here).state == "queued"  # its pid is gone: no need to wait
    assert jobs.get(any_store, silent_elsewhere).state == "queued"  # lease expired
    assert jobs.get(any_store, live).state == "running"  # still renewing: left alone
    assert "stopped (lease expired)" in jobs.get(any_store, dead_here).error
    ctl.run(until=lambda: _final(any_store, [dead_here, silent_elsewhere]), timeout_s=120)
    assert jobs.get(any_store, dead_here).state == "succeeded"
    assert jobs.get(any_store, dead_here).attempts == 2


def test_cancel_stops_the_running_task(store, tmp_path: Path, local_ray) -> None:
    from storage.db import database_url

    log = tmp_path / "runs.log"
    [job_id] = _queue(store, log, 1, sleep_s=60)
    ctl = _controller(store, database_url(), lease_s=3)
    ctl.run(until=lambda: log.exists(), timeout_s=60)  # it started
    jobs.transition(store, job_id, JobState.CANCELLED)
    started = time.monotonic()
    ctl.run(until=lambda: not ctl.running, timeout_s=30)
    assert time.monotonic() - started < 10
    assert jobs.get(store, job_id).state == "cancelled"
    time.sleep(1)
    assert "end" not in log.read_text()  # killed, not finished
