"""Where Retort keeps its state, and how to open the job store.

The run home (``$RETORT_HOME``, default ``~/.retort``) holds the SQLite database
and every run's artifacts. Set ``RETORT_DB_URL`` (e.g.
``postgresql+psycopg://user@host/retort``) to share one PostgreSQL database
between machines instead. Opening a store brings its schema up to date with
Alembic, so an older database is upgraded in place.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def run_home() -> Path:
    """The directory for the database and run artifacts (``$RETORT_HOME`` or ``~/.retort``)."""
    return Path(os.environ.get("RETORT_HOME") or Path.home() / ".retort").expanduser()


def run_dir(kind: str, name: str) -> Path:
    """Where one run's artifacts live: ``<home>/runs/<kind>/<name>``."""
    return run_home() / "runs" / kind / name


def database_url() -> str:
    """``$RETORT_DB_URL`` if set, else a SQLite file in the run home."""
    url = os.environ.get("RETORT_DB_URL")
    if url:
        return url
    home = run_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'retort.db'}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (`retort status`) run beside a writer; the busy timeout makes
    # concurrent writers wait for the lock instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode, NORMAL syncs at checkpoints instead of every commit: a killed process loses nothing (its
    # writes are in the OS page cache), a power cut may lose the last commits but never corrupts the file. A
    # distillation step commits its metrics and its rollout batch, and FULL made each commit wait for the disk.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL journaling and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest revision; a no-op when it is already there."""
    config = _alembic_config()
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as connection:
        if MigrationContext.configure(connection).get_current_revision() == head:
            return
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@dataclass
class Store:
    """An open job store: the engine plus a session factory."""

    engine: Engine
    sessions: sessionmaker[Session]

    def session(self) -> Session:
        return self.sessions()


def open_store(url: str | None = None) -> Store:
    """Open (and migrate) the job store at `url`, or at `database_url()` when none is given."""
    engine = make_engine(url or database_url())
    migrate(engine)
    return Store(engine, sessionmaker(engine, expire_on_commit=False))


class BackgroundWrites:
    """Job-store writes a training loop does not wait for (its metrics, its rollout batches' rows), applied in
    order by one thread. A step's own work does not depend on them; `flush()` waits for them all (before a
    checkpoint row, and when the loop ends) and re-raises the first that failed."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict] | threading.Event | None] = \
            queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="store-writes", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._raise_if_failed()
        self._queue.put((write, args, kwargs))

    def flush(self, *, raise_errors: bool = True) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait()
        if raise_errors:
            self._raise_if_failed()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):  # a flush: everything before it is written
                item.set()
            elif self._error is None:  # after a failure the rest is dropped; flush() reports it
                write, args, kwargs = item
                try:
                    write(*args, **kwargs)
                except BaseException as error:  # re-raised in the loop's thread
                    self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"a job-store write failed: {self._error}") from self._error
