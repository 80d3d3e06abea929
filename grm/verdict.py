"""Reading the judge's verdict, aggregating k judgments, and combining criteria into one score.

Pure functions, tested against hand-written judge outputs (well-formed, malformed,
adversarial). A judgment that does not score every judge criterion within the scale
is a parse failure: it is reported as such, never turned into a score.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from grm.prompt import judge_criteria
from grm.rubric import Rubric

NUMBER = r"(-?\d+(?:\.\d+)?)(?:\s*/\s*\d+(?:\.\d+)?)?"


@dataclass(frozen=True)
class Verdict:
    """One judgment: a raw score per judge criterion, or why it could not be read."""

    scores: dict[str, float] | None
    error: str | None = None


def parse_verdict(text: str, rubric: Rubric) -> Verdict:
    """Read ``criterion_id: score`` lines (the last one per criterion wins) from a judge's output.

    Lines starting with "|" are quoted material (see `grm.prompt.quote`) and are ignored.
    """
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("|")]
    scores: dict[str, float] = {}
    problems = []
    for criterion in judge_criteria(rubric):
        pattern = re.compile(rf"^\s*[-*]?\s*\**{re.escape(criterion.id)}\**\s*[:=]\s*\**\s*{NUMBER}", re.IGNORECASE)
        found = [m for line in lines if (m := pattern.match(line))]
        if not found:
            problems.append(f"no score for {criterion.id}")
            continue
        value = float(found[-1].group(1))
        if not rubric.scale.min <= value <= rubric.scale.max:
            problems.append(f"{criterion.id} scored {value:g}, outside {rubric.scale.min}..{rubric.scale.max}")
            continue
        scores[criterion.id] = value
    if problems:
        return Verdict(None, "; ".join(problems))
    return Verdict(scores)


def aggregate(verdicts: Sequence[Verdict], how: Literal["mean", "vote"]) -> dict[str, float] | None:
    """Combine k judgments per criterion: their mean, or the most common score (ties: mean of the tied).

    Failed judgments are left out; None when all failed.
    """
    good = [v.scores for v in verdicts if v.scores is not None]
    if not good:
        return None
    out = {}
    for criterion in good[0]:
        values = [g[criterion] for g in good]
        out[criterion] = statistics.fmean(values) if how == "mean" else statistics.fmean(statistics.multimode(values))
    return out


def combine(rubric: Rubric, judge_scores: Mapping[str, float], check_scores: Mapping[str, float]) -> float:
    """Σ w·s / Σ w over all criteria, with judge scores rescaled from the rubric's scale to [0, 1]."""
    lo, hi = rubric.scale.min, rubric.scale.max
    total = weight = 0.0
    for criterion in rubric.criteria:
        if criterion.id in judge_scores:
            score = (judge_scores[criterion.id] - lo) / (hi - lo)
        else:
            score = check_scores[criterion.id]
        total += criterion.weight * score
        weight += criterion.weight
    return total / weight
