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

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

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
    """Runs the calls of one batch of trajectories; results in call order. Never raises for a call's content.

    `on_result(i, result)` is told of each call as soon as it is answered (in the caller's thread), so the
    trajectory log makes every finished call durable even while the batch's other calls still run."""

    def run(self, calls: list[ToolCall],
            on_result: Callable[[int, ToolResult], None] | None = None) -> list[ToolResult]: ...


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


class TrajectoryLog:
    """The durable record of every tool call of a run: one JSON line per call and its result, flushed and
    fsynced before the result is given to the model. A trajectory resumed after a kill replays the calls it
    finds here instead of running them again (a torn last line, from a kill mid-write, is dropped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._results: dict[tuple[str, int], ToolResult] = {}
        self.records: list[dict] = []
        if self.path.exists():
            data = self.path.read_bytes()
            for record in self._parse(data):
                self._keep(record)
            if data and not data.endswith(b"\n"):  # a kill mid-write: the torn line was never committed
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._file = self.path.open("ab")
        self.executed = 0  # calls run (not replayed) and logged in this process

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """The committed records of a log (every line up to the last newline), without changing the file."""
        return TrajectoryLog._parse(Path(path).read_bytes())

    @staticmethod
    def _parse(data: bytes) -> list[dict]:
        records = []
        for number, line in enumerate(data.split(b"\n")[:-1], 1):
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number} is not JSON ({exc})") from None
            missing = {"trajectory", "turn", "call", "result"} - set(record if isinstance(record, dict) else {})
            if missing:
                raise ValueError(f"line {number} is not a trajectory log record (no {', '.join(sorted(missing))})")
            records.append(record)
        return records

    def _keep(self, record: dict) -> None:
        self.records.append(record)
        self._results[(record["trajectory"], record["turn"])] = ToolResult(**record["result"])

    def replay(self, trajectory: str, turn: int) -> ToolResult | None:
        return self._results.get((trajectory, turn))

    def append(self, trajectory: str, turn: int, call: ToolCall, result: ToolResult, text: str = "") -> None:
        """Log a call that ran (`text`: the model's turn that made it), durable before anyone reads `result`."""
        record = {"trajectory": trajectory, "turn": turn, "text": text, "call": asdict(call),
                  "result": asdict(result), "time": time.time()}
        self._file.write(json.dumps(record).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._keep(record)
        self.executed += 1

    def trajectory(self, trajectory: str) -> list[dict]:
        return [r for r in self.records if r["trajectory"] == trajectory]

    def close(self) -> None:
        self._file.close()


@dataclass
class Trajectory:
    """A multi-turn rollout: everything after the prompt, the model's tokens told apart from the context the
    tools gave it (`model_mask` False: never trained on, never scored by a teacher)."""

    id: str
    prompt_ids: tuple[int, ...]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # 0.0 for tool-result tokens
    model_mask: list[bool] = field(default_factory=list)
    calls: list[tuple[ToolCall, ToolResult]] = field(default_factory=list)
    answer: str = ""  # the text of the last model turn
    turns: int = 0
    finish_reason: str | None = None  # "answer", "max_turns" or "length"
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def malformed_calls(self) -> int:
        return sum(call.malformed for call, _ in self.calls)


@dataclass(frozen=True)
class AgentRequest:
    id: str
    prompt: str
    seed: int | None = None


def first_turn_requests(tokenizer: Any, requests: Sequence[AgentRequest], *, max_tokens: int = 256,
                        turn_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0) -> list[Any]:
    """The generation requests of every trajectory's first turn, exactly as `run_agent` makes them: a caller
    can generate them in the same engine batch as other work (one pass over the decode steps instead of two)
    and hand the results to `run_agent(first_turn=...)`, keyed by these requests' ids."""
    return _turn_requests(_start(tokenizer, requests), {r.id: r.seed for r in requests}, 0, max_tokens=max_tokens,
                          turn_tokens=turn_tokens, temperature=temperature, top_p=top_p)


def _start(tokenizer: Any, requests: Sequence[AgentRequest]) -> list[Trajectory]:
    from rollout.engine import encode_prompt

    return [Trajectory(r.id, encode_prompt(tokenizer, r.prompt), messages=[{"role": "user", "content": r.prompt}])
            for r in requests]


def _turn_requests(active: Sequence[Trajectory], seeds: dict[str, int | None], turn: int, *, max_tokens: int,
                   turn_tokens: int, temperature: float, top_p: float) -> list[Any]:
    """Turn `turn` of each active trajectory: its context so far, the turn's budget, the seed plus the turn."""
    from rollout.engine import GenerationRequest

    return [GenerationRequest(f"{t.id}/{turn}", (*t.prompt_ids, *t.token_ids), max_tokens=min(
        turn_tokens, max_tokens - len(t.token_ids)), temperature=temperature, top_p=top_p,
        seed=None if seeds[t.id] is None else seeds[t.id] + turn) for t in active]


def run_agent(engine: Any, tokenizer: Any, requests: Sequence[AgentRequest], environment: Environment,
              log: TrajectoryLog, *, max_turns: int = 4, max_tokens: int = 256, turn_tokens: int = 64,
              temperature: float = 1.0, top_p: float = 1.0, batch: str | None = None,
              first_turn: dict[str, tuple[list[int], list[float], str | None]] | None = None) -> list[Trajectory]:
    """Generate until a tool call or the end, run the batch's calls, give back their results, continue; up to
    `max_turns` model turns and `max_tokens` after the prompt (tool results count). Each turn samples with the
    request's seed plus the turn number, so a re-run is the same trajectory and replays its logged calls.

    `engine` is an Engine, or a RolloutService with `batch` named: then turn k of the batch is the service's
    batch `{batch}.turn{k}`, every model token goes through its WAL, and a run killed anywhere resumes by calling
    this again with the same arguments: finished turns are read back, an interrupted one continues from its
    committed tokens, and logged calls are replayed, not run again.

    `first_turn` (id of a `first_turn_requests` request → its tokens, logprobs and finish reason) is turn 0
    generated elsewhere: then only the later turns are generated here."""
    if (batch is None) != (getattr(engine, "run_or_resume", None) is None):
        raise ValueError("a RolloutService generates a named batch (batch=...); an Engine takes no batch name")

    trajectories = _start(tokenizer, requests)
    seeds = {r.id: r.seed for r in requests}
    for turn in range(max_turns):
        active = [t for t in trajectories if t.finish_reason is None]
        if not active:
            break
        reqs = _turn_requests(active, seeds, turn, max_tokens=max_tokens, turn_tokens=turn_tokens,
                              temperature=temperature, top_p=top_p)
        if turn == 0 and first_turn is not None:
            produced = {r.id: list(first_turn[r.id][0]) for r in reqs}
            logprobs = {r.id: list(first_turn[r.id][1]) for r in reqs}
            finish = {r.id: first_turn[r.id][2] for r in reqs}
        else:
            produced, logprobs, finish = _generate_turn(engine, reqs, None if batch is None else f"{batch}.turn{turn}")
        pending: list[tuple[Trajectory, ToolCall, str]] = []
        for t, req in zip(active, reqs, strict=True):
            ids = produced[req.id]
            t.token_ids += ids
            t.logprobs += logprobs[req.id]
            t.model_mask += [True] * len(ids)
            t.turns += 1
            t.answer = tokenizer.decode(ids, skip_special_tokens=True)
            parsed = parse_turn(t.answer)
            if finish.get(req.id) != "stop":  # cut off mid-turn: no budget left for a call and its answer
                t.finish_reason = "length"
            elif parsed.call is None:
                t.finish_reason = "answer"
            else:
                pending.append((t, parsed.call, tokenizer.decode(ids, skip_special_tokens=False)))
        if not pending:
            continue
        results = _answer_calls(environment, log, turn, [(t, call) for t, call, _ in pending],
                                "" if batch is None else f"{batch}/")
        for (t, call, generated), result in zip(pending, results, strict=True):
            t.calls.append((call, result))
            context = _tool_turn_ids(tokenizer, t.messages, t.answer, generated, tool_message(result))
            t.messages += [{"role": "assistant", "content": t.answer}, tool_message(result)]
            t.token_ids += context
            t.logprobs += [0.0] * len(context)
            t.model_mask += [False] * len(context)
            if len(t.token_ids) >= max_tokens:
                t.finish_reason = "length"
            elif turn == max_turns - 1:
                t.finish_reason = "max_turns"
    return trajectories


def _answer_calls(environment: Environment, log: TrajectoryLog, turn: int,
                  calls: list[tuple[Trajectory, ToolCall]], prefix: str) -> list[ToolResult]:
    """The results of one turn's calls: replayed from the log where it has them, else run (concurrently) and
    logged one by one as each is answered, durable before the model sees it. A service batch's trajectories are
    logged as `{batch}/{id}` (`prefix`): one log holds many batches, whose ids repeat."""
    results = [log.replay(prefix + t.id, turn) for t, _ in calls]
    todo = [i for i, result in enumerate(results) if result is None]

    def answered(k: int, result: ToolResult) -> None:
        t, call = calls[todo[k]]
        log.append(prefix + t.id, turn, call, result, text=t.answer)
        results[todo[k]] = result

    environment.run([calls[i][1] for i in todo], on_result=answered)
    return results  # type: ignore[return-value]


def _generate_turn(source: Any, requests: list[Any], batch: str | None
                   ) -> tuple[dict[str, list[int]], dict[str, list[float]], dict[str, str | None]]:
    """One model turn of every active trajectory: each one's tokens, logprobs and finish reason, from an engine
    directly or through the rollout service's WAL (`batch`: stored if done, continued if interrupted)."""
    if batch is None:
        from rollout.engine import generate_whole

        whole = generate_whole(source, requests).values()
        return ({c.id: c.token_ids for c in whole}, {c.id: c.logprobs for c in whole},
                {c.id: c.finish_reason for c in whole})
    from rollout.service import RolloutRequest

    produced: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    finish: dict[str, str | None] = {}
    for r in source.run_or_resume(batch, [RolloutRequest(r.id, tuple(r.prompt_ids), r.max_tokens, r.temperature,
                                                         r.top_p, r.seed) for r in requests]):
        produced[r.id], logprobs[r.id], finish[r.id] = list(r.completion_ids), list(r.logprobs), r.finish_reason
    return produced, logprobs, finish


def _tool_turn_ids(tokenizer: Any, messages: list[dict[str, str]], answer: str, generated: str,
                   tool: dict[str, str]) -> list[int]:
    """The tokens the chat template puts between the model's turn (as generated, its end token included)
    and the next model turn: whatever closes the turn, the tool turn, and the next generation prompt.

    A turn the template does not render back as generated (a special token such as `<|user|>` inside it, which
    decoding drops: an untrained student writes such turns) keeps its generated tokens; what follows it is then
    read around a placeholder answer, so the trajectory goes on instead of failing."""
    before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    after = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}, tool],
                                          tokenize=False, add_generation_prompt=True)
    if after.startswith(before + generated):
        rest = after[len(before) + len(generated):]
    else:
        framed = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": _PLACEHOLDER}, tool],
                                               tokenize=False, add_generation_prompt=True)
        rest = framed[framed.index(_PLACEHOLDER) + len(_PLACEHOLDER):]
        closing = tokenizer.eos_token or ""
        if closing and generated.endswith(closing) and rest.startswith(closing):
            rest = rest[len(closing):]  # the model wrote the turn's end itself
    return tokenizer(rest, add_special_tokens=False)["input_ids"]


_PLACEHOLDER = "retort-model-turn-placeholder"


def reference_trajectory(tokenizer: Any, prompt: str, turns: list[dict[str, str]]
                         ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """A demonstration (the assistant and tool turns after the prompt) as a trajectory: the prompt's ids, the rest
    as the chat template renders it, and which of those are the assistant's (the template's generation markers,
    as SFT's assistant-only loss reads them); tool turns are context."""
    from rollout.engine import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, *turns], tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    if tuple(ids[:len(prompt_ids)]) != prompt_ids:
        raise ValueError("the chat template renders the prompt differently before and inside a conversation")
    if not any(mask[len(prompt_ids):]):
        raise ValueError("the chat template marks no assistant tokens ({% generation %} … {% endgeneration %}), so "
                         "a demonstration's own tokens cannot be told from its tool results")
    return prompt_ids, tuple(ids[len(prompt_ids):]), tuple(bool(m) for m in mask[len(prompt_ids):])


def check_turn_budget(tokenizer: Any, demonstrations: Sequence[Any], turn_tokens: int, *, source: str,
                      setting: str) -> None:
    """Refuse a per-turn budget shorter than the demonstrations' longest model turn (its end token counted): every
    such turn would be cut off before its call closes, and the agent would score nothing for a reason no metric
    shows. `demonstrations` are the rows' turn lists (anything else is skipped), `source` names their file."""
    longest, where = 0, 0
    for i, turns in enumerate(demonstrations):
        for turn in turns if isinstance(turns, list) else ():
            if isinstance(turn, dict) and turn.get("role") == "assistant":
                n = len(tokenizer(str(turn.get("content", "")), add_special_tokens=False)["input_ids"]) + 1
                longest, where = max((longest, where), (n, i + 1))
    if longest > turn_tokens:
        raise ValueError(f"{source}: {setting} is {turn_tokens} tokens a turn, but the demonstrations' longest model "
                         f"turn takes {longest} (row {where}, its end token included), so such turns would be cut "
                         f"off before their call closes; give {setting} at least {longest}")


def describe(records: list[dict]) -> list[str]:
    """A trajectory's logged turns as lines to read: what the model wrote, the call, what the tool answered."""
    lines = []
    for r in sorted(records, key=lambda r: r["turn"]):
        call, result = r["call"], r["result"]
        lines.append(f"turn {r['turn']}: model: {r.get('text', '')!r}")
        lines.append(f"  call {call['name']!r}: {call['body']!r}" + (f" (malformed: {call['error']})"
                                                                     if call.get("error") else ""))
        limits = ", ".join(f"{k} {v}" for k, v in result.get("limits", {}).items())
        lines.append(f"  result [{result['status']}] exit {result['exit_code']}, {result['duration_s']:.3f} s"
                     + (f", limits: {limits}" if limits else "") + f": {result['output']!r}")
    return lines
