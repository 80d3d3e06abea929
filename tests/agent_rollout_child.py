"""One agent rollout run in its own process, for tests/test_agent_preemption.py to SIGKILL and run again.

    python -m tests.agent_rollout_child MODEL PROMPTS RUN_DIR

Every turn goes through the run directory's WAL-backed rollout service (batch ``agent``) and every tool call
through its trajectory log, so running the same command again after a kill resumes the trajectories where they
were. Each python call that finished is also written, with this process's id and its body, to
RUN_DIR/executions.txt (fsynced once the sandbox answered, before the trajectory log is): the test's count of
how often each call really ran. The finished trajectories go to
RUN_DIR/trajectories.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class CountedTools:
    """The real tools, with every finished execution appended to a file before its answer is handed on."""

    def __init__(self, inner, path: Path) -> None:
        self.inner, self.file = inner, path.open("a")

    def run(self, calls, on_result=None):
        def answered(i, result):
            self.file.write(json.dumps([os.getpid(), calls[i].body]) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            if on_result is not None:
                on_result(i, result)

        return self.inner.run(calls, answered)


def main(model: str, prompts: str, run_dir: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer

    from rewards.tools import ToolBox, ToolRef
    from rollout.agent import AgentRequest, TrajectoryLog, run_agent
    from rollout.engine import VLLMEngine
    from rollout.service import RolloutService
    from rollout.wal import CommitPolicy

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    requests = [AgentRequest(f"a{i}", row["prompt"], seed=i) for i, row in enumerate(rows)]
    tokenizer = AutoTokenizer.from_pretrained(model)
    service = RolloutService(VLLMEngine(model, enforce_eager=True, max_model_len=512), run,
                             commit=CommitPolicy("group", 10.0, 64))
    tools = CountedTools(ToolBox([ToolRef(name="python", args={"timeout_s": 10.0})], max_concurrency=2),
                         run / "executions.txt")
    log = TrajectoryLog(run / "calls.jsonl")
    trajectories = run_agent(service, tokenizer, requests, tools, log, max_turns=3, max_tokens=200, turn_tokens=64,
                             temperature=0.0, batch="agent")
    (run / "trajectories.json").write_text(json.dumps([
        {"id": t.id, "token_ids": t.token_ids, "model_mask": t.model_mask, "answer": t.answer,
         "finish_reason": t.finish_reason, "calls": [call.body for call, _ in t.calls]} for t in trajectories]))


if __name__ == "__main__":
    main(*sys.argv[1:4])
