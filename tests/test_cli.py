"""The `retort` CLI through typer's test runner: validate, submit, status, cancel, placeholders, help."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from controller.cli import app
from tests.conftest import REPO

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_validate_passes_every_shipped_example(retort_home: Path) -> None:
    files = sorted(str(p) for p in REPO.glob("configs/**/*.yaml"))
    result = run("validate", *files)
    assert result.exit_code == 0, result.output
    assert result.output.count("✓") == len(files)


def test_validate_fails_with_located_messages(tmp_path: Path, retort_home: Path) -> None:
    bad = tmp_path / "math.yaml"
    text = (REPO / "configs/demo/specialists/math.yaml").read_text()
    bad.write_text(text.replace("max_steps:", "max_step:", 1))  # the first one is sft's
    good = REPO / "configs/rubrics/instruct.yaml"
    result = run("validate", str(good), str(bad))
    assert result.exit_code == 1
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "max_step:" in text)
    assert f"✗ {bad}:{line}:3: sft.max_step: unknown key" in result.stderr
    assert "1 of 2 file(s) have problems" in result.stderr
    assert "Traceback" not in result.output


def test_submit_then_status_shows_queued(retort_home: Path) -> None:
    result = run("submit", str(REPO / "configs/demo/specialists/math.yaml"))
    assert result.exit_code == 0, result.output
    assert "queued specialist job 1 (math)" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "1"  # the id alone, last, for scripts
    listing = run("status")
    assert listing.exit_code == 0
    row = next(line for line in listing.stdout.splitlines() if "math" in line)
    assert "queued" in row and "specialist" in row and "0/3" in row
    detail = run("status", "1")
    assert detail.exit_code == 0
    assert "base_model:" in detail.stdout and "num_generations: 8" in detail.stdout


def test_submit_refuses_rubrics_and_bad_files(tmp_path: Path, retort_home: Path) -> None:
    result = run("submit", str(REPO / "configs/rubrics/instruct.yaml"))
    assert result.exit_code == 1 and "a rubric is not a job" in result.stderr
    result = run("submit", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 1 and f"{tmp_path / 'missing.yaml'}: no such file" in result.stderr
    assert "no jobs yet" in run("status").stdout


def test_status_and_cancel_of_unknown_job(retort_home: Path) -> None:
    for args in (("status", "42"), ("cancel", "42")):
        result = run(*args)
        assert result.exit_code == 1
        assert "error: no job with id 42 in the job store" in result.stderr


def test_cancel_then_cancel_again(retort_home: Path) -> None:
    run("submit", str(REPO / "configs/demo/distill.yaml"))
    assert "job 1 (demo-student) cancelled" in run("cancel", "1").stdout
    again = run("cancel", "1")
    assert again.exit_code == 1 and "cannot go from cancelled to cancelled" in again.stderr


def test_unreachable_database_is_one_line(monkeypatch: pytest.MonkeyPatch, retort_home: Path) -> None:
    monkeypatch.setenv("RETORT_DB_URL", "notadb://nowhere")
    result = run("status")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot open the job store at 'notadb://nowhere'")


def test_report_of_an_unknown_run_is_one_line(retort_home: Path) -> None:
    result = run("report", "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no job with id or name 'nope'")


def test_rubric_validate(tmp_path: Path) -> None:
    assert run("rubric", "validate", str(REPO / "configs/rubrics/instruct.yaml")).exit_code == 0
    bad = tmp_path / "r.yaml"
    bad.write_text("kind: rubric\nname: r\nversion: 1\ncriteria:\n  - id: a\n    kind: judge\n    weight: -1\n")
    result = run("rubric", "validate", str(bad))
    assert result.exit_code == 1
    assert f"{bad}:5:5: criteria[0].description: required key is missing" in result.stderr
    assert f"{bad}:7:5: criteria[0].weight: Input should be greater than or equal to 0 (found: -1)" in result.stderr


def _all_commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):  # a sub-group such as `retort rollout`
            yield from _all_commands(command, (*prefix, name))


def test_every_command_has_help() -> None:
    root = typer.main.get_command(app)
    commands = list(_all_commands(root))
    assert {("validate",), ("submit",), ("status",), ("base", "init"), ("rollout", "resume")} <= set(commands)
    for command in commands:
        result = run(*command, "--help")
        assert result.exit_code == 0, command
        lines = [line.strip() for line in result.stdout.splitlines()]
        usage = next(i for i, line in enumerate(lines) if line.startswith("Usage:"))
        help_line = next(line for line in lines[usage + 1:] if line)
        assert len(help_line) > 15 and not help_line.startswith("╭"), f"{command}: no help text"


def test_pipeline_queues_its_members_and_cancel_takes_them_along(retort_home: Path) -> None:
    result = run("pipeline", str(REPO / "configs/demo/pipeline.yaml"))
    assert result.exit_code == 0, result.output
    assert "queued pipeline 1 (demo): specialist math = job 2, specialist code = job 3, " \
           "specialist instruct = job 4, distillation demo-student = job 5" in result.stdout.replace("\n", " ")
    detail = run("status", "1")
    assert "pipeline demo: members" in detail.stdout
    assert sum("queued" in line for line in detail.stdout.splitlines()) >= 5
    assert "with its 4 member job(s)" in run("cancel", "1").stdout
    from storage import jobs
    from storage.db import open_store

    assert {job.state for job in jobs.list_jobs(open_store())} == {"cancelled"}
    wrong = run("pipeline", str(REPO / "configs/demo/distill.yaml"))
    assert wrong.exit_code == 1 and "`retort pipeline` queues pipeline specs" in wrong.stderr


def test_distill_queue_leaves_it_for_the_controller(retort_home: Path) -> None:
    result = run("distill", str(REPO / "configs/demo/distill.yaml"), "--queue")
    assert result.exit_code == 0 and "queued distillation job 1" in result.stdout
    assert "queued" in run("status").stdout


def test_submit_of_a_pipeline_queues_its_members_too(retort_home: Path) -> None:
    result = run("submit", str(REPO / "configs/demo/pipeline.yaml"))
    assert result.exit_code == 0, result.output
    assert "queued pipeline 1 (demo)" in result.stdout and "distillation demo-student = job 5" in result.stdout


def test_judge_summary_line() -> None:
    from controller.cli.runs import judge_summary

    phases = {"base": {"judge/accuracy": 0.0, "judge/parse_failure_rate": 1.0},
              "sft": {"judge/accuracy": 0.95, "judge/parse_failure_rate": 0.0125}, "grpo": {"judge/responses": 80.0}}
    assert judge_summary("instruct", phases) == (
        "judge instruct: base accuracy 0.000 (parse failures 100%), sft accuracy 0.950 (parse failures 1%)")
