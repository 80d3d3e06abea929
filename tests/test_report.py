"""`retort report` from the job store alone: a pipeline's plots and its per-domain table."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from typer.testing import CliRunner

from controller.cli import app
from controller.report import domain_table
from storage import jobs


def _fake_history(store) -> int:
    """A finished pipeline's rows as the workers write them (the report reads nothing else)."""
    parent = jobs.submit(store, "pipeline", "demo", {})
    for name, scores in (("math", (0.0, 0.5, 0.7)), ("code", (0.1, 0.4, 0.45))):
        job = jobs.submit(store, "specialist", name, {"domain": name}, parent_id=parent.id)
        for step in range(0, 50, 10):
            jobs.record_metrics(store, job.id, "sft", step, {"loss": 2.0 / (step + 1)})
            jobs.record_metrics(store, job.id, "grpo", step, {"reward": step / 50})
        for phase, score in zip(("base", "sft", "grpo"), scores, strict=True):
            jobs.record_metrics(store, job.id, phase, 0, {"eval/score": score})
    student = jobs.submit(store, "distillation", "student",
                          {"divergence": "reverse_kl", "teachers": [{"index": 0, "name": "math"}],
                           "mixture": [{"domain": "math", "teacher": 0}]}, parent_id=parent.id)
    for step in (0, 10, 20):
        jobs.record_metrics(store, student.id, "distill", step,
                            {"loss": 1.0 - step / 40, "eval/math/score": step / 40, "eval/code/score": step / 80})
    return parent.id


def test_domain_table_joins_specialists_and_student(store) -> None:
    pipeline = _fake_history(store)
    members = [jobs.get(store, m.id) for m in jobs.children(store, pipeline)]
    assert domain_table(members) == {"math": {"base": 0.0, "sft": 0.5, "grpo": 0.7, "student": 0.5},
                                     "code": {"base": 0.1, "sft": 0.4, "grpo": 0.45, "student": 0.25}}


def test_report_is_self_contained_html_with_plots(store, retort_home: Path) -> None:
    pipeline = _fake_history(store)
    result = CliRunner().invoke(app, ["report", "demo"])  # by name: the newest pipeline called demo
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().removeprefix("report: "))
    assert path == retort_home / "runs" / "pipeline" / f"demo-{pipeline}" / "report.html"
    page = path.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # specialists, distillation
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "<td>math</td><td>0.000</td><td>0.500</td><td>0.700</td><td>0.500</td>" in page
    assert "src=\"http" not in page  # nothing fetched from elsewhere
