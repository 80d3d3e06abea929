"""`retort rubric`: check GRM rubrics written in YAML, and preview the judge prompt and verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from controller.cli.console import fail, out, quiet_libraries, report_problems
from storage.specfile import SpecError, load_spec

app = typer.Typer(help="Check and preview GRM rubrics written in YAML.", no_args_is_help=True)


@app.command("validate")
def rubric_validate(files: Annotated[list[Path], typer.Argument(help="Rubric YAML files.")]) -> None:
    """Check rubric files; exit 1 listing every problem with file:line:field."""
    from grm.rubric import Rubric

    bad = 0
    for file in files:
        try:
            rubric = load_spec(Rubric, file)
        except SpecError as exc:
            report_problems(exc)
            bad += 1
            continue
        out.print(f"[green]✓[/] {file}: rubric {rubric.name!r} v{rubric.version}, "
                  f"{len(rubric.criteria)} criteria", highlight=False)
    if bad:
        raise typer.Exit(1)


def _print_block(title: str, text: str) -> None:
    """A titled rule and the text exactly as it is (no wrapping, no markup)."""
    out.rule(escape(title))
    out.print(text, markup=False, highlight=False, emoji=False)


@app.command("preview")
def rubric_preview(
    file: Annotated[Path, typer.Argument(help="A rubric YAML file.")],
    prompt: Annotated[str, typer.Option(help="The prompt the response answers.")],
    response: Annotated[str, typer.Option(help="The response to judge.")],
    model: Annotated[str | None, typer.Option(help="Judge model (checkpoint); without it, only the prompt.")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Judgments to sample and aggregate.")] = 1,
    engine: Annotated[str, typer.Option(help="vllm or hf.")] = "vllm",
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest judgment in tokens.")] = 256,
    column: Annotated[list[str] | None, typer.Option(help="A dataset column for matches_field criteria, "
                                                     "as NAME=VALUE (repeatable).")] = None,
) -> None:
    """Print the exact judge prompt a rubric renders and, with --model, the judge's verdict and score."""
    from grm.prompt import judge_criteria
    from grm.reward import GRMReward
    from grm.rubric import Rubric

    try:
        rubric = load_spec(Rubric, file)
    except SpecError as exc:
        report_problems(exc)
        raise typer.Exit(1) from None
    if engine not in ("vllm", "hf"):
        fail(f"--engine must be vllm or hf, got {engine!r}")
    judge = None
    if model is not None and judge_criteria(rubric):
        quiet_libraries()
        from rollout.engine import EngineError, HFEngine, VLLMEngine

        try:
            judge = VLLMEngine(model) if engine == "vllm" else HFEngine(model)
        except EngineError as exc:
            fail(str(exc))
    reward = GRMReward(rubric, judge, samples=samples, max_tokens=max_tokens) if (
        judge is not None or not judge_criteria(rubric)) else None
    if reward is None:
        from grm.prompt import render

        _print_block("judge prompt", render(rubric, prompt, response))
        out.print("(give --model to run the judge)")
        return
    from grm.checks import MissingField
    from rollout.engine import EngineError

    bad = [c for c in column or [] if "=" not in c]
    if bad:
        fail(f"--column takes NAME=VALUE, got {bad[0]!r}")
    row = dict(c.split("=", 1) for c in column or [])
    try:
        text, judgment = reward.preview(prompt, response, row)
    except EngineError as exc:
        fail(f"the judge cannot take this prompt: {exc}")
    except MissingField as exc:
        fail(f"{exc} (pass it with --column NAME=VALUE)")
    _print_block("judge prompt", text)
    for i, (raw, verdict) in enumerate(zip(judgment.outputs, judgment.verdicts, strict=True)):
        _print_block(f"judgment {i + 1}: {verdict.scores or verdict.error}", raw)
    table = Table(title=f"rubric {rubric.name} v{rubric.version}")
    for column in ("criterion", "kind", "weight", "score"):
        table.add_column(column)
    for criterion in rubric.criteria:
        value = (judgment.judge_scores or {}).get(criterion.id, judgment.check_scores.get(criterion.id))
        table.add_row(criterion.id, criterion.kind, f"{criterion.weight:g}", "-" if value is None else f"{value:g}")
    out.print(table)
    score = "parse failure (no judgment could be read)" if judgment.parse_failed else f"{judgment.score:.3f}"
    out.print(f"score: {score}", highlight=False)



@app.command("judging-data")
def rubric_judging_data(
    file: Annotated[Path, typer.Argument(help="A rubric YAML file.")],
    data: Annotated[Path, typer.Argument(help="Responses to judge, JSONL or Parquet: a prompt and a response "
                                        "column, plus any reference or label:<criterion> columns.")],
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the judging examples (JSONL).")],
    prompt_field: Annotated[str, typer.Option(help="The column holding the prompt.")] = "prompt",
    response_field: Annotated[str, typer.Option(help="The column holding the response to judge.")] = "response",
    seed: Annotated[int, typer.Option(help="Seeds each example's fence nonce.")] = 0,
) -> None:
    """Write what a judge should say about each response: the judge prompt the GRM renders and the verdict
    its truth gives ({"prompt", "completion", "truth"} rows: SFT data for a judge)."""
    import json

    from grm.checks import MissingField
    from grm.judging import NoTruth, judging_example
    from grm.prompt import judge_criteria
    from grm.rubric import Rubric
    from storage.tables import load_table

    try:
        rubric = load_spec(Rubric, file)
    except SpecError as exc:
        report_problems(exc)
        raise typer.Exit(1) from None
    if not judge_criteria(rubric):
        fail(f"{file}: rubric {rubric.name!r} has no judge criteria: there is nothing for a judge to learn")
    try:
        rows = load_table(str(data), [prompt_field, response_field])
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out_file.open("w") as f:
        for line, row in enumerate(rows, start=1):
            try:
                example = judging_example(rubric, str(row[prompt_field]), str(row[response_field]), row, seed)
            except (NoTruth, MissingField) as exc:
                fail(f"{data}:{line}: {exc}")
            f.write(json.dumps({"prompt": example.prompt, "completion": example.completion,
                                "truth": example.truth}) + "\n")
            written += 1
    out.print(f"wrote {written} judging examples for rubric {rubric.name!r} v{rubric.version} to {out_file}",
              highlight=False)
