"""`retort demo`: the whole pipeline on the embedded default, on one machine, in minutes.

It builds the tiny base model, writes the three demo domains, queues
``configs/demo/pipeline.yaml`` (three specialists, then the distillation over them),
runs it through the controller on a local Ray with the SQLite store, and writes
``results.json`` and ``report.html`` in the pipeline's run directory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from controller.controller import Controller, Event
from controller.pipeline import Pipeline, submit_pipeline
from controller.report import domain_table, judge_quality, write_report
from controller.worker import pipeline_dir
from specialists.demo_sizes import DEMO_ROWS
from storage import jobs
from storage.db import Store, database_url, run_home
from storage.specfile import load_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_PIPELINE = CONFIGS / "demo" / "pipeline.yaml"


@dataclass
class DemoResult:
    pipeline_id: int
    state: str
    domains: dict[str, dict[str, float]]  # domain → {base, sft, grpo, student}
    wall_s: float
    results_path: Path
    report_path: Path
    judges: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # job → phase → judge/* metrics


def prepare(home: Path) -> None:
    """The tiny base model and the demo domains under `<home>/demo` (kept when already there)."""
    from specialists.base_model import init_base_model
    from specialists.domains import write_demo_data

    base = home / "demo" / "base"
    if not (base / "config.json").exists():
        init_base_model(base, seed=0)
    data = home / "demo" / "data"
    if not all((data / d / "rl.jsonl").exists() for d in ("math", "code", "instruct")) or \
            not (data / "instruct" / "judge_eval.jsonl").exists():  # written beside the domains since judging
        write_demo_data(data, DEMO_ROWS.train, DEMO_ROWS.eval, seed=0, n_rl=DEMO_ROWS.rl)


def run_demo(store: Store, *, pipeline_file: Path = DEMO_PIPELINE, num_cpus: int | None = None,
             on_event: Callable[[Event], None] | None = None,
             on_tick: Callable[[int], None] | None = None) -> DemoResult:
    """Prepare, queue the demo pipeline, run it through the controller to the end, write results and report."""
    started = time.monotonic()
    prepare(run_home())
    return run_pipeline(store, load_spec(Pipeline, pipeline_file), num_cpus=num_cpus, on_event=on_event,
                        on_tick=on_tick, started=started)


def run_pipeline(store: Store, pipeline: Pipeline, *, num_cpus: int | None = None,
                 on_event: Callable[[Event], None] | None = None, on_tick: Callable[[int], None] | None = None,
                 started: float | None = None) -> DemoResult:
    """Queue a pipeline, run it through the controller on a local Ray to the end, write results and report."""
    started = time.monotonic() if started is None else started
    parent, _ = submit_pipeline(store, pipeline)
    ctl = Controller(store, database_url(), poll_s=0.5, on_event=on_event)
    ctl.connect(num_cpus=num_cpus)

    def finished() -> bool:
        if on_tick is not None:
            on_tick(parent.id)
        return jobs.get(store, parent.id).state in {s.value for s in jobs.FINAL_STATES}

    try:
        ctl.run(until=finished)
    except KeyboardInterrupt:
        ctl.shutdown()
        raise
    wall_s = time.monotonic() - started
    parent = jobs.get(store, parent.id)
    members = [jobs.get(store, m.id) for m in jobs.children(store, parent.id)]
    domains = domain_table(members)
    directory = pipeline_dir(parent)
    directory.mkdir(parents=True, exist_ok=True)
    results = directory / "results.json"
    clean = {d: {k: (None if math.isnan(v) else round(v, 4)) for k, v in row.items()} for d, row in domains.items()}
    job_wall_s = {m.name: round((m.finished_at - m.started_at).total_seconds(), 1) for m in members
                  if m.started_at is not None and m.finished_at is not None}  # where the minutes went
    judges = {m.name: quality for m in members if m.kind == "specialist" and (quality := judge_quality(m))}
    results.write_text(json.dumps({"pipeline_job": parent.id, "state": parent.state, "domains": clean,
                                   "wall_s": round(wall_s, 1), "job_wall_s": job_wall_s,
                                   **({"judge": _rounded(judges)} if judges else {})}, indent=2))
    report = write_report(store, parent, directory / "report.html")
    return DemoResult(parent.id, parent.state, domains, wall_s, results, report, judges)


def _rounded(judges: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    return {name: {phase: {k: round(v, 4) for k, v in row.items()} for phase, row in phases.items()}
            for name, phases in judges.items()}
