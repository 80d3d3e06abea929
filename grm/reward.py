"""The generative reward model (GRM): a judge model scores responses against a YAML rubric.

For each (prompt, response): the programmatic criteria are checked by code; if the
rubric has judge criteria, the rendered judge prompt (`grm.prompt`) is sampled `samples`
times through a rollout engine, each judgment is parsed (`grm.verdict`), the parsed ones
are aggregated (mean, or vote as DeepSeek's GRM scales at inference), and all criteria
are combined as Σ w·s / Σ w. A response none of whose judgments parse gets
`on_parse_failure` (None, which TRL drops, or 0.0) and is counted in `metrics()`.
Identical (rubric, prompt, response) triples are judged once and then cached.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from grm import checks
from grm.prompt import judge_criteria, reference_fields, render
from grm.rubric import JudgeCriterion, Rubric
from grm.verdict import Verdict, aggregate, combine, parse_verdict
from rewards.text import completion_text
from rollout.engine import Engine, GenerationRequest, encode_prompt, generate_whole
from storage.specfile import load_spec


@dataclass
class Judgment:
    """Everything about one judged response: the score and how it came about."""

    score: float | None
    check_scores: dict[str, float]
    judge_scores: dict[str, float] | None
    verdicts: list[Verdict] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    parse_failed: bool = False


class GRMReward:
    """A TRL-shaped reward (`__call__(prompts, completions, **columns)`) backed by a judge model."""

    __name__ = "grm"

    def __init__(
        self,
        rubric: Rubric,
        engine: Engine | None = None,
        *,
        samples: int = 3,
        aggregate: Literal["mean", "vote"] = "mean",
        temperature: float = 0.7,
        max_tokens: int = 256,
        on_parse_failure: Literal["none", "zero"] = "none",
        seed: int = 0,
        cache_size: int = 100_000,
    ):
        if judge_criteria(rubric) and engine is None:
            raise ValueError(f"rubric {rubric.name!r} has judge criteria, so the GRM needs a judge model "
                             "(give the reward `judge: self` with a job engine, or `judge: <checkpoint path>`)")
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        self.rubric, self.engine = rubric, engine
        self.samples, self.how, self.temperature, self.max_tokens = samples, aggregate, temperature, max_tokens
        self.on_parse_failure, self.seed, self.cache_size = on_parse_failure, seed, cache_size
        self._cache: OrderedDict[str, Judgment] = OrderedDict()
        # Everything but the (prompt, response) that decides a judgment, hashed once: the cache key's prefix.
        identity = [rubric.model_dump(mode="json"), samples, aggregate, temperature, max_tokens,
                    engine.model_path if engine else None]
        self._judge_identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        self._tokenizer = None
        self.counts = {"judged": 0, "cache_hits": 0, "samples": 0, "sample_parse_failures": 0, "parse_failures": 0,
                       "prompt_tokens": 0, "generated_tokens": 0, "judge_seconds": 0.0}

    # --- TRL's reward shape ---------------------------------------------------------------

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        fields = reference_fields(self.rubric)
        rows = [{f: columns[f][i] for f in fields if f in columns} for i in range(len(prompts))] if fields else None
        judgments = self.judge([completion_text(p) for p in prompts], [completion_text(c) for c in completions], rows)
        return [self._score(j) for j in judgments]

    def metrics(self) -> dict[str, float]:
        """Counters since construction, plus the parse-failure rate and the cost per judged response (tokens read
        and written, seconds of generation), logged by trainers as grm/*."""
        judged = max(self.counts["judged"], 1)
        return {**{f"grm/{k}": float(v) for k, v in self.counts.items()},
                "grm/parse_failure_rate": self.counts["parse_failures"] / judged,
                "grm/tokens_per_response": (self.counts["prompt_tokens"] + self.counts["generated_tokens"]) / judged,
                "grm/seconds_per_response": self.counts["judge_seconds"] / judged}

    # --- judging --------------------------------------------------------------------------

    def judge(self, prompts: list[str], responses: list[str],
              rows: list[dict[str, Any]] | None = None) -> list[Judgment]:
        """Judge each (prompt, response); `rows` carries the reference columns `matches_field` criteria need."""
        rows = rows if rows is not None else [{} for _ in prompts]
        keys = [self._key(p, r, row) for p, r, row in zip(prompts, responses, rows, strict=True)]
        todo = {k: (p, r, row) for k, p, r, row in zip(keys, prompts, responses, rows, strict=True)
                if k not in self._cache}
        self.counts["cache_hits"] += len(keys) - len(todo)
        fresh = self._judge_uncached(list(todo.values()))
        for key, judgment in zip(todo, fresh, strict=True):
            self._cache[key] = judgment
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        for key in keys:
            self._cache.move_to_end(key)
        return [self._cache[k] for k in keys]

    def preview(self, prompt: str, response: str, row: dict[str, Any] | None = None) -> tuple[str, Judgment]:
        """The exact judge prompt for one response and its judgment (uncached, for `retort rubric preview`)."""
        nonce = secrets.token_hex(6)
        judged = self._judge_uncached([(prompt, response, row or {})], nonce)[0]
        return render(self.rubric, prompt, response, nonce), judged

    def _judge_uncached(self, items: list[tuple[str, str, dict[str, Any]]],
                        nonce: str | None = None) -> list[Judgment]:
        checked = [{c.id: checks.check(c, response, row) for c in self.rubric.criteria
                    if not isinstance(c, JudgeCriterion)} for _, response, row in items]
        outputs: list[list[str]] = [[] for _ in items]
        if judge_criteria(self.rubric) and items:
            outputs = self._generate([render(self.rubric, p, r, nonce) for p, r, _ in items])
        judgments = []
        for check_scores, texts in zip(checked, outputs, strict=True):
            self.counts["judged"] += 1
            if not judge_criteria(self.rubric):
                judgments.append(Judgment(combine(self.rubric, {}, check_scores), check_scores, {}))
                continue
            verdicts = [parse_verdict(t, self.rubric) for t in texts]
            self.counts["samples"] += len(verdicts)
            self.counts["sample_parse_failures"] += sum(v.scores is None for v in verdicts)
            judge_scores = aggregate(verdicts, self.how)
            if judge_scores is None:
                self.counts["parse_failures"] += 1
                judgments.append(Judgment(None, check_scores, None, verdicts, texts, parse_failed=True))
            else:
                score = combine(self.rubric, judge_scores, check_scores)
                judgments.append(Judgment(score, check_scores, judge_scores, verdicts, texts))
        return judgments

    def _generate(self, judge_prompts: list[str]) -> list[list[str]]:
        tokenizer = self._get_tokenizer()
        requests = []
        for i, text in enumerate(judge_prompts):
            ids = encode_prompt(tokenizer, text)
            for j in range(self.samples):
                seed = self.seed + int(hashlib.sha256(f"{text}#{j}".encode()).hexdigest()[:8], 16)
                requests.append(GenerationRequest(f"{i}:{j}", tuple(ids), self.max_tokens, self.temperature,
                                                  seed=seed))
        started = time.perf_counter()
        whole = generate_whole(self.engine, requests)
        self.counts["judge_seconds"] += time.perf_counter() - started
        self.counts["prompt_tokens"] += sum(len(r.prompt_ids) for r in requests)
        self.counts["generated_tokens"] += sum(len(c.token_ids) for c in whole.values())
        return [[tokenizer.decode(whole[f"{i}:{j}"].token_ids, skip_special_tokens=True) for j in range(self.samples)]
                for i in range(len(judge_prompts))]

    def _get_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.engine.model_path)
        return self._tokenizer

    def _key(self, prompt: str, response: str, row: dict[str, Any]) -> str:
        key = self._judge_identity.copy()
        key.update(json.dumps([prompt, response, row], sort_keys=True, default=str).encode())
        return key.hexdigest()

    def _score(self, judgment: Judgment) -> float | None:
        if judgment.parse_failed:
            return None if self.on_parse_failure == "none" else 0.0
        return judgment.score


def grm_reward(
    rubric: str,
    judge: str = "self",
    model: str | None = None,
    engine: Engine | None = None,
    samples: int = 3,
    aggregate: Literal["mean", "vote"] = "mean",
    temperature: float = 0.7,
    max_tokens: int = 256,
    on_parse_failure: Literal["none", "zero"] = "none",
    engine_kind: Literal["vllm", "hf"] = "vllm",
) -> GRMReward:
    """The registry's 'grm' reward: a rubric file, and its judge: `self` (the job's own `engine`, the policy at the
    current step's weights: DeepSeek-V4's actor as GRM) or the path of a separate judge checkpoint (`judge: PATH`;
    `model` is the older spelling of it)."""
    spec = load_spec(Rubric, rubric)
    if judge != "self":
        if model is not None and model != judge:
            raise ValueError(f"grm reward: judge {judge!r} and model {model!r} both name a judge; give one")
        model, engine = judge, None
    if engine is None and model is not None:
        from rollout.engine import HFEngine, VLLMEngine

        engine = VLLMEngine(model) if engine_kind == "vllm" else HFEngine(model)
    return GRMReward(spec, engine, samples=samples, aggregate=aggregate, temperature=temperature,
                     max_tokens=max_tokens, on_parse_failure=on_parse_failure)
