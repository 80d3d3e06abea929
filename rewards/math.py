"""Math answers checked with Hugging Face's math-verify: boxed, plain numbers, fractions, expressions."""

from __future__ import annotations

import threading
from typing import Any

from rewards.text import column, completion_text


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def answers_match(gold: str, answer: str) -> bool:
    """True when `answer` (free text; boxed or last expression) equals the gold answer mathematically."""
    from math_verify import parse, verify

    timeout = _timeout()
    gold_parsed = parse(gold if "$" in gold or "\\" in gold else f"${gold}$", parsing_timeout=timeout)
    if not gold_parsed:
        raise ValueError(f"the gold answer {gold!r} could not be parsed as math")
    answer_parsed = parse(answer, parsing_timeout=timeout)
    return bool(answer_parsed) and verify(gold_parsed, answer_parsed, timeout_seconds=timeout)


def math_reward(answer_field: str = "answer"):
    """1.0 when the completion's final answer equals the gold answer in `answer_field`, else 0.0."""

    def math(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        golds = column(columns, answer_field, len(completions), "math")
        return [None if gold is None else float(answers_match(str(gold), completion_text(c)))
                for c, gold in zip(completions, golds, strict=True)]

    return math
