"""The preemptible rollout service: generate a batch through an engine, every token through the WAL.

A service owns one run directory::

    run_dir/
      wal/                      token write-ahead log (see rollout/wal.py)
      batches/<batch>.jsonl     the requests of each batch, written before generation starts
      results/<batch>.jsonl     finished rollouts of each batch, written when it completes
      attempts.jsonl            one line per run or resume: what it picked up from the WAL

`run(batch, requests)` generates, appending each step's tokens to the WAL as
they appear, and returns the finished rollouts in request order. A SIGTERM
(`request_stop`) makes it stop stepping, commit the WAL and raise `Preempted`.
`resume()` recovers the WAL and continues every unfinished batch: each
unfinished rollout goes back to the engine as prompt + committed tokens with
the remaining token budget, so nothing committed is generated twice.
`run_or_resume(batch, requests)` is what a restarted trainer calls for each batch
it asks for again: the stored results of a finished batch, the WAL's continuation
of an interrupted one, or a new run.

Stale policy (`stale_policy`): when a rollout's committed tokens came from an
older policy version than the one now loaded, ``continue`` keeps them (and their
per-token versions, so the trainer can correct for it), ``discard`` writes a
RESET record and regenerates the rollout from its prompt under the new policy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import torch

from rollout.engine import Engine, GenerationRequest, TokenChunk
from rollout.wal import CommitPolicy, FinishRecord, ResetRecord, RolloutLog, WALWriter, compact, recover

StalePolicy = Literal["continue", "discard"]


class Preempted(RuntimeError):
    """The service stopped on request (SIGTERM); the WAL is committed and `resume()` continues."""


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt of a batch, with its own sampling settings and metadata (domain, teacher index, …)."""

    id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """A finished generation with everything a trainer needs."""

    id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    policy_versions: list[int]  # the policy version that produced each token
    finish_reason: str  # "stop" | "length"
    metadata: dict[str, Any]


@dataclass
class ServiceTimings:
    """Where the service's wall time went, summed over its calls (seconds): what a step's breakdown reads.

    `engine` is time inside the engine's steps; `wal` the appends and commits around them; `files` the batch,
    results and attempt files and the WAL's compaction; `push` weight pushes into the engine."""

    engine: float = 0.0
    wal: float = 0.0
    files: float = 0.0
    push: float = 0.0
    batches: int = 0
    tokens: int = 0

    def since(self, earlier: ServiceTimings) -> ServiceTimings:
        return ServiceTimings(*(a - b for a, b in zip(astuple(self), astuple(earlier), strict=True)))


@dataclass
class StepProgress:
    """What a progress display needs after each engine step."""

    new_tokens: int
    finished: int
    total: int


_JSON = msgspec.json.Encoder()  # ~10× json.dumps on a batch of rollouts: its results are written in the hot path


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(_JSON.encode(row) + b"\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _NewTokens:
    """The tokens one `_generate` call produces: into the WAL per step (with the FINISH records), into the
    rollouts' logs once at the end.

    Rows are numbered by slot (their place in the request list). When every chunk of a step holds one
    token (the usual case) the whole step is one STEP record built from columns, so the per-token Python
    work is a few list comprehensions; anything else goes in per-chunk TOKENS records.
    """

    def __init__(self, batch: str, todo: Sequence[GenerationRequest], logs: dict[str, RolloutLog]):
        self.todo, self.logs = todo, logs
        self.slot_of = {r.id: slot for slot, r in enumerate(todo)}
        self.keys = [f"{batch}:{r.id}".encode() for r in todo]
        self.next_seq = np.array([logs[r.id].next_seq for r in todo], dtype=np.int64)
        self._slots: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._logprobs: list[np.ndarray] = []

    def log_step(self, wal: WALWriter, version: int, step: list[TokenChunk]) -> tuple[int, int]:
        """Append one engine step's tokens, then its FINISH records, to the WAL; returns (tokens, finished)."""
        slot_of, keys, next_seq = self.slot_of, self.keys, self.next_seq
        if all(len(chunk.token_ids) == 1 for chunk in step):
            slots = np.fromiter(map(slot_of.__getitem__, [chunk.id for chunk in step]), np.int64, len(step))
            tokens = np.fromiter((chunk.token_ids[0] for chunk in step), np.int64, len(step))
            logprobs = np.fromiter((chunk.logprobs[0] for chunk in step), np.float64, len(step))
            if len(step):
                wal.append_step([keys[slot] for slot in slots.tolist()], next_seq[slots], version, tokens, logprobs)
                next_seq[slots] += 1
        else:
            slots, tokens, logprobs = [], [], []
            for chunk in step:
                if chunk.token_ids:
                    slot = slot_of[chunk.id]
                    wal.append_tokens(keys[slot], int(next_seq[slot]), version, chunk.token_ids, chunk.logprobs)
                    next_seq[slot] += 1
                    slots += [slot] * len(chunk.token_ids)
                    tokens += chunk.token_ids
                    logprobs += chunk.logprobs
            slots, tokens, logprobs = np.array(slots, np.int64), np.array(tokens, np.int64), np.array(logprobs)
        self._slots.append(slots)
        self._tokens.append(tokens)
        self._logprobs.append(logprobs)
        done = [chunk for chunk in step if chunk.finish_reason is not None]
        for chunk in done:
            slot = slot_of[chunk.id]
            wal.append(FinishRecord(keys[slot].decode(), int(next_seq[slot]), chunk.finish_reason))
            next_seq[slot] += 1
            self.logs[chunk.id].finish_reason = chunk.finish_reason
        return len(tokens), len(done)

    def extend_logs(self, version: int) -> None:
        """Append every rollout's new tokens, in order, to its log (each token came from `version`)."""
        if not self._slots:
            return
        slots = np.concatenate(self._slots)
        order = np.argsort(slots, kind="stable")  # by rollout, each rollout's tokens in step order
        bounds = np.cumsum(np.bincount(slots, minlength=len(self.todo)))[:-1]
        tokens = np.split(np.concatenate(self._tokens)[order], bounds)
        logprobs = np.split(np.concatenate(self._logprobs)[order], bounds)
        for slot, request in enumerate(self.todo):
            log = self.logs[request.id]
            log.token_ids += tokens[slot].tolist()
            log.logprobs += logprobs[slot].tolist()
            log.policy_versions += [version] * len(tokens[slot])
            log.next_seq = int(self.next_seq[slot])


class RolloutService:
    """Generates batches through `engine`, logging every token to the run's WAL."""

    def __init__(
        self,
        engine: Engine,
        run_dir: str | Path,
        *,
        commit: CommitPolicy | None = None,
        policy_version: int = 0,
        stale_policy: StalePolicy = "continue",
        segment_bytes: int = 64 << 20,
    ):
        self.engine = engine
        self.run_dir = Path(run_dir)
        for sub in ("batches", "results"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.commit = commit or CommitPolicy()
        self.segment_bytes = segment_bytes
        self.policy_version = policy_version
        self.stale_policy = stale_policy
        self._stop = False
        self.tokens_generated = 0  # by the engine, in this process
        self.timings = ServiceTimings()
        self._unfinished: set[str] = set()  # batch names: read from the directory now, then kept by the service
        self.unfinished_batches()
        self._wal: WALWriter | None = None

    def _writer(self) -> WALWriter:
        """The WAL's one writer, kept open across batches (opening one creates and fsyncs a segment)."""
        if self._wal is None:
            self._wal = WALWriter(self.run_dir / "wal", self.commit, self.segment_bytes)
        return self._wal

    def close(self) -> None:
        """Commit and close the WAL writer (a later batch opens a new one)."""
        if self._wal is not None:
            wal, self._wal = self._wal, None
            wal.close()

    def timings_snapshot(self) -> ServiceTimings:
        return replace(self.timings)

    # --- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (safe to call from a signal handler)."""
        self._stop = True

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push new policy weights into the engine; tokens generated from now on carry `version`."""
        started = time.perf_counter()
        self.engine.load_weights(named_tensors)
        self.timings.push += time.perf_counter() - started
        self.policy_version = version

    # --- batches -------------------------------------------------------------------------

    def run(
        self,
        batch: str,
        requests: Sequence[RolloutRequest],
        on_step: Callable[[StepProgress], None] | None = None,
    ) -> list[Rollout]:
        """Generate a new batch to the end (or until preempted) and return its rollouts in order."""
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"batch {batch!r}: request ids must be unique")
        path = self.run_dir / "batches" / f"{batch}.jsonl"
        if path.exists():
            raise ValueError(f"batch {batch!r} already exists in {self.run_dir}; use resume() to continue it")
        started = time.perf_counter()
        write_jsonl_atomic(path, (vars(r) for r in requests))
        self._unfinished.add(batch)
        self.timings.files += time.perf_counter() - started
        return self._generate(batch, list(requests), {}, on_step)

    def unfinished_batches(self) -> list[str]:
        """Batches whose requests are stored but whose results are not, read from the run directory.

        The service then keeps the set up to date itself (it is the directory's one writer), so finishing a
        batch does not list two directories that grow by a file per batch."""
        done = {p.stem for p in (self.run_dir / "results").glob("*.jsonl")}
        unfinished = sorted(p.stem for p in (self.run_dir / "batches").glob("*.jsonl") if p.stem not in done)
        self._unfinished = set(unfinished)
        return unfinished

    def resume(self, on_step: Callable[[StepProgress], None] | None = None,
               batches: Sequence[str] | None = None) -> dict[str, list[Rollout]]:
        """Recover the WAL and finish every unfinished batch (or those of `batches`); returns their rollouts."""
        logs, report = recover(self.run_dir / "wal") if (self.run_dir / "wal").exists() else ({}, None)
        finished = {}
        for batch in self.unfinished_batches():
            if batches is not None and batch not in batches:
                continue
            requests = self.stored_requests(batch)
            prefix = f"{batch}:"
            batch_logs = {k[len(prefix):]: v for k, v in logs.items() if k.startswith(prefix)}
            finished[batch] = self._generate(batch, requests, batch_logs, on_step, report)
        return finished

    def run_or_resume(self, batch: str, requests: Sequence[RolloutRequest],
                      on_step: Callable[[StepProgress], None] | None = None) -> list[Rollout]:
        """The rollouts of `batch` whatever an earlier attempt left: its stored results if it finished, the
        rest of it continued from the WAL if it was interrupted (committed tokens kept), else a new run.

        A trainer restarted from a checkpoint asks again for the batches it had generated after it; the
        stored requests must be the ones asked for now, or the batch belongs to other work."""
        done = (self.run_dir / "results" / f"{batch}.jsonl").exists()
        if not done and not (self.run_dir / "batches" / f"{batch}.jsonl").exists():
            return self.run(batch, requests, on_step)
        stored = self.stored_requests(batch)
        if [(r.id, tuple(r.prompt_ids), r.max_tokens, r.seed) for r in stored] != \
                [(r.id, tuple(r.prompt_ids), r.max_tokens, r.seed) for r in requests]:
            raise ValueError(f"batch {batch!r} in {self.run_dir} holds other requests than the ones asked for now "
                             "(other prompts, budgets or seeds): this run directory belongs to other work; "
                             "use a new one")
        return self.results(batch) if done else self.resume(on_step, batches=[batch])[batch]

    def stored_requests(self, batch: str) -> list[RolloutRequest]:
        """The requests of a batch as `run` stored them before generating."""
        return [RolloutRequest(**{**row, "prompt_ids": tuple(row["prompt_ids"])})
                for row in _read_jsonl(self.run_dir / "batches" / f"{batch}.jsonl")]

    def results(self, batch: str) -> list[Rollout]:
        """The stored rollouts of a finished batch."""
        path = self.run_dir / "results" / f"{batch}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"batch {batch!r} of {self.run_dir} has no results yet")
        return [Rollout(**row) for row in _read_jsonl(path)]

    # --- the loop ------------------------------------------------------------------------

    def _generate(
        self,
        batch: str,
        requests: list[RolloutRequest],
        logs: dict[str, RolloutLog],
        on_step: Callable[[StepProgress], None] | None,
        report: Any = None,
    ) -> list[Rollout]:
        clock = time.perf_counter
        opened = clock()
        resumed: dict[str, int] = {}
        todo: list[GenerationRequest] = []
        wal = self._writer()
        try:
            for r in requests:
                log = logs.setdefault(r.id, RolloutLog())
                stale = any(v != self.policy_version for v in log.policy_versions)
                if stale and self.stale_policy == "discard" and log.finish_reason is None:
                    wal.append(ResetRecord(f"{batch}:{r.id}", log.next_seq))
                    logs[r.id] = log = RolloutLog(next_seq=log.next_seq + 1)
                if log.token_ids:
                    resumed[r.id] = len(log.token_ids)
                if log.finish_reason is None and self._finished_by_tokens(r, log):
                    log.finish_reason = "stop" if log.token_ids[-1] == self.engine.eos_token_id else "length"
                    wal.append(FinishRecord(f"{batch}:{r.id}", log.next_seq, log.finish_reason))
                    log.next_seq += 1
                if log.finish_reason is None:
                    todo.append(GenerationRequest(
                        id=r.id, prompt_ids=tuple(r.prompt_ids) + tuple(log.token_ids),
                        max_tokens=r.max_tokens - len(log.token_ids), temperature=r.temperature,
                        top_p=r.top_p, seed=r.seed))
            self._log_attempt(batch, resumed, report)
            finished = len(requests) - len(todo)
            version = self.policy_version  # fixed for this call: weights are pushed between batches
            new = _NewTokens(batch, todo, logs)
            engine_s, mark = 0.0, clock()
            wal_s = mark - opened
            for step in self.engine.generate(todo):  # the hot loop: work per step, not per token
                stepped = clock()
                engine_s += stepped - mark
                new_tokens, newly_finished = new.log_step(wal, version, step)
                finished += newly_finished
                wal.maybe_commit()
                self.tokens_generated += new_tokens
                if on_step is not None:
                    on_step(StepProgress(new_tokens, finished, len(requests)))
                if self._stop:
                    raise Preempted(f"stopped on request; {finished}/{len(requests)} rollouts of batch {batch!r} "
                                    "finished, the rest resume from the WAL")
                mark = clock()
                wal_s += mark - stepped
            engine_s += clock() - mark  # the generator's last call, which yields nothing
        except BaseException:
            self.close()  # commits what was generated: a resume continues from it
            raise
        mark = clock()
        new.extend_logs(version)
        wal_s += clock() - mark
        rollouts = [
            Rollout(id=r.id, prompt_ids=list(r.prompt_ids), completion_ids=logs[r.id].token_ids,
                    logprobs=logs[r.id].logprobs, policy_versions=logs[r.id].policy_versions,
                    finish_reason=logs[r.id].finish_reason or "length", metadata=dict(r.metadata))
            for r in requests
        ]
        # No final WAL commit: the results, written and fsynced here, hold every token of the batch, and from
        # then on the WAL no longer needs its records.
        write_jsonl_atomic(self.run_dir / "results" / f"{batch}.jsonl", (vars(x) for x in rollouts))
        self._unfinished.discard(batch)
        if self._unfinished:  # other batches' records stay: rewrite the WAL without this one's
            self.close()
            compact(self.run_dir / "wal", {f"{batch}:{r.id}" for r in requests})
        else:
            wal.reset()
        done = clock()
        self.timings.engine += engine_s
        self.timings.wal += wal_s
        self.timings.files += done - opened - engine_s - wal_s
        self.timings.batches += 1
        self.timings.tokens += sum(len(logs[r.id].token_ids) for r in requests)
        return rollouts

    def _finished_by_tokens(self, request: RolloutRequest, log: RolloutLog) -> bool:
        """Killed after the last token was committed but before its FINISH record was."""
        if not log.token_ids:
            return False
        return len(log.token_ids) >= request.max_tokens or log.token_ids[-1] == self.engine.eos_token_id

    def _log_attempt(self, batch: str, resumed: dict[str, int], report: Any) -> None:
        entry = {"batch": batch, "pid": os.getpid(), "time": time.time(), "policy_version": self.policy_version,
                 "resumed_tokens": resumed}
        if report is not None:
            entry["recovery"] = asdict(report)
        with open(self.run_dir / "attempts.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
