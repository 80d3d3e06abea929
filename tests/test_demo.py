"""`retort demo` end to end, as CI runs it: the printed table, results.json, the report, learning on every domain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, local_ray) -> dict:
    home = tmp_path_factory.mktemp("demo-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RETORT_HOME", str(home))
        patch.delenv("RETORT_DB_URL", raising=False)
        result = CliRunner().invoke(app, ["demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results_path = Path(re.search(r"results: (\S+)", result.stdout).group(1))
    return {"stdout": result.stdout, "results": json.loads(results_path.read_text()), "dir": results_path.parent}


def test_demo_prints_the_table_and_writes_results_and_report(demo_run: dict) -> None:
    results = demo_run["results"]
    assert results["state"] == "succeeded" and set(results["domains"]) == {"math", "code", "instruct"}
    for domain, row in results["domains"].items():
        assert set(row) == {"base", "sft", "grpo", "student"}
        printed = re.search(rf"│\s+{domain}\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│",
                            demo_run["stdout"])
        assert printed, f"no table row for {domain}"
        assert [float(x) for x in printed.groups()] == pytest.approx(
            [row[k] for k in ("base", "sft", "grpo", "student")], abs=1e-3)
    page = (demo_run["dir"] / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # wall time, specialists, distillation
    for domain in ("math", "code", "instruct"):
        assert f"data-domain='{domain}' style='color:#" in page
    # The 15-minute budget is a measured figure (README), not a timed assertion: the same code took 702 s, 980 s
    # and about 1,850 s on two-core machines of one kind. What is checked is that the figures say where the time went:
    # the distillation starts after the last specialist, and the wall time holds every job and little else.
    jobs = results["job_wall_s"]
    assert set(jobs) == {"math", "code", "instruct", "demo-student"}
    longest_specialist = max(jobs[name] for name in ("math", "code", "instruct"))
    assert longest_specialist + jobs["demo-student"] <= results["wall_s"] <= sum(jobs.values()) + 300, jobs


def test_demo_specialists_and_student_learned(demo_run: dict) -> None:
    domains = demo_run["results"]["domains"]
    for domain, row in domains.items():
        assert max(row["sft"], row["grpo"]) >= row["base"] + 0.25, (domain, row)
        assert row["student"] > row["base"], (domain, row)  # the student learned from its teachers


def test_demo_student_reaches_its_teachers(demo_run: dict) -> None:
    """The distillation issue's bar: on every domain the student scores at least 0.95 of its teacher
    (both scored by the distillation run itself, on the same held-out prompts)."""
    results = json.loads((demo_run["dir"] / "demo-student" / "results.json").read_text())
    assert set(results["domains"]) == {"math", "code", "instruct"}
    for domain, row in results["domains"].items():
        assert row["after"] >= 0.95 * row["teacher"], (domain, row)


def test_demo_specialists_reach_the_issue_targets(demo_run: dict) -> None:
    """The specialists issue's bar: math at least 0.9 after GRPO, code and instruct 0.25 above the base,
    GRPO nowhere below SFT and at least 0.05 above it on two domains (those whose demonstrations have habits)."""
    domains = demo_run["results"]["domains"]
    assert domains["math"]["grpo"] >= 0.9, domains["math"]
    for domain, row in domains.items():
        assert row["base"] < row["sft"] <= row["grpo"], (domain, row)
    for domain in ("code", "instruct"):
        assert domains[domain]["grpo"] >= domains[domain]["base"] + 0.25, (domain, domains[domain])
    assert sum(row["grpo"] >= row["sft"] + 0.05 for row in domains.values()) >= 2, domains
