"""On-policy distillation: one student learns from every teacher at once, on its own generations.

    retort distill configs/demo/distill.yaml

Each step, top to bottom:

    prompts  ← mixture of domains, each tagged with its teacher index (seeded per step)
    generate ← the student on vLLM through the rollout service (every token in the WAL)
    cache    ← each teacher's trunk once, in index order: last-layer hidden states only
    loss     ← fused full-vocabulary divergence, teachers visited in index order (one head load each)
    step     ← AdamW; accelerate places the model and runs backward; micro-batches accumulate
               gradients weighted by their tokens (or sequences), so a step's loss is one exact mean
    push     ← the new student weights into the vLLM engine (policy version = step)
    log/eval/save ← metrics and checkpoints in the job store; per-domain held-out scores

A run killed at any point resumes from its last checkpoint; a generation batch it
left unfinished continues from the WAL instead of being sampled again.

On several trainer ranks (`resources.workers`) the student is an FSDP2 module (`fully_shard` per decoder
layer, then the whole model) and every rank runs the loop: rank 0 alone generates (rollout workers, one WAL),
evaluates and writes the job store; it sends the step's sequences to every rank, each rank takes a
token-balanced share sorted by teacher, fills its own hidden-state cache, and runs the fused loss inside the
student's registered FSDP forward method (where FSDP has gathered the head), scaled so that FSDP's gradient
average is the exact global mean. Checkpoints are sharded (torch.distributed.checkpoint) beside a full export.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.config import DistillationRun
from opd.data import Sample, off_policy_indices, read_rows, sample_batch
from opd.hidden_cache import HiddenStateCache, RoutedSequence
from opd.scheduler import distillation_loss, loss_weight, shard_by_tokens, shard_student, shard_trunk
from opd.teachers import HeadStore, split_teacher
from opd.vocabulary import check_tokenizers
from rewards.evaluation import evaluate
from rewards.registry import build_reward
from rewards.tools import ToolBox
from rollout.agent import check_turn_budget
from rollout.engine import Engine, HFEngine, encode_prompt
from rollout.service import Rollout, RolloutRequest
from rollout.worker import open_service, start_engine, stop_engine
from storage import jobs
from storage.checkpoints import SHARDED, full_state, load_sharded, save_sharded, write_full_model
from storage.db import BackgroundWrites, Store
from storage.specfile import precision_dtype, resolve_precision
from storage.trackers import Trackers


@dataclass
class StepReport:
    step: int
    metrics: dict[str, float]
    scores: dict[str, float] | None = None  # per-domain held-out scores when this step evaluated


@dataclass
class DistillResult:
    run_dir: Path
    steps: int
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # domain → teacher / before / after


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def learning_rate_at(step: int, spec: DistillationRun) -> float:
    """The schedule as a pure function of the step, so a resumed run continues it exactly."""
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    if spec.lr_schedule == "constant":
        return spec.learning_rate
    if spec.lr_schedule == "warmup_stable_decay":
        decay_start = spec.steps - spec.decay_steps
        if step < decay_start:
            return spec.learning_rate
        return spec.learning_rate * (1 - 0.9 * (step - decay_start + 1) / spec.decay_steps)
    progress = (step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def off_policy_fraction_at(step: int, spec: DistillationRun) -> float:
    """The share of reference answers at `step` (a pure function of the step, like the learning rate)."""
    if spec.off_policy_fraction_end is None:
        return spec.off_policy_fraction
    progress = step / max(spec.steps - 1, 1)
    return spec.off_policy_fraction + (spec.off_policy_fraction_end - spec.off_policy_fraction) * progress


def _ranks() -> tuple[int, int]:
    """(this process's rank, how many trainer ranks the run has): (0, 1) outside a torch.distributed group."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _from_lead(value: Any) -> Any:
    """Rank 0's `value` on every rank (a collective; the identity on one rank)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sum_over_ranks(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


class Distiller:
    """Holds the run's state; `train()` is the loop."""

    def __init__(self, spec: DistillationRun, run_dir: str | Path, *, store: Store | None = None,
                 job_id: int | None = None, engine: Engine | None = None):
        self.spec, self.run_dir, self.store, self.job_id = spec, Path(run_dir), store, job_id
        self.engine = engine
        self._own_engine = False  # started by setup(), stopped when train() ends
        self.call_log: Any = None  # an agent domain's TrajectoryLog, opened at its first trajectories
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = Trackers(["none"], self.run_dir, spec.name)  # `train` opens the spec's own
        self.store_writes = BackgroundWrites()  # metrics and batch rows, off each step's critical path

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = self.spec
        torch.manual_seed(spec.seed)
        self.rank, self.world = _ranks()
        self.lead = self.rank == 0  # generates, evaluates, writes the store; the only rank on one
        self.teachers = {t.index: t for t in spec.teachers}
        infos = None
        if self.lead:
            check_tokenizers(spec.student.init, {t.name: str(t.checkpoint) for t in spec.teachers})
            infos = {t.index: split_teacher(t.checkpoint, str(self.run_dir / "teachers" / str(t.index)), t.index)
                     for t in spec.teachers}
        infos = _from_lead(infos)  # split once, by rank 0, into storage every rank reads
        self.locations = {i: info.location for i, info in infos.items()}
        self.vocab_sizes = {i: info.vocab_size for i, info in infos.items()}
        self.precision = resolve_precision(spec.precision)
        self.dtype = getattr(torch, precision_dtype(spec.precision))  # of the teachers and the engine
        for entry in spec.mixture if self.lead else ():
            entry.write_generated()
        _from_lead(None)  # the generated files exist before any rank reads them
        self.rows = {e.domain: read_rows(e.prompts) for e in spec.mixture}
        self.completion_fields = {e.domain: e.completion_field for e in spec.mixture}
        if spec.off_policy_fraction > 0 or (spec.off_policy_fraction_end or 0) > 0:
            for entry in spec.mixture:
                if any(entry.completion_field not in row for row in self.rows[entry.domain]):
                    raise ValueError(f"{', '.join(entry.prompts)}: off_policy_fraction needs reference answers, but "
                                     f"some rows have no {entry.completion_field!r} column (set the mixture entry's "
                                     "completion_field, or off_policy_fraction: 0 and no off_policy_fraction_end)")
                if entry.tools and not all(isinstance(row[entry.completion_field], list)
                                           for row in self.rows[entry.domain]):
                    raise ValueError(f"{', '.join(entry.prompts)}: domain {entry.domain!r} answers in turns, so its "
                                     f"reference answers ({entry.completion_field!r}) must be lists of turns "
                                     "(assistant and tool messages), as its SFT demonstrations are")
        self.eval_rows = {e.domain: read_rows(e.eval_prompts)[:e.eval.max_prompts] for e in spec.mixture
                          if e.eval_prompts}
        self.eval_settings = {e.domain: e.eval for e in spec.mixture}
        self.agents = {e.domain: e for e in spec.mixture if e.tools}  # domains answered in tool-calling turns
        self.toolboxes = {d: ToolBox(e.tools, e.agent.max_concurrency) for d, e in self.agents.items()}
        self.rewards = {e.domain: build_reward(e.eval.rewards or e.rewards) for e in spec.mixture
                        if (e.eval.rewards or e.rewards) and e.eval_prompts}

        checkpoints = _from_lead(_checkpoints(self.run_dir))
        source = str(checkpoints[-1]) if checkpoints else spec.student.init
        self.start_step = json.loads((checkpoints[-1] / "state.json").read_text())["step"] if checkpoints else 0
        self.tokenizer = AutoTokenizer.from_pretrained(spec.student.init)
        for domain, entry in self.agents.items():
            check_turn_budget(self.tokenizer, [row.get(entry.completion_field) for row in self.rows[domain]],
                              entry.eval.max_new_tokens, source=", ".join(entry.prompts),
                              setting=f"mixture[{domain}].eval.max_new_tokens")
        # a prompt's ids, rendered once per run: a step samples its batch from the same few thousand prompts
        self._encode = functools.cache(
            lambda prompt: encode_prompt(self.tokenizer, prompt, self.spec.generation.chat_template))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # bf16 is mixed precision: fp32 master weights and optimizer state, bf16 autocast compute. accelerate
        # keeps one state per process and refuses another precision later; the run sets its own, as
        # transformers' TrainingArguments does for every Trainer.
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision="bf16" if self.precision == "bf16" else "no")
        # the run's device for everything that computes: student, teacher trunks and heads, the hidden-state cache,
        # the teachers' evaluation engines (on a GPU; a CPU has nothing else)
        self.device = self.accelerator.device
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the student's master copy) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        self.heads = HeadStore(self.locations, max_heads=spec.max_resident_heads, dtype=self.dtype,
                               device=self.device, host_budget_bytes=None if spec.head_host_budget_gb is None
                               else int(spec.head_host_budget_gb * 2**30))
        # on several ranks every trunk stays resident, sharded: 1/N of each per rank, gathered a layer at a time
        self.cache = HiddenStateCache(storage_dtype=self.dtype, compute_dtype=self.dtype, device=self.device,
                                      max_resident_trunks=spec.max_resident_trunks if self.world == 1
                                      else max(spec.max_resident_trunks, len(spec.teachers)),
                                      shard=shard_trunk if self.world > 1 else None)
        student = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        if self.world > 1:  # FSDP2 directly: accelerate turns its FSDP plugin on for GPU groups only
            self.student = shard_student(student.to(self.device), self.precision)
            self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=spec.learning_rate)
            if checkpoints and (checkpoints[-1] / SHARDED).exists():
                load_sharded(checkpoints[-1], self.student, self.optimizer)
        else:
            optimizer = torch.optim.AdamW(student.parameters(), lr=spec.learning_rate)
            if checkpoints and (checkpoints[-1] / "optimizer.pt").exists():
                optimizer.load_state_dict(torch.load(checkpoints[-1] / "optimizer.pt"))
            self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        if not self.lead:
            self._push_weights(self.start_step)  # its part of gathering the weights rank 0 pushes
            return
        if self.engine is None and spec.generation.engine == "hf":  # the student itself generates: no push
            self.engine = HFEngine.sharing(self.accelerator.unwrap_model(self.student), self.tokenizer,
                                           max_model_len=spec.generation.max_model_len)
        elif self.engine is None:  # vLLM in this process, or rollout workers (spec.rollout)
            self.engine = start_engine(spec.rollout, spec.student.init, max_model_len=spec.generation.max_model_len,
                                       seed=spec.seed, dtype=precision_dtype(spec.precision), run_dir=self.run_dir)
            self._own_engine = True
        self.service = open_service(self.engine, self.run_dir / "rollouts", policy_version=self.start_step)
        self._push_weights(self.start_step)

    def _push_weights(self, version: int) -> None:
        def named_weights(student: torch.nn.Module):  # lazy: an engine sharing the student's (hf) reads none
            for name, tensor in student.state_dict().items():
                yield name, tensor.detach()

        if self.world > 1:  # every rank gathers the shards; rank 0 has the full tensors and pushes them
            state = full_state(self.student)
            if self.lead:
                self.service.load_weights(state.items(), version=version)
            return
        self.service.load_weights(named_weights(self.accelerator.unwrap_model(self.student)), version=version)

    # --- the loop ------------------------------------------------------------------------

    def train(self, on_step: Callable[[StepReport], None] | None = None) -> DistillResult:
        """Run (or resume) the whole distillation; returns the per-domain table."""
        spec = self.spec
        self.setup()
        if not self.lead:
            return self._follow()
        self.trackers = Trackers(spec.report_to, self.run_dir, spec.name, spec.model_dump(mode="json"))
        try:
            before = self._scores_at(0) if self.start_step > 0 else self.evaluate()
            if self.start_step == 0:
                self._log(0, {f"eval/{d}/score": s for d, s in before.items()})
            teacher_scores = self.teacher_scores()
            for step in range(self.start_step, spec.steps):
                metrics = self.step(step)
                report = StepReport(step + 1, metrics)
                if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
                    report.scores = self.evaluate()
                    metrics.update({f"eval/{d}/score": s for d, s in report.scores.items()})
                self._log(step + 1, metrics)
                if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
                    self.save(step + 1)
                if on_step is not None:
                    on_step(report)
            self.store_writes.flush()
        finally:
            self.trackers.close()
            if self.call_log is not None:
                self.call_log.close()
            self.store_writes.flush(raise_errors=False)  # whatever ended the loop, what it logged is stored
            if self._own_engine:
                stop_engine(self.engine)
        after = self._scores_at(spec.steps)
        table = {d: {"teacher": teacher_scores.get(d, float("nan")), "before": before.get(d, float("nan")),
                     "after": after.get(d, float("nan"))} for d in self.eval_rows}
        (self.run_dir / "results.json").write_text(json.dumps({"domains": table}, indent=2))
        return DistillResult(self.run_dir, spec.steps, table)

    def _follow(self) -> DistillResult:
        """A rank > 0: every step's share of the loss and its part of each collective; rank 0 does the rest."""
        for step in range(self.start_step, self.spec.steps):
            self.step(step)
            if (step + 1) % self.spec.save_every == 0 or step + 1 == self.spec.steps:
                self.save(step + 1)
        return DistillResult(self.run_dir, self.spec.steps)

    def _sequences(self, step: int) -> tuple[list[RoutedSequence], Any]:
        """The step's sequences, each routed to its teacher: the student's generations, then reference answers;
        and the rollout service's timings of generating them."""
        spec = self.spec
        samples = sample_batch(spec.mixture, self.rows, spec.batch_size, seed=spec.seed * 1_000_003 + step)
        references = off_policy_indices(len(samples), off_policy_fraction_at(step, spec), seed=spec.seed * 31 + step)
        service_before = self.service.timings_snapshot()
        agent_samples = {domain: [s for i, s in enumerate(samples) if i not in references and s.domain == domain]
                         for domain in self.agents}
        agent_requests = {domain: self._agent_requests(step, domain, rows) for domain, rows in agent_samples.items()}
        rollouts = self._generate(step, [s for i, s in enumerate(samples)
                                         if i not in references and s.domain not in self.agents], agent_requests)
        first_turns: dict[str, dict[str, tuple]] = {domain: {} for domain in self.agents}
        for r in rollouts:
            if "agent_turn" in r.metadata:
                first_turns[r.metadata["domain"]][r.metadata["agent_turn"]] = (r.completion_ids, r.logprobs,
                                                                                r.finish_reason)
        routed = [RoutedSequence(r.id, r.metadata["teacher"], tuple(r.prompt_ids), tuple(r.completion_ids))
                  for r in rollouts if "agent_turn" not in r.metadata]
        for domain, rows in agent_samples.items():
            routed += self._trajectories(step, domain, rows, agent_requests[domain], first_turns[domain])
        routed += [self._reference(step, i, samples[i]) for i in sorted(references)]
        return routed, self.service.timings.since(service_before)

    def _agent_requests(self, step: int, domain: str, samples: list[Sample]) -> list[Any]:
        from rollout.agent import AgentRequest

        seed = self._step_seed(step)
        return [AgentRequest(str(i), s.prompt, seed=seed + i) for i, s in enumerate(samples)]

    def _step_seed(self, step: int) -> int:
        """Per step, plus the request's index: a resumed step samples the same."""
        return self.spec.seed * 7919 + step * 4099

    def _agent_budget(self, domain: str) -> tuple[int, int]:
        """An agent domain's trajectories are generated as the domain is scored (`mixture[].eval`): each turn its
        answer budget, up to `max_turns` turns: (tokens per turn, tokens in all)."""
        turn_tokens = self.eval_settings[domain].max_new_tokens
        return turn_tokens, self.agents[domain].agent.max_turns * turn_tokens

    def _trajectories(self, step: int, domain: str, samples: list[Sample], requests: list[Any],
                      first_turn: dict[str, tuple]) -> list[RoutedSequence]:
        """An agent domain's answers: multi-turn trajectories through the rollout service (its WAL, resumed
        mid-turn after a kill, tool calls replayed from `calls.jsonl`), the tool results masked from the loss.
        Their first turn was generated in the step's batch beside the other domains' answers (`first_turn`)."""
        if not samples:
            return []
        from rollout.agent import TrajectoryLog, run_agent

        if self.call_log is None:
            self.call_log = TrajectoryLog(self.run_dir / "calls.jsonl")
        g, agent = self.spec.generation, self.agents[domain].agent
        turn_tokens, max_tokens = self._agent_budget(domain)
        done = run_agent(self.service, self.tokenizer, requests, self.toolboxes[domain], self.call_log,
                         max_turns=agent.max_turns, max_tokens=max_tokens, turn_tokens=turn_tokens,
                         temperature=g.temperature, top_p=g.top_p, batch=f"step-{step:06d}-{domain}",
                         first_turn=first_turn)
        return [RoutedSequence(f"{step}-{domain}-{t.id}", s.teacher_index, tuple(t.prompt_ids), tuple(t.token_ids),
                               tuple(t.model_mask)) for s, t in zip(samples, done, strict=True)]

    def step(self, step: int) -> dict[str, float]:
        """Generate, fill the cache, train one optimizer step, push the weights."""
        spec = self.spec
        clock = time.perf_counter
        started = clock()
        routed, service = self._sequences(step) if self.lead else (None, None)
        generated = clock()
        teachers = None
        if self.world > 1:
            routed = _from_lead(routed)
            total_weight = loss_weight(routed, spec.loss_normalization)  # of the whole step, on every rank
            tokens = loss_weight(routed, "token")
            teachers = sorted({s.teacher_index for s in routed})  # every rank runs each of them
            routed = shard_by_tokens(routed, self.world)[self.rank]
        self.cache.clear()
        cache_report = self.cache.fill(routed, self.locations, self.vocab_sizes, pad_id=self.pad_id,
                                       teachers=teachers)
        scored = clock()
        loads_before, copy_before = self.heads.stats.loads, self.heads.stats.copy_seconds
        exposed_before = self.heads.stats.exposed_seconds
        if self.world == 1:
            tokens = loss_weight(routed, "token")
            total_weight = loss_weight(routed, spec.loss_normalization)
        k = spec.gradient_accumulation_steps
        micro_batches = [routed[i * len(routed) // k:(i + 1) * len(routed) // k] for i in range(k)]
        if self.world == 1:
            micro_batches = [part for part in micro_batches if part]
        loss_sum, per_teacher = 0.0, {}
        options = {"divergence": spec.divergence, "beta": spec.beta, "temperature": spec.temperature,
                   "chunk_size": spec.chunk_size, "pad_id": self.pad_id, "normalization": spec.loss_normalization}
        for part in micro_batches:  # gradients accumulate, weighted by tokens (or sequences): one exact mean
            if self.world > 1:  # every rank runs every micro-batch, empty or not: FSDP's collectives pair up
                loss, result = self.student.distillation_loss(part, self.cache, self.heads, max_batch_tokens=None,
                                                              **options)
                # FSDP averages the ranks' gradients: × ranks makes the average the sum over the whole step
                loss.backward(loss.new_tensor(result.weight / max(total_weight, 1) * self.world))
            else:
                result = distillation_loss(self.accelerator.unwrap_model(self.student), part, self.cache,
                                           self.heads, **options)
                loss = result.loss
                if result.tokens:
                    self.accelerator.backward(loss * (result.weight / max(total_weight, 1)))
            if result.tokens:
                loss_sum += float(loss.detach()) * result.weight
            per_teacher.update({f"loss/teacher{i}": v for i, v in result.per_teacher.items()})
        self.heads.settle()  # the head copies' CUDA events, read once the step's loss is done
        per_teacher = {name: float(value) for name, value in per_teacher.items()}
        if self.world > 1:  # the step's loss over every rank's share (loss/teacherN: rank 0's share only)
            loss_sum = _sum_over_ranks([loss_sum])[0]
        backward = clock()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(step, spec)
        self.optimizer.step()
        self.optimizer.zero_grad()
        stepped = clock()
        self._push_weights(step + 1)
        pushed = clock()
        if not self.lead:
            return {"loss": loss_sum / max(total_weight, 1)}
        return {
            "loss": loss_sum / max(total_weight, 1), **per_teacher, "tokens": float(tokens),
            "generation_tokens_per_s": service.tokens / service.engine if service.engine else 0.0,
            # where the step's wall time went (seconds), as verl's timing_s/* and TRL's profiling metrics do
            "time/generate": service.engine, "time/wal": service.wal + service.files,
            "time/batch_other": generated - started - service.engine - service.wal - service.files,
            "time/teacher": scored - generated, "time/loss": backward - scored,
            "time/optimizer": stepped - backward, "time/push": pushed - stepped,
            "heads/loads_this_step": float(self.heads.stats.loads - loads_before),
            "heads/storage_reads": float(self.heads.stats.reads),  # in the whole run: once per teacher, ideally
            # this step's host-to-device head copies (CUDA events; 0 on a CPU) and the part compute waited for
            "heads/copy_s": self.heads.stats.copy_seconds - copy_before,
            "heads/copy_exposed_s": self.heads.stats.exposed_seconds - exposed_before,
            "heads/max_resident": float(self.heads.stats.max_resident),
            "cache/bytes": float(cache_report.bytes_stored), "cache/logits_bytes": float(cache_report.logits_bytes),
            "cache/trunk_loads": float(cache_report.trunk_loads),
        }

    def _generate(self, step: int, samples: list[Sample], agent_requests: dict[str, list[Any]]) -> list[Rollout]:
        """The step's batch: the answers of the single-turn domains and the first turn of every agent trajectory,
        generated together (the agents' later turns follow in batches of their own)."""
        from rollout.agent import first_turn_requests

        batch = f"step-{step:06d}"
        g = self.spec.generation
        seed = self._step_seed(step)
        requests = [RolloutRequest(id=f"{step}-{i}", prompt_ids=self._encode(s.prompt), max_tokens=g.max_new_tokens,
                                   temperature=g.temperature, top_p=g.top_p, seed=seed + i,
                                   metadata={"domain": s.domain, "teacher": s.teacher_index})
                    for i, s in enumerate(samples)]
        for domain, agents in agent_requests.items():
            turn_tokens, max_tokens = self._agent_budget(domain)
            requests += [RolloutRequest(id=f"{domain}/{r.id}", prompt_ids=tuple(r.prompt_ids), max_tokens=r.max_tokens,
                                        temperature=r.temperature, top_p=r.top_p, seed=r.seed,
                                        metadata={"domain": domain, "agent_turn": r.id})
                         for r in first_turn_requests(self.tokenizer, agents, max_tokens=max_tokens,
                                                      turn_tokens=turn_tokens, temperature=g.temperature,
                                                      top_p=g.top_p)]
        new = not (self.run_dir / "rollouts" / "batches" / f"{batch}.jsonl").exists()
        rollouts = self.service.run_or_resume(batch, requests)  # a killed run's step: stored, or from the WAL
        if self.store is not None and new:
            from storage.rollouts import record_finished_batch

            self.store_writes.submit(record_finished_batch, self.store, f"{self.spec.name}-{self.job_id}-{batch}",
                                     str(self.run_dir / "rollouts"), job_id=self.job_id, policy_version=step,
                                     num_rollouts=len(rollouts),
                                     num_tokens=sum(len(r.completion_ids) for r in rollouts))
        return rollouts

    def _reference(self, step: int, i: int, sample: Sample) -> RoutedSequence:
        """The prompt and the dataset's reference answer (ended by EOS, as the chat template ends a turn); an
        agent domain's is a demonstration's turns, its tool results masked from the loss."""
        field = self.completion_fields[sample.domain]
        if sample.domain in self.agents:
            from rollout.agent import reference_trajectory

            prompt_ids, ids, mask = reference_trajectory(self.tokenizer, sample.prompt, sample.columns[field])
            return RoutedSequence(f"{step}-ref-{i}", sample.teacher_index, prompt_ids, ids, mask)
        answer = tuple(self.tokenizer(str(sample.columns[field]), add_special_tokens=False)["input_ids"])
        return RoutedSequence(f"{step}-ref-{i}", sample.teacher_index, self._encode(sample.prompt),
                              (*answer, self.tokenizer.eos_token_id))

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self, engine: Engine | None = None) -> dict[str, float]:
        """Greedy answers to each domain's held-out prompts under its `eval` settings, scored by its rewards (None
        counts 0)."""
        return {domain: evaluate(engine or self.engine, self.tokenizer, rows, self.rewards[domain],
                                 max_new_tokens=self.eval_settings[domain].max_new_tokens,
                                 success_threshold=self.eval_settings[domain].success_threshold,
                                 chat_template=self.spec.generation.chat_template,
                                 environment=self.toolboxes.get(domain),
                                 max_turns=self.agents[domain].agent.max_turns if domain in self.agents else 4).score
                for domain, rows in self.eval_rows.items() if domain in self.rewards}

    def teacher_scores(self) -> dict[str, float]:
        """Each domain's score under its own teacher (computed once per run, kept in the run directory)."""
        path = self.run_dir / "teacher_scores.json"
        if path.exists():
            return json.loads(path.read_text())
        scores, engines = {}, {}
        for entry in self.spec.mixture:
            if entry.domain in self.rewards:
                if entry.teacher not in engines:
                    engines[entry.teacher] = HFEngine(self.teachers[entry.teacher].checkpoint, dtype=self.dtype,
                                                      device=str(self.device))
                scores[entry.domain] = self.evaluate(engines[entry.teacher]).get(entry.domain, float("nan"))
        path.write_text(json.dumps(scores, indent=2))
        return scores

    def _scores_at(self, step: int) -> dict[str, float]:
        rows = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        found = {}
        for row in rows:
            if row["step"] == step:
                found.update({k.split("/")[1]: v for k, v in row["metrics"].items()
                              if k.startswith("eval/") and k.endswith("/score")})
        return found

    # --- bookkeeping ---------------------------------------------------------------------

    def _log(self, step: int, metrics: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "metrics": metrics}) + "\n")
        self.trackers.log("distill", step, {k: v for k, v in metrics.items() if isinstance(v, int | float)})
        if self.store is not None and self.job_id is not None and metrics:
            self.store_writes.submit(jobs.record_metrics, self.store, self.job_id, "distill", step, dict(metrics))

    def save(self, step: int) -> Path:
        """A resumable checkpoint: student weights, tokenizer, optimizer state, step. On several ranks the
        student and optimizer are sharded (every rank writes its own), beside a full export rank 0 writes."""
        path = self.run_dir / "checkpoints" / f"step-{step:06d}"
        tmp = path.with_name(path.name + ".tmp")
        if self.world > 1:
            save_sharded(tmp, self.student, self.optimizer)
            state = full_state(self.student)
            if not self.lead:
                _from_lead(None)  # rank 0 has renamed the checkpoint into place
                return path
            write_full_model(self.student, state, tmp)
        else:
            self.accelerator.unwrap_model(self.student).save_pretrained(tmp, safe_serialization=True)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        self.tokenizer.save_pretrained(tmp)
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        tmp.rename(path)  # a checkpoint directory either exists whole or not at all
        if self.world > 1:
            _from_lead(None)
        if self.store is not None and self.job_id is not None:
            self.store_writes.flush()  # the step's metrics are in the store before its checkpoint
            jobs.record_checkpoint(self.store, self.job_id, "distill", step, str(path))
        return path


def distill(spec: DistillationRun, run_dir: str | Path) -> DistillResult:
    """A whole distillation without a job store: what trainer ranks > 0 run beside rank 0's `Distiller`."""
    return Distiller(spec, run_dir).train()
