"""Model-written Python run against test cases in the sandbox; the reward is the share that passed.

Tests come from a dataset column (default ``tests``), one list per prompt, each test either
an assertion string (``"assert add(2, 3) == 5"``, run after the solution's definitions)
or a dict ``{"stdin": ..., "stdout": ...}`` (the solution run as a program, output compared
after stripping). All assertion tests of a completion run in one sandboxed process; each
stdin/stdout test runs in its own.

The harness reports results on a line tagged with a random nonce. A solution runs in the
same process as its assertions, so a deliberately adversarial one could in principle forge
that line by introspecting the harness; the nonce stops accidental or printed look-alikes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards import sandbox
from rewards.text import column, completion_text

FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)

HARNESS = """\
import json as _json, sys as _sys
_solution = {solution}
_tests = {tests}
_namespace = {{"__name__": "__main__"}}
try:
    exec(compile(_solution, "solution.py", "exec"), _namespace)
except BaseException as _error:
    print("{marker}" + _json.dumps({{"error": repr(_error)[:500]}}), flush=True)
    _sys.exit(0)
_passed = []
for _test in _tests:
    try:
        exec(compile(_test, "test.py", "exec"), _namespace)
        _passed.append(True)
    except BaseException:
        _passed.append(False)
print("{marker}" + _json.dumps({{"passed": _passed}}), flush=True)
"""


def extract_code(completion: str) -> str:
    """The last fenced Python block of a completion, or the whole completion when it has none."""
    blocks = FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def score_tests(code: str, tests: Sequence[str | dict], *, timeout_s: float = 2.0,
                memory_mb: int = 256) -> float:
    """The share of `tests` that `code` passes, from 0.0 to 1.0."""
    if not tests:
        raise ValueError("a code prompt needs at least one test")
    asserts = [t for t in tests if isinstance(t, str)]
    io_tests = [t for t in tests if isinstance(t, dict)]
    passed = 0
    if asserts:
        marker = f"@@retort-{secrets.token_hex(8)}@@"
        harness = HARNESS.format(solution=repr(code), tests=repr(asserts), marker=marker)
        result = sandbox.run(harness, timeout_s=timeout_s * len(asserts), memory_mb=memory_mb)
        lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
        if lines and result.status == "passed":
            report = json.loads(lines[-1][len(marker):])
            passed += sum(bool(p) for p in report.get("passed", []))
    for test in io_tests:
        result = sandbox.run(code, stdin=str(test.get("stdin", "")), timeout_s=timeout_s, memory_mb=memory_mb)
        passed += result.status == "passed" and result.stdout.strip() == str(test.get("stdout", "")).strip()
    return passed / len(tests)


def code_reward(tests_field: str = "tests", timeout_s: float = 2.0, memory_mb: int = 256):
    """The share of the prompt's tests (column `tests_field`) that the completion's code passes.

    Identical code against identical tests runs once per call: a GRPO group of 8 samples from a
    fine-tuned model often holds only one or two distinct answers (the demo's code specialist:
    about 12 distinct of 64), and each sandbox run costs a process start. So a program whose result
    is random gets one draw per call, shared by its copies.
    """

    def key(completion: Any, tests: Any) -> tuple[str, str] | None:
        if isinstance(tests, str):
            tests = json.loads(tests)  # datasets may store nested lists as JSON text
        if not tests:
            return None
        return extract_code(completion_text(completion)), json.dumps(tests, sort_keys=True)

    def run(job: tuple[str, str]) -> float:
        code, tests = job
        return score_tests(code, json.loads(tests), timeout_s=timeout_s, memory_mb=memory_mb)

    def code(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        all_tests = column(columns, tests_field, len(completions), "code")
        keys = [key(c, t) for c, t in zip(completions, all_tests, strict=True)]
        distinct = list(dict.fromkeys(k for k in keys if k is not None))
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:  # the sandbox bounds it too
            scores = dict(zip(distinct, pool.map(run, distinct), strict=True))
        return [None if k is None else scores[k] for k in keys]

    return code
