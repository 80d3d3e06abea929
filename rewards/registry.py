"""Rewards by the names YAML uses, and how several combine.

Every reward has TRL's `reward_funcs` call shape, ``(prompts, completions, **columns)
-> list[float | None]``, so the list `build_reward_funcs` returns plugs into TRL's
GRPOTrainer unchanged (with `weights` as GRPOConfig.reward_weights); `build_reward`
gives one weighted-sum function for evaluation and distillation. `None` means
"no verdict for this sample" (TRL ignores it); a weighted sum skips Nones and is
None only when every part is.

The ``grm`` reward (a judge model scoring against a YAML rubric) lives in `grm/`,
which owns rubrics and judges and uses this package's text helpers; it is named here
by its import path and imported on first use, so `rewards` never imports `grm` and
the two packages form no import cycle.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import pydantic

from rewards.code import code_reward
from rewards.formats import exact_match_reward, length_reward, regex_reward
from rewards.math import math_reward
from rewards.spec import RewardRef

RewardFunc = Callable[..., list[float | None]]

REWARDS: dict[str, Callable[..., RewardFunc] | str] = {
    "math": math_reward,
    "code": code_reward,
    "regex": regex_reward,
    "exact_match": exact_match_reward,
    "length": length_reward,
    "reasoning_gym": "rewards.reasoning_gym:reasoning_gym_reward",  # "module:function", imported when first used
    "ifeval": "rewards.ifeval:ifeval_reward",
    "grm": "grm.reward:grm_reward",
}


def factory(name: str) -> Callable[..., RewardFunc]:
    """The function that builds reward `name` from its YAML `args`."""
    entry = REWARDS[name]
    if isinstance(entry, str):
        module, attribute = entry.split(":")
        return getattr(importlib.import_module(module), attribute)
    return entry


def parameters(name: str) -> inspect.Signature:
    """The arguments a reward accepts (its YAML `args`)."""
    return inspect.signature(factory(name))


def check_ref(ref: RewardRef) -> list[tuple[tuple[str, ...], str]]:
    """Problems with a reward reference, as (key path, message): an unknown name, arguments it does not take."""
    if ref.name not in REWARDS:
        return [(("name",), f"unknown reward {ref.name!r}; known rewards: {', '.join(sorted(REWARDS))}")]
    args = dict(ref.args)
    if ref.rubric is not None:
        args["rubric"] = ref.rubric
    return argument_problems("reward", ref.name, factory(ref.name), args, typed=ref.args)


def argument_problems(kind: str, name: str, func: Callable[..., Any], args: dict[str, Any],
                      typed: dict[str, Any] | None = None) -> list[tuple[tuple[str, ...], str]]:
    """Arguments `func` (the factory of reward or tool `name`) does not take, or `typed` ones (default: all)
    of the wrong type or outside a Literal's choices, checked against its annotations."""
    signature = inspect.signature(func)
    try:
        signature.bind_partial(**args)
    except TypeError as exc:
        return [(("args",), f"{kind} {name!r}: {exc}; it accepts: {', '.join(signature.parameters)}")]
    try:
        hints = typing.get_type_hints(func)
    except NameError:  # an annotation naming a type imported only for type checkers: nothing to check against
        return []
    problems = []
    for key, value in (args if typed is None else typed).items():
        if key not in hints:
            continue
        try:
            pydantic.TypeAdapter(hints[key]).validate_python(value, strict=True)
        except pydantic.ValidationError as exc:
            expected = exc.errors()[0]["msg"]
            problems.append((("args", key), f"{kind} {name!r}: {key}={value!r}: {expected}"))
    return problems


def build_one(ref: RewardRef, **context: Any) -> RewardFunc:
    """The reward function of one reference; `context` (e.g. a judge `engine`) goes to rewards that take it."""
    problems = check_ref(ref)
    if problems:
        raise ValueError(problems[0][1])
    args = dict(ref.args)
    if ref.rubric is not None:
        args["rubric"] = ref.rubric
    accepted = parameters(ref.name).parameters
    args.update({k: v for k, v in context.items() if k in accepted and k not in args})
    func = factory(ref.name)(**args)
    func.__name__ = ref.name  # TRL logs each reward under its function's __name__
    return func


def weighted_sum(parts: Sequence[tuple[RewardFunc, float]], name: str = "weighted_sum") -> RewardFunc:
    """Σ weight · reward over the parts that gave a verdict; None when none did."""

    def combined(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        results = [func(prompts, completions, **columns) for func, _ in parts]
        out: list[float | None] = []
        for i in range(len(completions)):
            present = [(r[i], w) for r, (_, w) in zip(results, parts, strict=True) if r[i] is not None]
            out.append(sum(v * w for v, w in present) if present else None)
        return out

    combined.__name__ = name
    return combined


def build_reward_funcs(refs: Sequence[RewardRef], **context: Any) -> tuple[list[RewardFunc], list[float]]:
    """Separate functions and their weights, as TRL's GRPOTrainer(reward_funcs=…) and reward_weights take them."""
    return [build_one(ref, **context) for ref in refs], [ref.weight for ref in refs]


def build_reward(refs: Sequence[RewardRef], **context: Any) -> RewardFunc:
    """One function computing the weighted sum of `refs`."""
    funcs, weights = build_reward_funcs(refs, **context)
    if len(funcs) == 1 and weights[0] == 1.0:
        return funcs[0]
    return weighted_sum(list(zip(funcs, weights, strict=True)))
