"""The agent's tools, registered by name as rewards are, and the environment that runs a batch's calls.

    tools:                      # in a job spec (ToolRef), checked like `rewards`
      - name: python            # runs the call's body in the code sandbox, with its limits
        args: {timeout_s: 2.0}
      - name: calculator        # arithmetic only: nothing is executed

`ToolBox` is rollout.agent's `Environment`: it answers malformed calls and unknown tools with an error result
(a turn the reward sees), and runs the rest concurrently, at most `max_concurrency` at a time. A tool never
raises for what a call contains: a hostile program is contained by the sandbox and comes back as a failed call.
"""

from __future__ import annotations

import ast
import operator
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from pydantic import Field, model_validator

from rewards import sandbox
from rewards.registry import argument_problems
from rollout.agent import ToolCall, ToolResult
from storage.specfile import FieldErrors, Name, StrictModel

Tool = Callable[[str], ToolResult]

_STATUS = {"passed": "ok", "failed": "error", "crash": "error", "timeout": "timeout", "memory": "limit",
           "output_limit": "limit"}


def python_tool(timeout_s: float = 2.0, memory_mb: int = 256, max_processes: int = 16,
                max_output_chars: int = 2000) -> Tool:
    """Run the call's body as a Python program in the sandbox (no network, its own directory and processes);
    the result is what it printed, or its error's last lines."""
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_processes": max_processes}

    def run(body: str) -> ToolResult:
        result = sandbox.run(body, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                             max_output_bytes=4 * max_output_chars)
        output = result.stdout if result.ok else (result.stdout + result.stderr)
        if result.status == "timeout":
            output = f"no result within {timeout_s:g} s"
        return ToolResult(output[-max_output_chars:].strip(), _STATUS[result.status], result.exit_code,
                          round(result.duration_s, 4), {**limits, "isolation": result.isolation})

    return run


_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
    ast.UAdd: operator.pos}


def calculator_tool(max_digits: int = 1000, max_exponent: int = 100) -> Tool:
    """Evaluate one arithmetic expression (+ - * / // % **, parentheses, integers and decimals) without
    executing anything: the tool an agent needs when it may not run code."""

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > max_exponent:
                raise ValueError(f"exponent {right} is above {max_exponent}")
            out = _OPERATORS[type(node.op)](left, right)
            if isinstance(out, int) and len(str(abs(out))) > max_digits:
                raise ValueError(f"a result of more than {max_digits} digits")
            return out
        raise ValueError(f"not arithmetic: {ast.unparse(node)[:40]!r}")

    def run(body: str) -> ToolResult:
        start = time.monotonic()
        try:
            out = value(ast.parse(body.strip(), mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as exc:
            return ToolResult(f"{type(exc).__name__}: {exc}", "error", duration_s=time.monotonic() - start)
        text = str(int(out)) if isinstance(out, float) and out.is_integer() and abs(out) < 1e15 else str(out)
        return ToolResult(text, "ok", duration_s=round(time.monotonic() - start, 6))

    return run


TOOLS: dict[str, Callable[..., Tool]] = {"python": python_tool, "calculator": calculator_tool}


class ToolRef(StrictModel):
    """One tool an agent may call, by registry name, with the tool's own arguments (its limits)."""

    name: Name = Field(description="Registry name of the tool: 'python' (sandboxed) or 'calculator'.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the tool (its limits).")

    @model_validator(mode="after")
    def _known_tool(self) -> ToolRef:
        if self.name not in TOOLS:
            raise FieldErrors([(("name",), f"unknown tool {self.name!r}; known tools: {', '.join(sorted(TOOLS))}")])
        if problems := argument_problems("tool", self.name, TOOLS[self.name], self.args):
            raise FieldErrors(problems)
        return self


class AgentSettings(StrictModel):
    """An agent's trajectories: its turns and how many of a batch's tool calls run at once."""

    max_turns: int = Field(4, ge=1, description="Model turns per trajectory (each may end with one tool call).")
    max_concurrency: int = Field(4, ge=1, description="Tool calls of one batch that run at the same time.")


class ToolBox:
    """The tools of one agent job, as an Environment: each call answered in order, the valid ones concurrently."""

    def __init__(self, refs: Sequence[ToolRef], max_concurrency: int = 4) -> None:
        self.tools = {ref.name: TOOLS[ref.name](**ref.args) for ref in refs}
        self.max_concurrency = max_concurrency

    def answer(self, call: ToolCall) -> ToolResult:
        if call.malformed:
            return ToolResult(call.error or "malformed tool call", "malformed")
        if call.name not in self.tools:
            return ToolResult(f"no tool {call.name!r}; the tools are: {', '.join(sorted(self.tools))}",
                              "unknown_tool")
        return self.tools[call.name](call.body)

    def run(self, calls: list[ToolCall],
            on_result: Callable[[int, ToolResult], None] | None = None) -> list[ToolResult]:
        results: list[ToolResult | None] = [None] * len(calls)

        def done(i: int, result: ToolResult) -> None:
            results[i] = result
            if on_result is not None:
                on_result(i, result)

        if len(calls) <= 1 or self.max_concurrency <= 1:
            for i, call in enumerate(calls):
                done(i, self.answer(call))
            return results  # type: ignore[return-value]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(calls))) as pool:
            futures = {pool.submit(self.answer, call): i for i, call in enumerate(calls)}
            for future in as_completed(futures):  # each answer reported as it comes, in this thread
                done(futures[future], future.result())
        return results  # type: ignore[return-value]
