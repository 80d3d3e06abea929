"""`retort rollout run` / `resume`: a preemptible batch generation job over a prompt file.

The run directory holds ``spec.json`` (the validated spec), the service's WAL and
batch files (see rollout/service.py), and, once done, ``completions.jsonl``: one
object per prompt, in prompt order, with ``id``, ``prompt``, ``completion``,
``completion_ids``, ``logprobs``, ``finish_reason``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy.exc import ArgumentError, OperationalError

from rollout.config import RolloutRunSpec
from rollout.engine import Engine, EngineError, HFEngine, VLLMEngine, encode_prompt
from rollout.service import Rollout, RolloutRequest, RolloutService, StepProgress, write_jsonl_atomic
from rollout.wal import CommitPolicy
from storage.db import open_store, run_home
from storage.rollouts import find_batch
from storage.specfile import precision_dtype

BATCH = "prompts"


class RunError(ValueError):
    """A rollout run that cannot start or resume; the message names the file, line or run."""


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    line: int


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def read_prompts(path: str) -> list[PromptRow]:
    """Read the prompt JSONL, reporting the first bad line as file:line: what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise RunError(f"{path}: no such prompt file")
    rows, seen = [], {}
    for number, text in enumerate(file.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or "id" not in obj:
            raise RunError(f"{path}:{number}: expected an object with 'id' and a string 'prompt'")
        rid = str(obj["id"])
        if rid in seen:
            raise RunError(f"{path}:{number}: id {rid!r} already used on line {seen[rid]}")
        seen[rid] = number
        rows.append(PromptRow(rid, obj["prompt"], number))
    if not rows:
        raise RunError(f"{path}: no prompts in the file")
    return rows


def build_engine(spec: RolloutRunSpec) -> Engine:
    dtype = precision_dtype(spec.precision)
    if spec.engine == "hf":
        return HFEngine(spec.model, max_model_len=spec.max_model_len, dtype=getattr(torch, dtype))
    return VLLMEngine(spec.model, max_model_len=spec.max_model_len, seed=spec.sampling.seed,
                      enforce_eager=spec.enforce_eager, dtype=dtype)


def make_service(spec: RolloutRunSpec, engine: Engine, run_dir: Path) -> RolloutService:
    commit = CommitPolicy(spec.wal.mode, spec.wal.interval_ms, spec.wal.max_records)
    return RolloutService(engine, run_dir, commit=commit, stale_policy=spec.stale_policy,
                          segment_bytes=int(spec.wal.segment_mb * (1 << 20)))


def tokenize_prompts(spec: RolloutRunSpec, engine: Engine, rows: list[PromptRow]) -> list[RolloutRequest]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    requests = []
    for i, row in enumerate(rows):
        ids = encode_prompt(tokenizer, row.prompt, spec.chat_template)
        if len(ids) >= engine.max_model_len:
            raise RunError(f"{spec.prompts}:{row.line}: prompt {row.id!r} is {len(ids)} tokens, the model's context "
                           f"is {engine.max_model_len}; shorten it or raise max_model_len")
        s = spec.sampling
        requests.append(RolloutRequest(id=row.id, prompt_ids=tuple(ids), max_tokens=s.max_tokens,
                                       temperature=s.temperature, top_p=s.top_p, seed=s.seed + i,
                                       metadata={"prompt": row.prompt}))
    return requests


def resolve_run(run: str) -> Path:
    """A run id (under the run home or in the job store) or a run directory."""
    candidates = [Path(run), run_home() / "rollouts" / run]
    try:
        row = find_batch(open_store(), run)
    except (ArgumentError, OperationalError):  # the store only helps find custom output_dirs
        row = None
    if row is not None:
        candidates.insert(0, Path(row.path))
    for candidate in candidates:
        if (candidate / "spec.json").is_file():
            return candidate
    raise RunError(f"no rollout run {run!r}: not a run directory, and not under {run_home() / 'rollouts'}")


def write_completions(run_dir: Path, rollouts: list[Rollout], model: str) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    path = run_dir / "completions.jsonl"
    write_jsonl_atomic(path, (
        {"id": r.id, "prompt": r.metadata.get("prompt"),
         "completion": tokenizer.decode(r.completion_ids, skip_special_tokens=True),
         "completion_ids": r.completion_ids, "logprobs": r.logprobs, "finish_reason": r.finish_reason,
         "policy_versions": r.policy_versions}
        for r in rollouts))
    return path


def start(spec: RolloutRunSpec, run_id: str, service: RolloutService, rows: list[PromptRow],
          on_step: Callable[[StepProgress], None] | None = None) -> Path:
    """Generate `rows` (from `read_prompts`) into the service's run directory; returns the completions path."""
    requests = tokenize_prompts(spec, service.engine, rows)
    stored = {"run_id": run_id, "spec": spec.model_dump(mode="json")}
    (service.run_dir / "spec.json").write_text(json.dumps(stored, indent=2))
    rollouts = service.run(BATCH, requests, on_step)
    return write_completions(service.run_dir, rollouts, spec.model)


def load_run(run_dir: Path) -> tuple[str, RolloutRunSpec]:
    stored = json.loads((run_dir / "spec.json").read_text())
    return stored["run_id"], RolloutRunSpec.model_validate(stored["spec"])


def resume(spec: RolloutRunSpec, service: RolloutService,
           on_step: Callable[[StepProgress], None] | None = None) -> Path:
    """Continue an interrupted run from its WAL; returns the completions path."""
    run_dir = service.run_dir
    if BATCH in service.unfinished_batches():
        rollouts = service.resume(on_step)[BATCH]
    elif (run_dir / "results" / f"{BATCH}.jsonl").exists():
        rollouts = service.results(BATCH)
    else:
        raise RunError(f"{run_dir}: the run never stored its prompts; start it again with `retort rollout run`")
    return write_completions(run_dir, rollouts, spec.model)


__all__ = ["EngineError", "RunError", "build_engine", "load_run", "make_service", "new_run_id", "resolve_run",
           "resume", "start"]
