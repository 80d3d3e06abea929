"""Rubrics authored in YAML: what a good answer looks like, criterion by criterion.

A rubric has a name, a version, a score scale and weighted criteria. A `judge`
criterion is scored by the generative reward model against its description; the
programmatic kinds (regex, contains, max_length, json_valid, matches_field, ifeval)
are checked without a model. A response's score is Σ w·score / Σ w over the criteria, in [0, 1].

Check one with ``retort rubric validate FILE``; examples are in ``configs/rubrics/``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from storage.specfile import FieldErrors, Name, StrictModel


class Scale(StrictModel):
    """The range the judge scores each criterion on; scores are rescaled to [0, 1]."""

    min: int = Field(0, description="Lowest score the judge may give.")
    max: int = Field(10, description="Highest score the judge may give.")

    @model_validator(mode="after")
    def _ordered(self) -> Scale:
        if self.max <= self.min:
            raise ValueError(f"scale.max ({self.max}) must be greater than scale.min ({self.min})")
        return self


class _Criterion(StrictModel):
    id: Name = Field(description="Short unique id of the criterion, used in verdicts and metrics.")
    description: str = Field(min_length=1, description="What the criterion asks of a response, in plain words.")
    weight: float = Field(1.0, ge=0, description="Weight of this criterion in the rubric's score; 0 checks it "
                          "without scoring it (e.g. the truth of a judge criterion, measured but not rewarded).")


class JudgeCriterion(_Criterion):
    """Scored by the judge model on the rubric's scale."""

    kind: Literal["judge"] = "judge"
    truth: Name | None = Field(None, description="The id of a programmatic criterion of this rubric that says what "
                               "a right verdict is (its pass is the scale's top, its fail the bottom): judging data "
                               "and judge accuracy come from it (`retort rubric judging-data`).")


class RegexCriterion(_Criterion):
    """Full score when the response matches (or, with must_match false, does not match) the pattern."""

    kind: Literal["regex"]
    pattern: str = Field(description="A Python regular expression, searched anywhere in the response.")
    ignore_case: bool = Field(False, description="Match without regard to case.")
    must_match: bool = Field(True, description="False turns the check around: the pattern must not occur.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


class ContainsCriterion(_Criterion):
    """Full score when the response contains the text."""

    kind: Literal["contains"]
    text: str = Field(min_length=1, description="Text the response must contain.")
    case_sensitive: bool = Field(True, description="Compare case-sensitively.")


class MaxLengthCriterion(_Criterion):
    """Full score when the response is at most this many characters long."""

    kind: Literal["max_length"]
    max_chars: int = Field(gt=0, description="Longest allowed response, in characters.")


class JsonValidCriterion(_Criterion):
    """Full score when the response (stripped) parses as JSON."""

    kind: Literal["json_valid"]


class MatchesFieldCriterion(_Criterion):
    """Full score when the response equals the row's reference in `field` (e.g. the dataset's `answer`)."""

    kind: Literal["matches_field"]
    field: str = Field(min_length=1, description="The dataset column holding the reference response.")
    ignore_case: bool = Field(False, description="Compare without regard to case.")


class IfevalCriterion(_Criterion):
    """Full score when the response follows one of IFEval's verifiable instructions, checked by IFEval's code."""

    kind: Literal["ifeval"]
    instruction: str = Field(description="IFEval instruction id, e.g. 'punctuation:no_comma', "
                             "'startend:end_checker', 'length_constraints:number_words'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="The instruction's arguments in IFEval's "
                                   "format, e.g. {end_phrase: 'Any questions?'} or {num_words: 50, relation: "
                                   "'less than'}.")
    mode: Literal["strict", "loose"] = Field("strict", description="strict checks the response as written; loose "
                                             "also accepts it without its first or last line or markdown '*'.")

    @field_validator("instruction")
    @classmethod
    def _known(cls, instruction: str) -> str:
        from rewards.ifeval import unknown_instruction

        problem = unknown_instruction(instruction)
        if problem:
            raise ValueError(problem)
        return instruction


Criterion = Annotated[
    JudgeCriterion | RegexCriterion | ContainsCriterion | MaxLengthCriterion | JsonValidCriterion
    | MatchesFieldCriterion | IfevalCriterion,
    Field(discriminator="kind"),
]


class Rubric(StrictModel):
    """A named, versioned set of weighted criteria."""

    kind: Literal["rubric"] = Field("rubric", description="Always 'rubric' for this kind of file.")
    name: Name = Field(description="Rubric name, referred to by rewards.")
    version: str | int = Field(description="Version; bump it when the criteria change (it keys cached judgments).")
    description: str = Field("", description="What the rubric is for, shown to the judge as context.")
    scale: Scale = Field(default_factory=Scale, description="Score range for judge criteria.")
    judge_prompt: Literal["full", "compact"] = Field(
        "full", description="full: the judge prompt explains the task and asks for brief reasoning before the "
        "verdict lines (for capable judge models); compact: the criteria, the fenced prompt and response, and "
        "the verdict lines straight after (a few hundred characters: for small models that learn judging in SFT).")
    criteria: list[Criterion] = Field(min_length=1, description="The criteria; ids must be unique.")

    @model_validator(mode="after")
    def _unique_ids(self) -> Rubric:
        ids = [c.id for c in self.criteria]
        problems = [(("criteria", i, "id"), f"criterion id {cid!r} is already used by criteria[{ids.index(cid)}]; "
                     "ids must be unique") for i, cid in enumerate(ids) if cid in ids[:i]]
        checked = [c.id for c in self.criteria if not isinstance(c, JudgeCriterion)]
        problems += [(("criteria", i, "truth"), f"truth {c.truth!r} is not a programmatic criterion of this rubric "
                      f"(those are: {', '.join(checked) or 'none'})")
                     for i, c in enumerate(self.criteria)
                     if isinstance(c, JudgeCriterion) and c.truth is not None and c.truth not in checked]
        if not any(c.weight > 0 for c in self.criteria):
            problems.append((("criteria",), "every criterion has weight 0: give at least one a positive weight"))
        if problems:
            raise FieldErrors(problems)
        return self
