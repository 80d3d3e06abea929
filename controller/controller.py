"""The Ray controller: claims queued jobs, runs each as a Ray task, keeps the job store true.

    retort controller            # foreground; RAY_ADDRESS joins a cluster, else a local Ray starts

One tick of the loop, top to bottom:

1. recover   running jobs whose holder stopped renewing its lease (a dead controller,
             a killed `retort run-job`) go back to queued, or fail past their attempts;
2. watch     each of our Ray tasks: finished → succeeded; its process died or it
             raised → retried (queued again, resuming from its last checkpoint) or
             failed with the reason; lease renewed for the rest — a renewal that fails
             means the job was cancelled (or taken over), so its task is killed;
3. pipelines a pipeline's distillation becomes runnable once the specialists it names
             succeeded (their checkpoints are written into its spec); it fails without
             running if one of them failed; the pipeline row follows its members;
4. launch    queued jobs, oldest first, while the cluster has the CPUs, GPUs and memory
             their specs declare; a job larger than the whole cluster fails at once.

Claims and every state change are compare-and-set in the job store, so two controllers
on one database never run a job twice at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller import placement
from storage import jobs
from storage.db import Store
from storage.models import Job, JobState

RUNNABLE_KINDS = ("specialist", "distillation")


def worker_name(role: str) -> str:
    """A holder name that says where it runs: ``role@host:pid:nonce``."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def holder_is_dead(worker: str | None) -> bool:
    """True when `worker` names a process of this host that no longer exists (no need to wait out its lease)."""
    if not worker or "@" not in worker:
        return False
    host, _, rest = worker.split("@", 1)[1].partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def job_resources(job: Job) -> dict[str, float]:
    """The Ray resources a job needs in all: its trainer's, and its rollout workers' when it has them."""
    return placement.total(placement.job_bundles(job))


@dataclass
class Running:
    job_id: int
    ref: Any  # ray.ObjectRef of the task
    need: dict[str, float]
    renewed: float = field(default_factory=time.monotonic)
    group: Any = None  # its placement group, when it has rollout workers


@dataclass
class Event:
    """Something the controller did, for the console and for tests."""

    job_id: int
    what: str  # launched | succeeded | retried | failed | cancelled | recovered | waiting
    detail: str = ""


class Controller:
    """Runs the job store's queued jobs on Ray; one instance per process."""

    def __init__(self, store: Store, db_url: str, *, lease_s: float = 30.0, poll_s: float = 0.5,
                 execute: Callable[..., Any] | None = None, env: dict[str, str] | None = None,
                 on_event: Callable[[Event], None] | None = None):
        self.store = store
        self.db_url = db_url
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.worker = worker_name("controller")
        self.running: dict[int, Running] = {}
        self.env = env or {}
        self.on_event = on_event
        if execute is None:
            from controller.worker import execute_job as execute
        self._execute = execute
        self._remote = None

    # --- Ray ---------------------------------------------------------------------------

    def connect(self, num_cpus: int | None = None) -> None:
        """Join the cluster at RAY_ADDRESS, or start a local Ray (with `num_cpus`, default all cores)."""
        import ray

        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=num_cpus, **kwargs)
        # One fresh worker process per job (max_calls=1): vLLM and torch state never leak
        # between jobs, and killing a job's process kills only that job.
        self._remote = ray.remote(max_calls=1, max_retries=0)(self._execute)

    def _task_env(self, need: dict[str, float]) -> dict[str, str]:
        # Ray sets OMP_NUM_THREADS=1 in workers; give each job the cores it reserved, and keep
        # vLLM from pinning its threads to cores another job is using.
        threads = str(max(1, int(need["CPU"])))
        env = {"OMP_NUM_THREADS": threads, "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
        for name in ("RETORT_HOME", "RETORT_DB_URL", "HF_HUB_OFFLINE"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        env.update(self.env)
        return env

    def _free(self) -> tuple[dict[str, float], dict[str, float]]:
        """(what the cluster has in all, what is free now after our own launches)."""
        import ray

        total = ray.cluster_resources()
        available = ray.available_resources()
        ours: dict[str, float] = {}
        for task in self.running.values():
            for key, value in task.need.items():
                ours[key] = ours.get(key, 0.0) + value
        free = {key: min(available.get(key, 0.0), total.get(key, 0.0) - ours.get(key, 0.0)) for key in total}
        return total, free

    # --- the loop ----------------------------------------------------------------------

    def tick(self) -> None:
        """One pass: recover, watch, pipelines, launch."""
        self._recover()
        self._watch()
        self._advance_pipelines()
        self._launch()

    def run(self, *, until: Callable[[], bool] | None = None, timeout_s: float | None = None) -> None:
        """Tick until `until()` is true (forever by default); Ctrl-C leaves running jobs to the lease."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.tick()
            if until is not None and until():
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"controller: still running after {timeout_s:.0f} s")
            time.sleep(self.poll_s)

    def shutdown(self) -> None:
        """Stop our tasks and hand their jobs back to the queue (a clean stop; a crash leaves them to the lease)."""
        import ray

        for task in list(self.running.values()):
            ray.cancel(task.ref, force=True)
            placement.release(task.group)
            with contextlib.suppress(jobs.IllegalTransition):
                jobs.fail_or_retry(self.store, task.job_id, "controller stopped", worker=self.worker)
        self.running.clear()

    def _emit(self, job_id: int, what: str, detail: str = "") -> None:
        if self.on_event is not None:
            self.on_event(Event(job_id, what, detail))

    # 1. recover ------------------------------------------------------------------------

    def _recover(self) -> None:
        orphans = jobs.expired(self.store, self.lease_s, exclude_worker=self.worker)
        expired_ids = {o.id for o in orphans}
        orphans += [job for job in jobs.list_jobs(self.store, states=[JobState.RUNNING])  # dead holders here:
                    if job.worker != self.worker and job.id not in expired_ids and holder_is_dead(job.worker)]
        for job in orphans:
            if job.kind == "pipeline":
                continue  # a pipeline row holds no process; _advance_pipelines moves it
            try:
                after = jobs.fail_or_retry(self.store, job.id, f"its holder {job.worker} stopped (lease expired)",
                                           worker=job.worker)
            except jobs.IllegalTransition:
                continue  # another controller recovered it first
            self._emit(job.id, "recovered", f"from {job.worker}: now {after.state}")

    # 2. watch --------------------------------------------------------------------------

    def _watch(self) -> None:
        import ray

        if not self.running:
            return
        refs = [task.ref for task in self.running.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready_set = set(ready)
        for job_id, task in list(self.running.items()):
            if task.ref in ready_set:
                del self.running[job_id]
                self._finish(task)
                placement.release(task.group)
            elif time.monotonic() - task.renewed > min(self.lease_s / 3, 5.0):
                if jobs.heartbeat(self.store, job_id, self.worker):
                    task.renewed = time.monotonic()
                else:  # cancelled by a user, or taken over: stop its process
                    ray.cancel(task.ref, force=True)
                    del self.running[job_id]
                    placement.release(task.group)
                    self._emit(job_id, "cancelled", "its job is no longer ours to run; task killed")

    def _finish(self, task: Running) -> None:
        import ray
        from ray.exceptions import RayTaskError, TaskCancelledError

        try:
            result = ray.get(task.ref)
        except TaskCancelledError:
            return
        except RayTaskError as exc:  # our code raised: keep its message, not Ray's wrapper
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self._failed(task.job_id, f"{type(cause).__name__}: {cause}")
            return
        except ray.exceptions.RayError as exc:  # the worker process died (killed, out of memory, …)
            self._failed(task.job_id, f"worker process died: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            return
        try:
            jobs.transition(self.store, task.job_id, JobState.SUCCEEDED, worker=self.worker)
        except jobs.IllegalTransition:
            return  # cancelled while finishing
        self._emit(task.job_id, "succeeded", str(result.get("run_dir", "")) if isinstance(result, dict) else "")

    def _failed(self, job_id: int, reason: str) -> None:
        try:
            job = jobs.fail_or_retry(self.store, job_id, reason, worker=self.worker)
        except jobs.IllegalTransition:
            return
        self._emit(job_id, "retried" if job.state == JobState.QUEUED.value else "failed", reason)

    # 3. pipelines ----------------------------------------------------------------------

    def _advance_pipelines(self) -> None:
        for pipeline in jobs.list_jobs(self.store, states=[JobState.QUEUED, JobState.RUNNING]):
            if pipeline.kind != "pipeline":
                continue
            members = jobs.children(self.store, pipeline.id)
            states = {m.state for m in members}
            if pipeline.state == JobState.QUEUED.value and states != {JobState.QUEUED.value}:
                self._move(pipeline.id, JobState.RUNNING)
            if states <= {s.value for s in jobs.FINAL_STATES}:
                if pipeline.state == JobState.QUEUED.value:
                    self._move(pipeline.id, JobState.RUNNING)
                bad = [m for m in members if m.state != JobState.SUCCEEDED.value]
                if bad:
                    self._move(pipeline.id, JobState.FAILED,
                               "; ".join(f"{m.kind} {m.name!r} (job {m.id}) {m.state}" for m in bad))
                else:
                    self._move(pipeline.id, JobState.SUCCEEDED)

    def _move(self, job_id: int, target: JobState, error: str | None = None) -> None:
        try:
            jobs.transition(self.store, job_id, target, error=error)
        except jobs.IllegalTransition:
            return
        self._emit(job_id, target.value, error or "")

    def _resolve_teachers(self, job: Job) -> str | None:
        """For a pipeline's distillation: fill in its teachers' checkpoints from the specialists.

        Returns None when it is ready to run, "wait" while a specialist is unfinished, or
        the reason it can never run.
        """
        teachers = job.spec.get("teachers", [])
        wanted = {t["specialist"] for t in teachers if t.get("specialist")}
        if not wanted:
            return None
        siblings = {m.name: m for m in jobs.children(self.store, job.parent_id) if m.kind == "specialist"}
        for name in sorted(wanted):
            member = siblings.get(name)
            if member is None:
                return f"its pipeline has no specialist {name!r}"
            if member.state in (JobState.FAILED.value, JobState.CANCELLED.value):
                return f"specialist {name!r} (job {member.id}) {member.state}"
            if member.state != JobState.SUCCEEDED.value:
                return "wait"
        spec = dict(job.spec)
        spec["teachers"] = []
        for teacher in teachers:
            teacher = dict(teacher)
            if teacher.get("specialist"):
                checkpoint = jobs.latest_checkpoint(self.store, siblings[teacher["specialist"]].id)
                if checkpoint is None:
                    return f"specialist {teacher['specialist']!r} succeeded without recording a checkpoint"
                teacher.update(checkpoint=checkpoint.path, specialist=None)
            spec["teachers"].append(teacher)
        jobs.update_spec(self.store, job.id, spec)
        return None

    # 4. launch -------------------------------------------------------------------------

    def _launch(self) -> None:
        queued = [j for j in reversed(jobs.list_jobs(self.store, states=[JobState.QUEUED]))
                  if j.kind in RUNNABLE_KINDS]
        if not queued:
            return
        total, free = self._free()
        for job in queued:
            if job.kind == "distillation" and job.parent_id is not None:
                blocker = self._resolve_teachers(job)
                if blocker == "wait":
                    continue
                if blocker is not None:
                    self._move(job.id, JobState.FAILED, f"cannot run: {blocker}")
                    continue
            bundles = placement.job_bundles(job)
            need = placement.total(bundles)
            if len(bundles) > 1 and (problem := placement.unplaceable(job, bundles)):
                self._move(job.id, JobState.FAILED, f"cannot place: {problem}")
                continue
            too_big = [f"{k} {v:g}" for k, v in need.items() if v > total.get(k, 0.0)]
            if too_big:
                have = ", ".join(f"{k} {total.get(k, 0.0):g}" for k in need)
                self._move(job.id, JobState.FAILED, f"needs {', '.join(too_big)} but the whole cluster has {have}; "
                                                   "lower its `resources` or add machines")
                continue
            if any(v > free.get(k, 0.0) + 1e-9 for k, v in need.items()):
                continue  # waits for resources; a smaller job behind it may still fit
            try:
                jobs.claim(self.store, job.id, self.worker)
            except jobs.IllegalTransition:
                continue  # another controller took it
            group, options = None, {}
            if len(bundles) > 1:  # the trainer in bundle 0, its rollout workers in the others
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                group = placement.reserve(job, bundles)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            trainer = bundles[0]
            ref = self._remote.options(
                num_cpus=trainer["CPU"], num_gpus=trainer["GPU"], memory=trainer.get("memory"),
                name=f"retort-job-{job.id}", runtime_env={"env_vars": self._task_env(trainer)}, **options,
            ).remote(self.db_url, job.id)
            self.running[job.id] = Running(job.id, ref, need, group=group)
            for key, value in need.items():
                free[key] = free.get(key, 0.0) - value
            self._emit(job.id, "launched", f"{job.kind} {job.name!r} with {need['CPU']:g} CPU")
