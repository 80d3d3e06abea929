"""`retort report` from the job store alone: a pipeline's plots and its per-domain table."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.report import domain_table
from storage import jobs


def _fake_history(store) -> int:
    """A finished pipeline's rows as the workers write them (the report reads nothing else)."""
    parent = jobs.submit(store, "pipeline", "demo", {})
    for name, scores in (("math", (0.0, 0.5, 0.7)), ("code", (0.1, 0.4, 0.45))):
        job = jobs.submit(store, "specialist", name, {"domain": name}, parent_id=parent.id)
        jobs.claim(store, job.id, "test-worker")
        jobs.transition(store, job.id, jobs.JobState.SUCCEEDED)
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
    for step in range(1, 21):
        jobs.record_metrics(store, student.id, "distill", step, {"loss/teacher0": 1.0 - step / 30})
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
    assert len(images) == 3  # wall time, specialists, distillation
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "data-domain='math' style='color:#1f77b4'>math</td><td>0.000</td><td>0.500</td><td>0.700</td>" \
        "<td>0.500</td>" in page
    assert "Precision: " in page and "torch " in page and "Device: " in page
    assert "src=\"http" not in page  # nothing fetched from elsewhere


def _colors_in(png: bytes) -> set[tuple[int, int, int]]:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}


def test_report_colours_are_one_per_domain_and_chromium_draws_it(store, retort_home: Path, tmp_path: Path) -> None:
    pipeline = _fake_history(store)
    path = Path(CliRunner().invoke(app, ["report", str(pipeline)]).stdout.strip().removeprefix("report: "))
    page = path.read_text()
    legend = dict(re.findall(r"class='domain' data-domain='(\w+)' style='color:(#[0-9a-f]{6})'>&#9632;", page))
    assert legend == {"math": "#1f77b4", "code": "#ff7f0e"}
    for domain, color in legend.items():  # the table's row takes the same colour
        assert f"data-domain='{domain}' style='color:{color}'>{domain}</td>" in page
    wall, specialists, distillation = (base64.b64decode(i) for i in re.findall(r'base64,([^"]+)"', page))
    rgb = {d: tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for d, c in legend.items()}
    assert {rgb["math"], rgb["code"]} <= _colors_in(specialists) & _colors_in(wall)
    assert {rgb["math"], rgb["code"]} <= _colors_in(distillation)  # code: its score line; math: its teacher's loss

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    drawn = _colors_in(shot.read_bytes())
    assert {rgb["math"], rgb["code"]} <= drawn  # the plots were drawn on the page, in the domains' colours


def test_report_puts_judge_quality_beside_the_reward_curves(store, retort_home: Path) -> None:
    from controller.report import judge_quality, write_report

    parent = jobs.submit(store, "pipeline", "judges", {})
    for name, accuracy in (("instruct-judged", (0.0, 0.8, 0.85)), ("instruct-programmatic", None)):
        job = jobs.submit(store, "specialist", name, {"domain": "instruct"}, parent_id=parent.id)
        for step in range(0, 40, 10):
            jobs.record_metrics(store, job.id, "grpo", step, {"reward": step / 40})
        for i, phase in enumerate(("base", "sft", "grpo")):
            jobs.record_metrics(store, job.id, phase, 0, {"eval/score": i / 3})
            if accuracy is not None:
                jobs.record_metrics(store, job.id, phase, 0, {
                    "judge/accuracy": accuracy[i], "judge/parse_failure_rate": 1.0 - i / 2,
                    "judge/rank_correlation/direct": 0.1 * i, "judge/tokens_per_response": 240.0,
                    "judge/seconds_per_response": 0.003})
    members = [jobs.get(store, m.id) for m in jobs.children(store, parent.id)]
    assert judge_quality(members[0])["sft"]["judge/accuracy"] == 0.8 and judge_quality(members[1]) == {}
    assert judge_quality(members[0])["sft"]["judge/rank_correlation"] == pytest.approx(0.1)  # mean over criteria
    page = write_report(store, jobs.get(store, parent.id), retort_home / "judges.html").read_text()
    assert "<h2>Judges</h2>" in page
    assert "<tr><td>instruct-judged</td><td>sft</td><td>0.800</td><td>0.100</td><td>50.0%</td><td>240</td>" \
        "<td>3.0</td></tr>" in page
    assert "instruct-programmatic</td>" not in page.split("<h2>Judges</h2>")[1].split("<img")[0]  # no judge row
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 2  # specialists, judges (none ran: no wall time)
