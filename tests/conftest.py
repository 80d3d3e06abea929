"""Shared fixtures: one tiny model and one vLLM engine per test session, a fresh job store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on CPU: keep the engine in this process (no spawn under pytest) and its KV cache small.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; torch.cuda.is_available() is false")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama base model, built once per test session."""
    from specialists.base_model import init_base_model

    return init_base_model(tmp_path_factory.mktemp("tiny-base"), seed=0)


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path):
    """One in-process vLLM engine on the tiny model for the whole session (startup is ~20 s)."""
    from rollout.engine import VLLMEngine

    return VLLMEngine(str(tiny_model_dir), max_model_len=2048, enforce_eager=True)


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir: Path):
    from rollout.engine import HFEngine

    return HFEngine(str(tiny_model_dir), max_model_len=2048)


@pytest.fixture(scope="session")
def agent_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """The tiny model after a short SFT on the demo's agent domain, which writes python calls (not always the
    right ones), and the directory of that domain's train, rl and eval prompts."""
    from specialists.config import SpecialistJob
    from specialists.domains import write_demo_data
    from specialists.sft import run_sft

    out = tmp_path_factory.mktemp("agent-model")
    data = write_demo_data(out / "data", n_train=1000, n_eval=12, n_rl=64)["agent"]
    spec = SpecialistJob.model_validate({
        "kind": "specialist", "name": "agent", "domain": "agent", "base_model": str(tiny_model_dir), "seed": 0,
        "datasets": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "sft": {"max_steps": 150, "batch_size": 32, "max_length": 160, "learning_rate": 3e-3, "warmup_ratio": 0.05,
                "save_steps": 100_000, "gradient_checkpointing": False},
        "grpo": {"enabled": False}, "rewards": [{"name": "math"}], "tools": [{"name": "python"}]})
    return Path(run_sft(spec, str(tiny_model_dir), out / "sft")), data


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole test session (2 CPUs, as on the dev machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def retort_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private run home (database, artifacts) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("RETORT_HOME", str(home))
    monkeypatch.delenv("RETORT_DB_URL", raising=False)
    return home


@pytest.fixture
def store(retort_home: Path):
    from storage.db import open_store

    store = open_store()
    yield store
    store.engine.dispose()


def _empty_postgres(url: str) -> None:
    """Drop every table (and Alembic's version row) so each test starts from a new schema."""
    from sqlalchemy import MetaData, create_engine

    engine = create_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    metadata.drop_all(engine)
    engine.dispose()


def _fresh_postgres() -> str | None:
    """RETORT_TEST_PG_URL's database with every table dropped, or None where it is not set."""
    url = os.environ.get("RETORT_TEST_PG_URL")
    if url:
        _empty_postgres(url)
    return url


def _opened_store(url: str):
    from storage.db import open_store

    store = open_store(url)
    yield store
    store.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh job-store database: a SQLite file, and PostgreSQL when RETORT_TEST_PG_URL is set (CI sets it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url = _fresh_postgres()
    if not url:
        pytest.skip("RETORT_TEST_PG_URL is not set (.ci/postgres.sh starts a server and prints it)")
    return url


@pytest.fixture
def any_store(db_url: str):
    yield from _opened_store(db_url)


@pytest.fixture
def run_db_url(tmp_path: Path) -> str:
    """The one database an end-to-end run (minutes) uses: PostgreSQL where RETORT_TEST_PG_URL names a server
    (CI), else SQLite. Each store operation is checked on both by the `db_url` tests; `retort demo` runs on
    SQLite."""
    return _fresh_postgres() or f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def run_store(run_db_url: str):
    yield from _opened_store(run_db_url)
