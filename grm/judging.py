"""Judging data from rubrics, and how well a judge agrees with the truth.

A judge criterion's truth, for one response, comes from the row when a user labelled it (a column
``label:<criterion id>`` holding a score on the rubric's scale), else from the criterion's `truth`: the id of a
programmatic criterion of the same rubric, whose check (1 or 0) stands for the scale's top or bottom. From
responses with such truths `judging_examples` builds what the GRM should learn: the exact judge prompt
`grm.prompt.render` gives the judge, and the verdict lines `grm.verdict.parse_verdict` reads back. So once a
rubric exists, judging is trained and measured without scoring samples by hand.

`agreement` measures a judge against the same truths: per criterion, the share of verdicts on the truth's side
of the scale's midpoint and the rank correlation of scores (Spearman), and the parse-failure rate; `measure` has
a judge engine judge held-out responses (greedy, one sample) and adds what it cost.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from grm import checks
from grm.prompt import judge_criteria, render
from grm.rubric import Rubric

if TYPE_CHECKING:
    from rollout.engine import Engine

LABEL_PREFIX = "label:"


class NoTruth(ValueError):
    """A judge criterion whose truth neither the row nor the rubric gives."""


def truth(rubric: Rubric, response: str, row: Mapping[str, Any]) -> dict[str, float]:
    """The score a right judge gives `response` on each judge criterion (on the rubric's scale)."""
    by_id = {c.id: c for c in rubric.criteria}
    lo, hi = rubric.scale.min, rubric.scale.max
    scores = {}
    for criterion in judge_criteria(rubric):
        label = row.get(LABEL_PREFIX + criterion.id)
        if label is not None:
            value = float(label)
            if not lo <= value <= hi:
                raise NoTruth(f"{LABEL_PREFIX}{criterion.id} is {value:g}, outside the rubric's scale {lo}..{hi}")
            scores[criterion.id] = value
        elif criterion.truth is not None:
            scores[criterion.id] = lo + (hi - lo) * checks.check(by_id[criterion.truth], response, row)
        else:
            raise NoTruth(f"judge criterion {criterion.id!r} has no truth: give it `truth: <programmatic criterion "
                          f"id>` in the rubric, or label the rows with a {LABEL_PREFIX}{criterion.id} column")
    return scores


def verdict_text(scores: Mapping[str, float]) -> str:
    """The judge's answer as `grm.verdict.parse_verdict` reads it: one ``criterion_id: score`` line each."""
    return "\n".join(f"{cid}: {value:g}" for cid, value in scores.items())


@dataclass(frozen=True)
class JudgingExample:
    prompt: str  # the judge prompt (grm.prompt.render), its fence's nonce fixed by the example's content
    completion: str  # the verdict a right judge gives
    truth: dict[str, float] = field(default_factory=dict)


def judging_example(rubric: Rubric, prompt: str, response: str, row: Mapping[str, Any] | None = None,
                    seed: int = 0) -> JudgingExample:
    scores = truth(rubric, response, row or {})
    nonce = hashlib.sha256(f"{seed}\0{prompt}\0{response}".encode()).hexdigest()[:12]
    return JudgingExample(render(rubric, prompt, response, nonce), verdict_text(scores), scores)


def judging_examples(rubric: Rubric, rows: Iterable[Mapping[str, Any]], *, prompt_field: str = "prompt",
                     response_field: str = "response", seed: int = 0) -> list[JudgingExample]:
    """One example per row with a prompt and a response to judge (and any label or reference columns)."""
    return [judging_example(rubric, str(row[prompt_field]), str(row[response_field]), row, seed) for row in rows]


@dataclass
class JudgeQuality:
    """How a judge's verdicts compare with the truth on held-out responses."""

    responses: int
    parse_failures: int
    accuracy: dict[str, float]  # per criterion: verdicts on the truth's side of the scale's midpoint
    rank_correlation: dict[str, float]  # per criterion: Spearman's rho of judged against true scores (nan: constant)

    @property
    def parse_failure_rate(self) -> float:
        return self.parse_failures / max(self.responses, 1)

    @property
    def mean_accuracy(self) -> float:
        return statistics.fmean(self.accuracy.values()) if self.accuracy else float("nan")

    def metrics(self, prefix: str = "judge") -> dict[str, float]:
        out = {f"{prefix}/accuracy": self.mean_accuracy, f"{prefix}/parse_failure_rate": self.parse_failure_rate}
        out.update({f"{prefix}/accuracy/{cid}": v for cid, v in self.accuracy.items()})
        out.update({f"{prefix}/rank_correlation/{cid}": v for cid, v in self.rank_correlation.items()
                    if not math.isnan(v)})  # undefined (nothing read, or one score throughout): not a number to store
        return out


def agreement(rubric: Rubric, truths: Sequence[Mapping[str, float]],
              judged: Sequence[Mapping[str, float] | None]) -> JudgeQuality:
    """Compare verdicts (None: the judge's output could not be read) with the truths, response by response. A
    failed parse counts as a wrong verdict on every criterion."""
    middle = (rubric.scale.min + rubric.scale.max) / 2
    accuracy, correlation = {}, {}
    for criterion in judge_criteria(rubric):
        pairs = [(t[criterion.id], j[criterion.id] if j else None) for t, j in zip(truths, judged, strict=True)]
        right = sum(j is not None and (j > middle) == (t > middle) for t, j in pairs)
        accuracy[criterion.id] = right / max(len(pairs), 1)
        read = [(t, j) for t, j in pairs if j is not None]
        correlation[criterion.id] = _spearman([t for t, _ in read], [j for _, j in read])
    return JudgeQuality(len(judged), sum(j is None for j in judged), accuracy, correlation)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")  # no ranking to agree with (every score the same)
    return statistics.correlation(_ranks(a), _ranks(b))


def judging_rows(rubric: Rubric, rows: Iterable[Mapping[str, Any]], *, prompt_field: str = "prompt",
                 response_field: str = "response", seed: int = 0) -> list[dict[str, str]]:
    """`judging_examples` as SFT rows ({"prompt": judge prompt, "completion": verdict})."""
    return [{"prompt": e.prompt, "completion": e.completion}
            for e in judging_examples(rubric, rows, prompt_field=prompt_field, response_field=response_field,
                                      seed=seed)]


def measure(engine: Engine, rubric: Rubric, rows: Sequence[Mapping[str, Any]], *, prompt_field: str = "prompt",
            response_field: str = "response", max_tokens: int = 32) -> dict[str, float]:
    """Judge quality on held-out responses as job metrics (judge/*): accuracy and rank correlation against the
    truth, the parse-failure rate, and the cost per judged response (tokens read and written, seconds).

    Greedy and one sample, so a phase's figure depends on its weights alone."""
    from grm.reward import GRMReward

    judge = GRMReward(rubric, engine, samples=1, temperature=0.0, max_tokens=max_tokens)
    truths = [truth(rubric, str(row[response_field]), row) for row in rows]
    judgments = judge.judge([str(r[prompt_field]) for r in rows], [str(r[response_field]) for r in rows],
                            [dict(r) for r in rows])
    quality = agreement(rubric, truths, [j.judge_scores for j in judgments])
    cost = judge.metrics()
    return {**quality.metrics("judge"), "judge/responses": float(len(rows)),
            "judge/tokens_per_response": cost["grm/tokens_per_response"],
            "judge/generated_tokens_per_response": cost["grm/generated_tokens"] / max(len(rows), 1),
            "judge/seconds_per_response": cost["grm/seconds_per_response"]}
