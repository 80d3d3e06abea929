"""The token write-ahead log: every generated token chunk, durable before it is trusted.

Why: a preempted rollout worker must resume each unfinished generation from its
last committed token. Regenerating interrupted samples from scratch would bias
training toward short answers (they finish before an interruption more often).

Format, version 2 — the one place it is described
-------------------------------------------------
A WAL is a directory of segment files ``00000001.wal``, ``00000002.wal``, … read
in name order. Each segment starts with an 8-byte header::

    magic  b"RWAL"  | version u16 LE | reserved u16 (0)

followed by records, each::

    length u32 LE | crc32c(payload) u32 LE | payload (length bytes)

and a payload starts with a type byte:

    1 TOKENS  id_len u16 | rollout_id utf-8 | seq_no u32 | policy_version u32 |
              n u32 | n × token id i32 | n × logprob f32          (all LE)
    2 FINISH  id_len u16 | rollout_id utf-8 | seq_no u32 | reason_len u8 | reason utf-8
    3 RESET   id_len u16 | rollout_id utf-8 | seq_no u32
              (forget the rollout's tokens so far: it restarts, e.g. after a policy change)
    4 STEP    policy_version u32 | k u32 | k × seq_no u32 | k × token id i32 | k × logprob f32 |
              k × id_len u16 | the k rollout ids utf-8, concatenated
              (version 2: one token for each of k rollouts, what one engine step produced; it
              means the same as k one-token TOKENS records and is written as one, with one CRC,
              since per-record Python work is most of what the WAL costs a rollout)

`seq_no` counts a rollout's records from 0. Recovery replays segments in order,
keeps the first record of each (rollout, seq_no) and ignores duplicates, and
stops at the first torn or corrupt record (short header, short payload, or bad
CRC): that segment is truncated there and any later segments are removed,
since their records may depend on the lost ones. A segment whose version is
newer than `FORMAT_VERSION` is refused, never guessed at; older versions are
read (version 1 is version 2 without STEP records), and a writer never appends to
an older segment: it starts a new one.

Commit policy: appended records wait in memory until a commit writes and
fsyncs them — ``every_record`` (each append), ``group`` (every `interval_ms`
or `max_records`, whichever first), or ``none`` (only on explicit commit()).
In ``group`` mode a background thread writes and fsyncs, so a slow disk does
not stall generation (fsyncs of 0.3 ms on an idle host added up to 0.38 s in one
256-rollout batch on a busy one); hand-offs that queue up behind a slow fsync go
out in one write.
`commit()` always waits until everything appended is durable. Only committed
records survive a SIGKILL; the writer reports what is committed.
"""

from __future__ import annotations

import os
import queue
import struct
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import crc32c
import numpy as np

if sys.byteorder != "little" or array("i").itemsize != 4:
    raise ImportError("the WAL's fast path assumes a little-endian machine with 4-byte C ints")

FORMAT_VERSION = 2
MAGIC = b"RWAL"
HEADER = struct.Struct("<4sHH")
RECORD_HEADER = struct.Struct("<II")
TOKENS, FINISH, RESET, STEP = 1, 2, 3, 4
_STEP_HEAD = struct.Struct("<BII")
_TOKENS_HEAD = struct.Struct("<BH")
_TOKENS_TAIL = struct.Struct("<III")
_ONE_TOKEN_TAIL = struct.Struct("<IIIif")  # the tail, one token id and its logprob: the common record
SEGMENT_SUFFIX = ".wal"


class WALError(RuntimeError):
    """A WAL that cannot be read: not a WAL, or written by a newer format version."""


@dataclass(frozen=True)
class CommitPolicy:
    """When appended records become durable (written and fsynced)."""

    mode: Literal["group", "every_record", "none"] = "group"
    interval_ms: float = 50.0
    max_records: int = 512


@dataclass
class TokenRecord:
    rollout_id: str
    seq_no: int
    policy_version: int
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class FinishRecord:
    rollout_id: str
    seq_no: int
    reason: str


@dataclass
class ResetRecord:
    rollout_id: str
    seq_no: int


@dataclass
class StepRecord:
    """One token for each of several rollouts (format version 2): the same as one-token TokenRecords."""

    rollout_ids: list[str]
    seq_nos: list[int]
    policy_version: int
    token_ids: list[int]
    logprobs: list[float]

    def records(self) -> list[TokenRecord]:
        return [TokenRecord(rid, seq, self.policy_version, [token], [logprob]) for rid, seq, token, logprob
                in zip(self.rollout_ids, self.seq_nos, self.token_ids, self.logprobs, strict=True)]


Record = TokenRecord | FinishRecord | ResetRecord | StepRecord


@dataclass
class RolloutLog:
    """Everything committed for one rollout, in order."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)  # one per token
    next_seq: int = 0
    finish_reason: str | None = None


@dataclass
class RecoveryReport:
    """What recovery found and what it had to drop."""

    records: int = 0
    duplicates: int = 0
    truncated_segment: str | None = None
    truncated_at: int | None = None
    dropped_bytes: int = 0
    dropped_segments: list[str] = field(default_factory=list)
    reason: str | None = None

    @property
    def clean(self) -> bool:
        return self.truncated_segment is None and not self.dropped_segments


def encode_tokens(rec: TokenRecord) -> bytes:
    rid = rec.rollout_id.encode()
    n = len(rec.token_ids)
    if len(rec.logprobs) != n:
        raise ValueError(f"{n} tokens but {len(rec.logprobs)} logprobs for rollout {rec.rollout_id}")
    return b"".join((
        struct.pack(f"<BH{len(rid)}sIII", TOKENS, len(rid), rid, rec.seq_no, rec.policy_version, n),
        struct.pack(f"<{n}i", *rec.token_ids),
        struct.pack(f"<{n}f", *rec.logprobs),
    ))


def encode_finish(rec: FinishRecord) -> bytes:
    rid, reason = rec.rollout_id.encode(), rec.reason.encode()[:255]
    return struct.pack(f"<BH{len(rid)}sIB{len(reason)}s", FINISH, len(rid), rid, rec.seq_no, len(reason), reason)


def encode_step(keys: Sequence[bytes], seq_nos: Sequence[int], policy_version: int, token_ids: Sequence[int],
                logprobs: Sequence[float]) -> bytes:
    """A STEP payload from encoded rollout ids and the columns (lists or numpy arrays)."""
    k = len(keys)
    if not len(seq_nos) == len(token_ids) == len(logprobs) == k:
        raise ValueError(f"a STEP record needs one seq_no, token and logprob per rollout ({k} rollouts)")
    return b"".join((
        _STEP_HEAD.pack(STEP, policy_version, k),
        np.asarray(seq_nos, dtype="<u4").tobytes(),
        np.asarray(token_ids, dtype="<i4").tobytes(),
        np.asarray(logprobs, dtype="<f4").tobytes(),
        array("H", [len(key) for key in keys]).tobytes(),
        b"".join(keys),
    ))


def decode_step(payload: bytes) -> StepRecord:
    _, version, k = _STEP_HEAD.unpack_from(payload)
    offset = _STEP_HEAD.size
    seq_nos = np.frombuffer(payload, "<u4", k, offset).tolist()
    tokens = np.frombuffer(payload, "<i4", k, offset + 4 * k).tolist()
    logprobs = np.frombuffer(payload, "<f4", k, offset + 8 * k).tolist()
    lengths = np.frombuffer(payload, "<u2", k, offset + 12 * k).tolist()
    ids, start = [], offset + 14 * k
    for length in lengths:
        ids.append(payload[start:start + length].decode())
        start += length
    return StepRecord(ids, seq_nos, version, tokens, logprobs)


def encode(rec: Record) -> bytes:
    if isinstance(rec, TokenRecord):
        return encode_tokens(rec)
    if isinstance(rec, StepRecord):
        return encode_step([rid.encode() for rid in rec.rollout_ids], rec.seq_nos, rec.policy_version,
                           rec.token_ids, rec.logprobs)
    if isinstance(rec, FinishRecord):
        return encode_finish(rec)
    rid = rec.rollout_id.encode()
    return struct.pack(f"<BH{len(rid)}sI", RESET, len(rid), rid, rec.seq_no)


def decode(payload: bytes) -> Record:
    if payload[0] == STEP:
        return decode_step(payload)
    kind, id_len = struct.unpack_from("<BH", payload)
    offset = 3
    rid = payload[offset:offset + id_len].decode()
    offset += id_len
    if kind == TOKENS:
        seq_no, version, n = struct.unpack_from("<III", payload, offset)
        offset += 12
        tokens = list(struct.unpack_from(f"<{n}i", payload, offset))
        logprobs = list(struct.unpack_from(f"<{n}f", payload, offset + 4 * n))
        return TokenRecord(rid, seq_no, version, tokens, logprobs)
    if kind == FINISH:
        seq_no, reason_len = struct.unpack_from("<IB", payload, offset)
        reason = payload[offset + 5:offset + 5 + reason_len].decode()
        return FinishRecord(rid, seq_no, reason)
    if kind == RESET:
        (seq_no,) = struct.unpack_from("<I", payload, offset)
        return ResetRecord(rid, seq_no)
    raise ValueError(f"unknown record type {kind}")


def frame(payload: bytes) -> bytes:
    return RECORD_HEADER.pack(len(payload), crc32c.crc32c(payload)) + payload


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEGMENT_SUFFIX}"))


def _check_header(path: Path, data: bytes) -> None:
    if len(data) < HEADER.size or data[:4] != MAGIC:
        raise WALError(f"{path} is not a Retort WAL segment (bad magic); is {path.parent} a WAL directory?")
    _, version, _ = HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise WALError(
            f"{path} was written in WAL format version {version}; this Retort reads up to version "
            f"{FORMAT_VERSION}. Upgrade Retort to resume this run."
        )


def check_directory(directory: str | Path) -> None:
    """Raise WALError unless `directory` looks like a WAL this version can read (cheap: headers only)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WALError(f"{directory} is not a directory, so it holds no WAL")
    files = segments(directory)
    stray = [p.name for p in directory.iterdir() if p.is_file() and p.suffix not in (SEGMENT_SUFFIX, ".tmp")]
    if stray and not files:
        raise WALError(f"{directory} is not a WAL directory: it holds {', '.join(sorted(stray)[:3])} and no segments")
    for path in files:
        with open(path, "rb") as f:
            _check_header(path, f.read(HEADER.size))


def recover(directory: str | Path) -> tuple[dict[str, RolloutLog], RecoveryReport]:
    """Replay a WAL directory: the committed state of every rollout, and what was dropped.

    Truncates a torn tail in place so the writer can append after it.
    """
    directory = Path(directory)
    check_directory(directory)
    logs: dict[str, RolloutLog] = {}
    report = RecoveryReport()
    files = segments(directory)
    for i, path in enumerate(files):
        data = path.read_bytes()
        _check_header(path, data)
        offset = HEADER.size
        while offset < len(data):
            bad = None
            if offset + RECORD_HEADER.size > len(data):
                bad = "torn record header"
            else:
                length, crc = RECORD_HEADER.unpack_from(data, offset)
                start = offset + RECORD_HEADER.size
                payload = data[start:start + length]
                if len(payload) < length:
                    bad = "torn record payload"
                elif crc32c.crc32c(payload) != crc:
                    bad = "CRC mismatch"
            if bad:
                report.truncated_segment, report.truncated_at, report.reason = path.name, offset, bad
                report.dropped_bytes += len(data) - offset
                with open(path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                for later in files[i + 1:]:
                    report.dropped_bytes += later.stat().st_size
                    report.dropped_segments.append(later.name)
                    later.unlink()
                return logs, report
            _apply(logs, decode(payload), report)
            offset = start + length
    return logs, report


def _apply(logs: dict[str, RolloutLog], record: Record, report: RecoveryReport) -> None:
    if isinstance(record, StepRecord):
        for one in record.records():
            _apply(logs, one, report)
        return
    log = logs.setdefault(record.rollout_id, RolloutLog())
    if record.seq_no < log.next_seq:
        report.duplicates += 1
        return
    report.records += 1
    log.next_seq = record.seq_no + 1
    if isinstance(record, TokenRecord):
        log.token_ids.extend(record.token_ids)
        log.logprobs.extend(record.logprobs)
        log.policy_versions.extend([record.policy_version] * len(record.token_ids))
    elif isinstance(record, FinishRecord):
        log.finish_reason = record.reason
    else:
        log.token_ids.clear()
        log.logprobs.clear()
        log.policy_versions.clear()
        log.finish_reason = None


class WALWriter:
    """Appends records to the newest segment, rotating at `segment_bytes`, committing per `policy`."""

    def __init__(self, directory: str | Path, policy: CommitPolicy | None = None, segment_bytes: int = 64 << 20):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.policy = policy or CommitPolicy()
        self.segment_bytes = segment_bytes
        self._pending: list[bytes] = []
        self._prefixes: dict[bytes, bytes] = {}  # rollout id → its encoded TOKENS record prefix
        self._last_commit = time.monotonic()
        self.committed_records = 0
        self.commits = 0
        existing = segments(self.directory)
        self._file = None
        if existing:
            data = existing[-1].read_bytes()[:HEADER.size]
            _check_header(existing[-1], data)
            if HEADER.unpack_from(data)[1] == FORMAT_VERSION:
                self._open(existing[-1], new=False)
            else:  # an older format's segment stays as it is; new records go to a new one
                self._open(self._segment_path(int(existing[-1].stem) + 1), new=True)
        else:
            self._open(self._segment_path(1), new=True)
        self._error: BaseException | None = None
        self._in_flight = 0  # blobs handed to the committer thread, not yet durable
        self._idle = threading.Condition()
        self._queue: queue.SimpleQueue[tuple[bytes, int] | None] | None = None
        if self.policy.mode == "group":
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._commit_loop, name="wal-commit", daemon=True)
            self._thread.start()

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{number:08d}{SEGMENT_SUFFIX}"

    def _open(self, path: Path, new: bool) -> None:
        self._path = path
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the writer's lifetime, closed in close()
        if new:
            self._file.write(HEADER.pack(MAGIC, FORMAT_VERSION, 0))
            self._file.flush()
            os.fsync(self._file.fileno())
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new file's name must survive a crash too
            finally:
                os.close(dir_fd)
        self._size = self._file.tell()

    def append(self, record: Record) -> None:
        self._pending.append(frame(encode(record)))
        self.maybe_commit()

    def append_tokens(self, rollout_id: bytes, seq_no: int, policy_version: int, token_ids: list[int],
                      logprobs: list[float]) -> None:
        """The hot path: one TOKENS record from raw fields, without building a TokenRecord.

        Call `maybe_commit()` once per engine step rather than per record.
        """
        prefix = self._prefixes.get(rollout_id)
        if prefix is None:
            prefix = self._prefixes[rollout_id] = _TOKENS_HEAD.pack(TOKENS, len(rollout_id)) + rollout_id
        n = len(token_ids)
        if n == 1:  # one token per engine step is the usual case: one pack instead of three
            payload = prefix + _ONE_TOKEN_TAIL.pack(seq_no, policy_version, 1, token_ids[0], logprobs[0])
        else:
            payload = b"".join((prefix, _TOKENS_TAIL.pack(seq_no, policy_version, n),
                                array("i", token_ids).tobytes(), array("f", logprobs).tobytes()))
        self._pending.append(RECORD_HEADER.pack(len(payload), crc32c.crc32c(payload)) + payload)

    def append_step(self, keys: Sequence[bytes], seq_nos: Sequence[int], policy_version: int,
                    token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """The hottest path: one STEP record for one token of each of `keys` (encoded rollout ids).

        Columns may be lists or numpy arrays. Call `maybe_commit()` once per engine step.
        """
        self._pending.append(frame(encode_step(keys, seq_nos, policy_version, token_ids, logprobs)))

    def maybe_commit(self) -> None:
        """Commit if the policy says it is time (in group mode: hand the records to the committer thread)."""
        policy = self.policy
        if policy.mode == "every_record":
            self.commit()
        elif policy.mode == "group" and (
            len(self._pending) >= policy.max_records
            or (time.monotonic() - self._last_commit) * 1000 >= policy.interval_ms
        ):
            self._hand_off()

    def extend(self, records: Iterable[Record]) -> None:
        for record in records:
            self.append(record)

    def commit(self) -> None:
        """Write and fsync every pending record; after this they survive SIGKILL and power loss."""
        if self._queue is None:
            if self._pending:
                self._write(b"".join(self._pending), len(self._pending))
                self._pending.clear()
            self._last_commit = time.monotonic()
            return
        self._hand_off()
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)
        self._raise_if_failed()

    def _hand_off(self) -> None:
        self._raise_if_failed()
        if self._pending:
            with self._idle:
                self._in_flight += 1
            self._queue.put((b"".join(self._pending), len(self._pending)))
            self._pending.clear()
        self._last_commit = time.monotonic()

    def _commit_loop(self) -> None:
        """The committer thread: write and fsync what was handed off, several hand-offs at a time."""
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            blobs = [item for item in batch if item is not None]
            if blobs:
                try:
                    if self._error is None:
                        self._write(b"".join(blob for blob, _ in blobs), sum(n for _, n in blobs))
                except BaseException as error:  # re-raised in the appending thread
                    self._error = error
                with self._idle:
                    self._in_flight -= len(blobs)
                    self._idle.notify_all()
            if len(blobs) < len(batch):  # close() asked the thread to stop
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WALError(f"writing the WAL in {self.directory} failed: {self._error}") from self._error

    def _write(self, blob: bytes, records: int) -> None:
        if self._size + len(blob) > self.segment_bytes and self._size > HEADER.size:
            self._file.close()
            self._open(self._segment_path(int(self._path.stem) + 1), new=True)
        self._file.write(blob)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._size += len(blob)
        self.committed_records += records
        self.commits += 1

    def reset(self) -> None:
        """Drop every record and stay open: all of this WAL's rollouts are finished and their results stored.

        The segment is truncated to its header (older ones removed) rather than deleted and a new one created
        and fsynced for the next batch. Records not yet written are dropped, not committed: the stored results
        hold them. No fsync either: if the truncation were lost in a crash, the records it dropped belong to
        finished batches, whose stored results `run_or_resume` returns and whose records recovery never
        resumes (records are keyed by batch, and batch names are not reused)."""
        self._pending.clear()
        if self._queue is not None:
            with self._idle:
                self._idle.wait_for(lambda: self._in_flight == 0)
        self._raise_if_failed()
        self._file.truncate(HEADER.size)  # opened for appending: later writes go to the new end
        self._size = HEADER.size
        self._prefixes.clear()
        for path in segments(self.directory):
            if path != self._path:
                path.unlink()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self.commit()
            finally:
                if self._queue is not None:
                    self._queue.put(None)
                    self._thread.join()
                self._file.close()

    def __enter__(self) -> WALWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compact(directory: str | Path, drop: Sequence[str] | set[str]) -> int:
    """Rewrite the WAL without the rollouts in `drop` (finished and stored); returns records kept.

    The survivors go to a new segment that is fsynced and renamed into place
    before the old segments are removed, so a crash mid-compaction loses nothing.
    """
    directory = Path(directory)
    drop = set(drop)
    old = segments(directory)
    kept: list[bytes] = []
    for path in old:
        data = path.read_bytes()
        _check_header(path, data)
        offset = HEADER.size
        while offset + RECORD_HEADER.size <= len(data):
            length, crc = RECORD_HEADER.unpack_from(data, offset)
            payload = data[offset + RECORD_HEADER.size: offset + RECORD_HEADER.size + length]
            if len(payload) < length or crc32c.crc32c(payload) != crc:
                break
            if payload[0] == STEP:  # keep the entries of live rollouts, re-encoded
                step = decode_step(payload)
                live = [i for i, rid in enumerate(step.rollout_ids) if rid not in drop]
                if len(live) == len(step.rollout_ids):
                    kept.append(data[offset:offset + RECORD_HEADER.size + length])
                elif live:
                    kept.append(frame(encode(StepRecord(
                        [step.rollout_ids[i] for i in live], [step.seq_nos[i] for i in live], step.policy_version,
                        [step.token_ids[i] for i in live], [step.logprobs[i] for i in live]))))
            else:
                (id_len,) = struct.unpack_from("<H", payload, 1)
                if payload[3:3 + id_len].decode() not in drop:
                    kept.append(data[offset:offset + RECORD_HEADER.size + length])
            offset += RECORD_HEADER.size + length
    number = int(old[-1].stem) + 1 if old else 1
    final = directory / f"{number:08d}{SEGMENT_SUFFIX}"
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, FORMAT_VERSION, 0))
        f.write(b"".join(kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for path in old:
        path.unlink()
    return len(kept)
