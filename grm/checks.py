"""The programmatic rubric criteria: checked by code, never by the judge."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from grm.rubric import (
    ContainsCriterion,
    IfevalCriterion,
    JsonValidCriterion,
    MatchesFieldCriterion,
    MaxLengthCriterion,
    RegexCriterion,
)


class MissingField(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def check(criterion: RegexCriterion | ContainsCriterion | MaxLengthCriterion | JsonValidCriterion
          | MatchesFieldCriterion | IfevalCriterion, response: str, row: Mapping[str, Any] | None = None) -> float:
    """1.0 when the response satisfies the criterion, else 0.0. `row` holds the dataset's columns."""
    if isinstance(criterion, IfevalCriterion):
        from rewards.ifeval import follows

        prompt = str((row or {}).get("prompt", ""))
        return float(follows(response, criterion.instruction, criterion.kwargs, prompt, criterion.mode))
    if isinstance(criterion, MatchesFieldCriterion):
        if row is None or criterion.field not in row:
            have = sorted(row) if row else []
            raise MissingField(f"rubric criterion {criterion.id!r} compares with column {criterion.field!r}, but "
                               f"the rows have {have}; add that column to the dataset")
        expected, got = str(row[criterion.field]).strip(), response.strip()
        if criterion.ignore_case:
            expected, got = expected.lower(), got.lower()
        return float(got == expected)
    if isinstance(criterion, RegexCriterion):
        found = re.search(criterion.pattern, response, re.IGNORECASE if criterion.ignore_case else 0) is not None
        return float(found == criterion.must_match)
    if isinstance(criterion, ContainsCriterion):
        if criterion.case_sensitive:
            return float(criterion.text in response)
        return float(criterion.text.lower() in response.lower())
    if isinstance(criterion, MaxLengthCriterion):
        return float(len(response) <= criterion.max_chars)
    try:
        json.loads(response.strip())
    except ValueError:
        return 0.0
    return 1.0
