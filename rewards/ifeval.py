"""IFEval's (and IFBench's) verifiable instructions, checked by if-verifiable's own checkers.

A row in IFEval's format carries ``instruction_id_list`` (e.g. ``["punctuation:no_comma",
"startend:end_checker"]``) and ``kwargs`` (one dict per instruction, e.g. ``{"end_phrase":
"Any questions?"}``), so users' IFEval-style data works as is. Strict checks the response as
written; loose also accepts it with its first or last line, or markdown asterisks, removed
(IFEval's definition). The reward is 1.0 when every instruction holds (``scoring: all``,
IFEval's prompt-level accuracy) or the share that holds (``fraction``, instruction-level).

The same checks are a rubric's programmatic criterion (``kind: ifeval``, in `grm/`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any, Literal

from rewards.text import column, completion_text

Benchmark = Literal["ifeval", "ifbench"]
Mode = Literal["strict", "loose"]


@functools.cache
def registry(benchmark: Benchmark = "ifeval") -> dict[str, type]:
    """Instruction id → if-verifiable's checker class."""
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples at random: the same response gets the same language
    if benchmark == "ifeval":
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    else:
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
    return dict(INSTRUCTION_DICT)


def unknown_instruction(instruction_id: str, benchmark: Benchmark = "ifeval") -> str | None:
    """A message naming the closest ids when `instruction_id` is not one of the benchmark's, else None."""
    import difflib

    known = registry(benchmark)
    if instruction_id in known:
        return None
    close = difflib.get_close_matches(instruction_id, list(known), n=3, cutoff=0.5)
    return (f"{benchmark} has no instruction {instruction_id!r}"
            + (f"; closest: {', '.join(close)}" if close else f"; known: {', '.join(sorted(known))}"))


def _checker(instruction_id: str, kwargs: dict[str, Any], prompt: str, benchmark: Benchmark) -> Any:
    problem = unknown_instruction(instruction_id, benchmark)
    if problem:
        raise ValueError(problem)
    checker = registry(benchmark)[instruction_id](instruction_id)
    checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    if "prompt" in (checker.get_instruction_args() or {}):
        checker.build_description(prompt=prompt)
    return checker


def _variants(response: str, mode: Mode) -> list[str]:
    from if_verifiable.common import get_loose_transformations

    return [response] if mode == "strict" else get_loose_transformations(response)


def follows(response: str, instruction_id: str, kwargs: dict[str, Any] | None = None, prompt: str = "",
            mode: Mode = "strict", benchmark: Benchmark = "ifeval") -> bool:
    """Whether `response` follows one instruction, by if-verifiable's checker (IFEval's own code)."""
    from if_verifiable.common import strip_thinking

    response = strip_thinking(response)
    checker = _checker(instruction_id, kwargs or {}, prompt, benchmark)
    try:
        return any(v.strip() and checker.check_following(v) for v in _variants(response, mode))
    except LookupError:  # NLTK's sentence splitter loads data that no package installs (a hub download)
        raise RuntimeError(f"instruction {instruction_id!r} counts sentences with NLTK's punkt data, which is not "
                           "installed here (python -m nltk.downloader punkt where a network is reachable)") from None


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        value = json.loads(value)  # datasets may store nested columns as JSON text
    return list(value or [])


def ifeval_reward(mode: Mode = "strict", scoring: Literal["all", "fraction"] = "all",
                  ids_field: str = "instruction_id_list", kwargs_field: str = "kwargs",
                  benchmark: Benchmark = "ifeval"):
    """1.0 when the completion follows every instruction of its row (or, with scoring: fraction, the share it
    follows), judged strict or loose by IFEval's checkers; None for a row without instructions."""

    def ifeval(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        n = len(completions)
        ids = column(columns, ids_field, n, "ifeval")
        all_kwargs = columns.get(kwargs_field) or [None] * n
        scores: list[float | None] = []
        for i, completion in enumerate(completions):
            instruction_ids: Sequence[str] = _as_list(ids[i])
            if not instruction_ids:
                scores.append(None)
                continue
            kwargs = _as_list(all_kwargs[i]) or [{}] * len(instruction_ids)
            prompt = completion_text(prompts[i]) if prompts else ""
            passed = [follows(completion_text(completion), iid, kw or {}, prompt, mode, benchmark)
                      for iid, kw in zip(instruction_ids, kwargs, strict=True)]
            scores.append(float(all(passed)) if scoring == "all" else sum(passed) / len(passed))
        return scores

    return ifeval
