"""The agent's tool-call format, parsed strictly from generated text, and the environment that answers calls.

A model turn may end with one call, in DeepSeek-V4's XML style (its body is raw text: nothing to escape, which
is why V4 chose XML over JSON for tool calls):

    The product is large, so I compute it.
    <tool_call name="python">print(4821 * 7713)</tool_call>

The result comes back as a ``tool`` turn of the chat template and the model continues. A turn the parser
cannot accept is not an exception: `parse_turn` returns a `ToolCall` with an `error` (the environment answers
it with that error, and a reward can count it), so a malformed call is a turn like any other. This module knows
no sandbox: the tools are an `Environment` (rewards.tools runs them in the sandbox).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

OPEN, CLOSE = "<tool_call", "</tool_call>"
_OPENING = re.compile(r'<tool_call name="([A-Za-z_][A-Za-z0-9_]*)">')
ToolStatus = Literal["ok", "error", "timeout", "limit", "malformed", "unknown_tool"]


@dataclass(frozen=True)
class ToolCall:
    """One call as the model wrote it: the tool's name and body, or why the turn holds no valid call."""

    name: str | None
    body: str
    error: str | None = None  # set for a malformed call: the turn's text could not be read as one call

    @property
    def malformed(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class ToolResult:
    """What a tool answered, as the trajectory log keeps it."""

    output: str
    status: ToolStatus
    exit_code: int | None = None  # a program's exit status (None: no program ran, or it was killed)
    duration_s: float = 0.0
    limits: dict[str, float] = field(default_factory=dict)  # the limits it ran under (timeout, memory, ...)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Turn:
    """A generated turn: the text before any call, and the call (None: the turn is a final answer)."""

    text: str
    call: ToolCall | None


class Environment(Protocol):
    """Runs the calls of one batch of trajectories; results in call order. Never raises for a call's content."""

    def run(self, calls: list[ToolCall]) -> list[ToolResult]: ...


def parse_turn(text: str) -> Turn:
    """Read one generated turn. No ``<tool_call`` in it: a final answer. Otherwise it must hold exactly one
    well-formed call, at its end (only whitespace after ``</tool_call>``); anything else is a malformed call."""
    start = text.find(OPEN)
    if start < 0:
        if CLOSE in text:
            return Turn(text, ToolCall(None, "", f"{CLOSE} without an opening {OPEN} name=\"...\">"))
        return Turn(text, None)
    before, rest = text[:start], text[start:]
    opening = _OPENING.match(rest)
    if opening is None:
        tag = rest[:rest.find(">") + 1] if ">" in rest else rest[:40]
        return Turn(before, ToolCall(None, "", f'expected <tool_call name="TOOL">, got {tag!r}'))
    end = rest.find(CLOSE, opening.end())
    name = opening.group(1)
    if end < 0:
        return Turn(before, ToolCall(name, rest[opening.end():], f"the call to {name!r} has no {CLOSE}"))
    body, after = rest[opening.end():end], rest[end + len(CLOSE):]
    if OPEN in body:
        return Turn(before, ToolCall(name, body, "a tool call inside a tool call"))
    if after.strip():
        problem = "one tool call per turn" if OPEN in after else f"text after {CLOSE}: {after.strip()[:40]!r}"
        return Turn(before, ToolCall(name, body, problem))
    return Turn(before, ToolCall(name, body))


def render_call(name: str, body: str) -> str:
    """A call as the model should write it (for demonstrations): the inverse of `parse_turn`."""
    if not _OPENING.fullmatch(f'<tool_call name="{name}">') or CLOSE in body:
        raise ValueError(f"cannot write a call to {name!r} whose body holds {CLOSE!r}")
    return f'<tool_call name="{name}">{body}{CLOSE}'


def tool_message(result: ToolResult) -> dict[str, str]:
    """The chat-template message that gives a result back to the model: its output, or the error it met."""
    content = result.output if result.ok else f"[{result.status}] {result.output}".rstrip()
    return {"role": "tool", "content": content}
