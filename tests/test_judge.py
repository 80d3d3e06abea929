"""The policy as its own rubric judge: judging examples in SFT, judge quality per phase, self-judging GRPO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specialists.config import SpecialistJob
from specialists.domains import write_demo_data
from specialists.sft import OneKindBatches
from storage.specfile import SpecError, load_spec
from tests.conftest import REPO

JUDGED_RUBRIC = REPO / "configs/rubrics/instruct_judged.yaml"


def test_batches_hold_one_kind_each_cover_every_row_and_follow_seed_and_epoch() -> None:
    task, judging = list(range(70)), list(range(70, 95))
    sampler = OneKindBatches([task, judging], batch_size=8, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 72 + 32  # each part filled up to whole batches
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert all(set(b) <= set(task) or set(b) <= set(judging) for b in batches)
    assert set(order) == set(task) | set(judging)
    kinds = ["t" if b[0] < 70 else "j" for b in batches]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # the two kinds are interleaved
    assert list(OneKindBatches([task, judging], 8, 3)) == order  # the same seed and epoch: the same order
    sampler.set_epoch(1)
    assert list(sampler) != order


def instruct_spec(tmp_path: Path, base: Path, **overrides) -> dict:
    data = write_demo_data(tmp_path / "data", n_train=120, n_eval=10, n_rl=40)["instruct"]
    spec = {
        "kind": "specialist", "name": "instruct", "domain": "instruct", "base_model": str(base),
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                     "rl": str(data / "rl.jsonl")},
        "judging": {"rubric": str(JUDGED_RUBRIC), "train": str(data / "judge_train.jsonl"),
                    "eval": str(data / "judge_eval.jsonl"), "max_tokens": 16},
        "rewards": [{"name": "grm", "rubric": str(JUDGED_RUBRIC), "args": {"samples": 1, "max_tokens": 16}}],
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def test_demo_data_has_responses_to_judge_with_both_verdicts(tmp_path: Path) -> None:
    from grm.judging import judging_examples
    from grm.rubric import Rubric

    data = write_demo_data(tmp_path, n_train=600, n_eval=20)["instruct"]
    rubric = load_spec(Rubric, JUDGED_RUBRIC)
    train = [json.loads(line) for line in (data / "judge_train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (data / "judge_eval.jsonl").read_text().splitlines()]
    assert len(train) == 200 and len(held_out) == 40  # a third of train's prompts; two per held-out prompt
    eval_prompts = {json.loads(line)["prompt"] for line in (data / "eval.jsonl").read_text().splitlines()}
    assert {r["prompt"] for r in held_out} == eval_prompts and not {r["prompt"] for r in train} & eval_prompts
    verdicts = [e.completion for e in judging_examples(rubric, held_out)]
    assert 0.3 < verdicts.count("direct: 0") / len(verdicts) < 0.7  # near balanced: chance is one half


def test_the_judging_block_is_checked_where_it_is_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    import yaml

    spec = instruct_spec(tmp_path, tiny_model_dir)
    assert SpecialistJob.model_validate(spec).judging_rubric().name == "instruct-judged"
    programmatic = tmp_path / "programmatic.yaml"
    programmatic.write_text((REPO / "configs/rubrics/instruct_demo.yaml").read_text())
    spec["judging"]["rubric"] = str(programmatic)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError) as error:
        load_spec(SpecialistJob, path)
    assert "judging.rubric" in str(error.value) and "has no judge criteria" in str(error.value)


def test_sft_refuses_judging_examples_longer_than_its_max_length(tmp_path: Path, tiny_model_dir: Path) -> None:
    from specialists.sft import build_sft_trainer

    spec = SpecialistJob.model_validate(instruct_spec(tmp_path, tiny_model_dir, sft={"max_length": 64}))
    with pytest.raises(ValueError, match=r"longest judging example is \d+ tokens, more than sft.max_length \(64\)"):
        build_sft_trainer(spec, str(tiny_model_dir), tmp_path / "sft")
    spec = SpecialistJob.model_validate(instruct_spec(tmp_path, tiny_model_dir, sft={"max_length": 320}))
    trainer, _ = build_sft_trainer(spec, str(tiny_model_dir), tmp_path / "sft")
    flags = trainer.train_dataset["judging"]
    assert flags.count(True) == 40 and flags.count(False) == 120  # every judging example kept, none cut
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, OneKindBatches) and sorted(map(len, sampler.parts)) == [40, 120]


def test_self_judging_on_several_ranks_is_refused_at_the_reward(tmp_path: Path, tiny_model_dir: Path) -> None:
    import yaml

    spec = instruct_spec(tmp_path, tiny_model_dir, resources={"workers": 2}, rollout={"weight_sync": "path"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError) as error:
        load_spec(SpecialistJob, path)
    assert "job.yaml:17:3: rewards[0].args.judge:" in str(error.value)
    assert "judge: self needs the policy's engine in every trainer rank" in str(error.value)
    spec["rewards"][0]["args"]["judge"] = str(tiny_model_dir)  # a separate judge: every rank can load it
    assert SpecialistJob.model_validate(spec).resources.workers == 2


@pytest.mark.slow
def test_the_instruct_specialist_learns_to_judge_and_its_judge_is_not_fooled(retort_home: Path, store,
                                                                            vllm_engine) -> None:
    """The demo's instruct specialist with a judging block (configs/examples/instruct_self_judged.yaml, GRPO cut
    to 10 steps): the base cannot judge at all, the SFT model judges held-out responses as their programmatic truth
    does, GRPO judges with it every step, and responses built to fool it mostly fail to."""
    from controller.demo import CONFIGS, prepare
    from grm.reward import GRMReward
    from rollout.engine import HFEngine
    from specialists.job import run_specialist
    from storage import jobs
    from storage.db import run_home

    prepare(run_home())
    spec = load_spec(SpecialistJob, CONFIGS / "examples/instruct_self_judged.yaml")
    spec = spec.model_copy(update={"grpo": spec.grpo.model_copy(update={"max_steps": 10, "save_steps": 10})})
    job = jobs.submit(store, "specialist", spec.name, spec.model_dump(mode="json"))
    # the session's engine (the demo base has the tiny model's shape and tokenizer): a second in-process vLLM
    # engine in this process would leave the shared one unusable for the tests after this one
    run_specialist(spec, retort_home / "run", store=store, job_id=job.id, engine=vllm_engine)
    judge = json.loads((retort_home / "run" / "final.json").read_text())["judge"]
    assert judge["base"]["judge/parse_failure_rate"] == 1.0  # the untrained base writes no verdict at all
    for phase in ("sft", "grpo"):
        assert judge[phase]["judge/accuracy"] >= 0.9, judge
        assert judge[phase]["judge/parse_failure_rate"] <= 0.02, judge
        assert judge[phase]["judge/responses"] == 80 and judge[phase]["judge/tokens_per_response"] > 100
    logged = {m.name: m.value for m in jobs.get(store, job.id).metrics if m.phase == "grpo"}
    assert logged["grm/judged"] > 0 and logged["grm/parse_failure_rate"] <= 0.02  # GRPO's reward was judged

    from tests.test_grm import HACKS

    rubric = spec.judging_rubric()
    trained = GRMReward(rubric, HFEngine(str(retort_home / "run" / "sft" / "final")), samples=1, temperature=0.0,
                        max_tokens=16)
    hacks = [hack.replace("CAT", answer) for hack in HACKS for answer in ("CAT", "DOG DOG", "s-u-n")]
    judged = trained.judge(["Write the word cat in capital letters."] * len(hacks), hacks,
                           [{"answer": "CAT"}] * len(hacks))
    assert not any(j.parse_failed for j in judged)  # whatever the response says, the judge's verdict is read
    fooled = [h for h, j in zip(hacks, judged, strict=True) if j.judge_scores == {"direct": 10.0}]
    # each opens with a preamble: most are judged so whatever follows (the two-layer judge is fooled mostly by the
    # rubric's own line echoed, which its training never showed it; benchmarks/bench_judge.py counts them)
    assert len(fooled) <= len(hacks) // 2, fooled
