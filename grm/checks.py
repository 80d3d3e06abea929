"""The programmatic rubric criteria: checked by code, never by the judge."""

from __future__ import annotations

import json
import re

from grm.rubric import ContainsCriterion, JsonValidCriterion, MaxLengthCriterion, RegexCriterion


def check(criterion: RegexCriterion | ContainsCriterion | MaxLengthCriterion | JsonValidCriterion,
          response: str) -> float:
    """1.0 when the response satisfies the criterion, else 0.0."""
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
