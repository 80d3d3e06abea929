"""The token WAL: round trips, group commit, rotation, torn and corrupt tails, versions, compaction, SIGKILL."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
from pathlib import Path

import pytest

from rollout import wal
from rollout.wal import CommitPolicy, FinishRecord, ResetRecord, StepRecord, TokenRecord, WALError, WALWriter, recover


def tokens(rid: str, seq: int, n: int = 3, version: int = 0) -> TokenRecord:
    return TokenRecord(rid, seq, version, [seq * 10 + i for i in range(n)], [-0.5 * i for i in range(n)])


def test_round_trip_and_duplicates(tmp_path: Path) -> None:
    with WALWriter(tmp_path, CommitPolicy("none")) as writer:
        writer.extend([tokens("a", 0), tokens("b", 0, version=2), tokens("a", 1), tokens("a", 1, n=5),
                       FinishRecord("a", 2, "stop")])
        writer.append_tokens(b"b", 1, 3, [7, 8], [-1.0, -2.0])
    logs, report = recover(tmp_path)
    assert logs["a"].token_ids == [0, 1, 2, 10, 11, 12]  # the second seq 1 is a duplicate: ignored
    assert logs["a"].finish_reason == "stop" and logs["b"].finish_reason is None
    assert logs["b"].token_ids == [0, 1, 2, 7, 8] and logs["b"].policy_versions == [2, 2, 2, 3, 3]
    assert logs["b"].logprobs == [0.0, -0.5, -1.0, -1.0, -2.0]
    assert (report.records, report.duplicates, report.clean) == (5, 1, True)


@pytest.mark.parametrize("n", [1, 3])
def test_append_tokens_writes_the_bytes_append_would(tmp_path: Path, n: int) -> None:
    record = tokens("step-1:7", 4, n=n, version=9)
    fast, slow = WALWriter(tmp_path / "fast", CommitPolicy("none")), WALWriter(tmp_path / "slow", CommitPolicy("none"))
    for _ in range(2):  # the second time from the cached prefix
        fast.append_tokens(record.rollout_id.encode(), record.seq_no, 9, record.token_ids, record.logprobs)
        slow.append(record)
    assert fast._pending == slow._pending


def test_a_step_record_means_one_token_record_per_rollout(tmp_path: Path) -> None:
    step = StepRecord(["b:x", "b:yy", "b:é"], [0, 5, 2], 3, [11, 12, 13], [-0.25, -1.5, 0.0])
    assert wal.decode(wal.encode(step)) == step
    with WALWriter(tmp_path / "step", CommitPolicy("none")) as writer:
        writer.append(tokens("b:yy", 4, n=2))
        writer.append_step([b"b:x", b"b:yy", "b:é".encode()], [0, 5, 2], 3, [11, 12, 13], [-0.25, -1.5, 0.0])
        writer.append_step([b"b:x"], [0], 3, [99], [-9.0])  # a duplicate of x's seq 0: ignored
    logs, report = recover(tmp_path / "step")
    assert logs["b:yy"].token_ids == [40, 41, 12] and logs["b:yy"].policy_versions == [0, 0, 3]
    assert logs["b:x"].token_ids == [11] and logs["b:x"].logprobs == [-0.25] and logs["b:x"].next_seq == 1
    assert logs["b:é"].next_seq == 3 and report.duplicates == 1
    with WALWriter(tmp_path / "records", CommitPolicy("none")) as writer:
        writer.extend([tokens("b:yy", 4, n=2), *step.records()])
    expected = recover(tmp_path / "records")[0]
    assert logs == expected


def test_compaction_keeps_the_live_entries_of_a_step(tmp_path: Path) -> None:
    with WALWriter(tmp_path) as writer:
        writer.append_step([b"done", b"live"], [0, 0], 1, [1, 2], [-1.0, -2.0])
        writer.append_step([b"live"], [1], 1, [3], [-3.0])
        writer.append_step([b"done"], [1], 1, [4], [-4.0])
        writer.append(FinishRecord("done", 2, "stop"))
    assert wal.compact(tmp_path, {"done"}) == 2
    logs, report = recover(tmp_path)
    assert set(logs) == {"live"} and logs["live"].token_ids == [2, 3] and logs["live"].logprobs == [-2.0, -3.0]
    assert report.clean


def test_a_writer_does_not_append_to_an_older_format_segment(tmp_path: Path) -> None:
    body = wal.frame(wal.encode(tokens("a", 0)))
    (tmp_path / "00000001.wal").write_bytes(wal.HEADER.pack(wal.MAGIC, 1, 0) + body)
    with WALWriter(tmp_path) as writer:
        writer.append_step([b"a"], [1], 0, [7], [-1.0])
    assert [p.name for p in wal.segments(tmp_path)] == ["00000001.wal", "00000002.wal"]
    assert (tmp_path / "00000001.wal").read_bytes()[8:] == body
    assert recover(tmp_path)[0]["a"].token_ids == [0, 1, 2, 7]


def test_group_commit_goes_on_without_blocking_and_reports_failures(tmp_path: Path) -> None:
    writer = WALWriter(tmp_path, CommitPolicy("group", interval_ms=0.0))
    for seq in range(200):  # every append hands off a commit; the thread coalesces what queues up
        writer.append(tokens("a", seq))
    writer.commit()
    assert writer.committed_records == 200 and writer.commits <= 200
    assert recover(tmp_path)[0]["a"].next_seq == 200
    writer._file.close()  # the disk "fails": the next write raises in the committer thread
    writer.append(tokens("a", 200))
    with pytest.raises(WALError, match=f"writing the WAL in {tmp_path} failed"):
        writer.commit()


def test_reset_forgets_a_rollout(tmp_path: Path) -> None:
    with WALWriter(tmp_path) as writer:
        writer.extend([tokens("a", 0), ResetRecord("a", 1), tokens("a", 2, n=1, version=1)])
    logs, _ = recover(tmp_path)
    assert logs["a"].token_ids == [20] and logs["a"].policy_versions == [1]


def test_group_commit_policy(tmp_path: Path) -> None:
    writer = WALWriter(tmp_path / "g", CommitPolicy("group", interval_ms=60_000, max_records=3))
    writer.extend([tokens("a", 0), tokens("a", 1)])
    assert recover(tmp_path / "g")[0] == {}  # pending, not yet durable
    writer.append(tokens("a", 2))  # the third record triggers the commit, in the committer thread
    writer.commit()  # waits for it; nothing new is pending
    assert len(recover(tmp_path / "g")[0]["a"].token_ids) == 9
    assert writer.commits == 1 and writer.committed_records == 3
    every = WALWriter(tmp_path / "e", CommitPolicy("every_record"))
    every.append(tokens("a", 0))
    assert recover(tmp_path / "e")[0]["a"].next_seq == 1 and every.commits == 1
    timed = WALWriter(tmp_path / "t", CommitPolicy("group", interval_ms=0.0))
    timed.append(tokens("a", 0))
    timed.commit()
    assert timed.commits == 1


def test_rotation_spans_segments(tmp_path: Path) -> None:
    with WALWriter(tmp_path, CommitPolicy("every_record"), segment_bytes=200) as writer:
        for seq in range(20):
            writer.append(tokens("a", seq))
    assert len(wal.segments(tmp_path)) > 3
    logs, report = recover(tmp_path)
    assert logs["a"].next_seq == 20 and report.clean


def test_torn_tail_is_truncated_and_appendable(tmp_path: Path) -> None:
    with WALWriter(tmp_path) as writer:
        for seq in range(5):
            writer.append(tokens("a", seq))
    [segment] = wal.segments(tmp_path)
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 7)  # a write cut short by a crash
    logs, report = recover(tmp_path)
    assert logs["a"].next_seq == 4 and len(logs["a"].token_ids) == 12
    assert report.reason == "torn record payload" and report.truncated_segment == segment.name
    assert report.dropped_bytes > 0 and not report.clean
    with WALWriter(tmp_path) as writer:  # the writer continues after the cut
        writer.append(tokens("a", 4))
    logs, report = recover(tmp_path)
    assert logs["a"].next_seq == 5 and report.clean


def test_bad_crc_drops_the_rest_and_later_segments(tmp_path: Path) -> None:
    with WALWriter(tmp_path, CommitPolicy("every_record"), segment_bytes=150) as writer:
        for seq in range(12):
            writer.append(tokens("a", seq))
    files = wal.segments(tmp_path)
    victim = files[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # flip a bit inside the last record of the second segment
    victim.write_bytes(bytes(data))
    good_before = sum(1 for _ in _records(files[0])) + sum(1 for _ in _records(victim)) - 1
    logs, report = recover(tmp_path)
    assert report.reason == "CRC mismatch" and report.truncated_segment == victim.name
    assert report.dropped_segments == [p.name for p in files[2:]]
    assert logs["a"].next_seq == good_before
    assert wal.segments(tmp_path) == files[:2]


def _records(path: Path):
    data = path.read_bytes()
    offset = wal.HEADER.size
    while offset < len(data):
        length, _ = struct.unpack_from("<II", data, offset)
        yield data[offset + 8: offset + 8 + length]
        offset += 8 + length


def test_newer_format_and_foreign_directories_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "00000001.wal").write_bytes(wal.HEADER.pack(wal.MAGIC, wal.FORMAT_VERSION + 1, 0))
    newest = wal.FORMAT_VERSION
    with pytest.raises(WALError, match=f"format version {newest + 1}; this Retort reads up to version {newest}"):
        recover(newer)
    with pytest.raises(WALError, match=f"format version {newest + 1}"):
        WALWriter(newer)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(WALError, match="is not a WAL directory"):
        recover(foreign)
    (foreign / "00000001.wal").write_bytes(b"garbage!")
    with pytest.raises(WALError, match="not a Retort WAL segment"):
        recover(foreign)
    with pytest.raises(WALError, match="is not a directory"):
        recover(tmp_path / "missing")


def test_compaction_drops_finished_rollouts(tmp_path: Path) -> None:
    with WALWriter(tmp_path, segment_bytes=120) as writer:
        for seq in range(4):
            writer.extend([tokens("done", seq), tokens("live", seq)])
        writer.append(FinishRecord("done", 4, "stop"))
    before, _ = recover(tmp_path)
    kept = wal.compact(tmp_path, {"done"})
    after, report = recover(tmp_path)
    assert kept == 4 and set(after) == {"live"} and report.clean
    assert after["live"] == before["live"]
    assert len(wal.segments(tmp_path)) == 1
    with WALWriter(tmp_path) as writer:  # appending after compaction goes on in the new segment
        writer.append(tokens("live", 4))
    assert recover(tmp_path)[0]["live"].next_seq == 5


def _write_until_killed(directory: str, pipe) -> None:  # child process
    with WALWriter(directory, CommitPolicy("group", interval_ms=1.0, max_records=7)) as writer:
        seq = 0
        while True:
            writer.append(tokens("r", seq, n=2))
            if writer.committed_records:
                pipe.send(writer.committed_records)
            seq += 1


def test_nothing_committed_is_lost_on_sigkill(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_write_until_killed, args=(str(tmp_path), child))
    proc.start()
    committed = 0
    while committed < 2000:
        committed = parent.recv()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    while parent.poll():
        committed = parent.recv()
    logs, _ = recover(tmp_path)
    assert logs["r"].next_seq >= committed  # every record reported committed survived
    assert logs["r"].token_ids[:6] == [0, 1, 10, 11, 20, 21]
