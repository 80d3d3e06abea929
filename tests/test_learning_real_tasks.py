"""Learning on tasks other people wrote: configs/examples/reasoning_gym_pipeline.yaml on the tiny base model.

Two reasoning-gym tasks, each learned by a specialist to at least base + 0.3 on held-out questions (scored by
reasoning-gym's own `score_answer`), and one student distilled from both reaching 0.9 of each teacher.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app

pytestmark = pytest.mark.slow

PIPELINE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "reasoning_gym_pipeline.yaml"


def test_specialists_learn_reasoning_gym_tasks_and_the_student_reaches_them(
        tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, local_ray) -> None:
    home = tmp_path_factory.mktemp("reasoning-gym-home")
    shutil.copytree(tiny_model_dir, home / "demo" / "base")  # the demo's base: `retort base init --seed 0`
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RETORT_HOME", str(home))
        patch.delenv("RETORT_DB_URL", raising=False)
        result = CliRunner().invoke(app, ["run", str(PIPELINE)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads(Path(re.search(r"results: (\S+)", result.stdout).group(1)).read_text())
    print(json.dumps(results, indent=2))  # the README's table comes from this
    for domain in ("spell", "letters"):
        scores = results["domains"][domain]
        assert scores["grpo"] >= scores["base"] + 0.3, (domain, scores)
        assert scores["student"] >= 0.9 * scores["grpo"], (domain, scores)
