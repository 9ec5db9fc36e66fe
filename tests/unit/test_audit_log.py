"""The audit trail's storage, as an operator or an auditor meets it: restarts, crashes,
retention, concurrent writers, and tampering named one problem at a time.

``test_audit_chain.py`` holds the first checks of each kind of tampering on one segment; these
go across segments and restarts (a real SIGKILL: ``tests/gateway/test_audit_crash.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serving.storage.audit_chain import (
    CHECKPOINTS,
    AuditLog,
    AuditLogError,
    purge,
    read_records,
)
from serving.storage.audit_verify import verify

KEY = Ed25519PrivateKey.generate()
TS = "2026-11-23T10:00:00.000Z"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(i: int, ts: str = TS, client: str | None = "c") -> dict[str, Any]:
    return {"ts": ts, "request_id": f"r{i}", "client": client, "status": 200,
            "pad": "x" * 100}


def _open(directory: Path, **kw: Any) -> AuditLog:
    kw.setdefault("checkpoint_interval_s", 3600)
    log = AuditLog(directory, KEY, **kw)
    log.open()
    return log


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.jsonl"))


def _problems(directory: Path) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in verify(directory, KEY.public_key()).problems]


def _checkpoints(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / CHECKPOINTS).read_text().splitlines()]


def _multi_segment_trail(directory: Path, n: int = 30, every: int = 4) -> None:
    # ~340-byte records, 1 KiB segments: three records per segment.
    log = _open(directory, checkpoint_every=every, segment_bytes=1024)
    for i in range(1, n + 1):
        log.append([_record(i)])
    log.close()


def _rewrite(directory: Path, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    """Apply ``edit`` to the whole trail's lines, keeping each segment's line count
    (give or take what ``edit`` added or removed from the segment it fell in)."""
    segments = _segments(directory)
    counts = [len(p.read_bytes().splitlines()) for p in segments]
    lines = edit([line for p in segments for line in p.read_bytes().splitlines()])
    delta = len(lines) - sum(counts)
    counts[-1] += delta
    start = 0
    for path, count in zip(segments, counts, strict=True):
        path.write_bytes(b"".join(line + b"\n" for line in lines[start:start + count]))
        start += count


def test_a_trail_across_segments_and_restarts_verifies_and_reads_in_order(
        tmp_path: Path) -> None:
    _multi_segment_trail(tmp_path, 20)
    log = _open(tmp_path, segment_bytes=1024)
    assert log.seq == 20
    log.append([_record(i) for i in range(21, 26)])
    log.close()
    assert len(_segments(tmp_path)) > 3
    report = verify(tmp_path, KEY.public_key())
    assert report.ok, report.problems
    assert (report.records, report.first_seq, report.last_seq) == (25, 1, 25)
    assert [r["seq"] for r in read_records(tmp_path)] == list(range(1, 26))


def test_every_closed_segment_ends_at_a_signed_checkpoint(tmp_path: Path) -> None:
    # checkpoint_every is far away: only rotation forces these checkpoints.
    _multi_segment_trail(tmp_path, 20, every=1000)
    signed = {cp["seq"] for cp in _checkpoints(tmp_path)}
    for path in _segments(tmp_path)[:-1]:
        last = orjson.loads(path.read_bytes().splitlines()[-1])
        assert last["seq"] in signed, path.name


def test_three_tamperings_in_different_segments_are_named_once_each(tmp_path: Path) -> None:
    _multi_segment_trail(tmp_path, 30, every=1000)

    def tamper(lines: list[bytes]) -> list[bytes]:
        record = orjson.loads(lines[4])
        record["status"] = 500
        lines[4] = orjson.dumps(record)
        lines[20], lines[21] = lines[21], lines[20]
        del lines[13]
        return lines

    _rewrite(tmp_path, tamper)
    assert _problems(tmp_path) == [("edited", 5), ("deleted", 14), ("reordered", 21)]


def test_an_edited_record_that_was_rehashed_is_named_by_the_link_after_it(
        tmp_path: Path) -> None:
    from serving.storage.audit_chain import record_hash
    _multi_segment_trail(tmp_path, 12, every=1000)

    def tamper(lines: list[bytes]) -> list[bytes]:
        record = orjson.loads(lines[6])
        record["client"] = "someone-else"
        record["hash"] = record_hash(record)
        lines[6] = orjson.dumps(record)
        return lines

    _rewrite(tmp_path, tamper)
    assert _problems(tmp_path) == [("edited", 7)]


def test_a_duplicated_record_and_a_foreign_line_are_named(tmp_path: Path) -> None:
    _multi_segment_trail(tmp_path, 10, every=1000)
    _rewrite(tmp_path, lambda lines: [*lines[:3], lines[2], *lines[3:6], b"not a record",
                                      *lines[6:]])
    kinds = _problems(tmp_path)
    assert ("inserted", 3) in kinds and ("torn", None) in kinds and len(kinds) == 2


def test_a_forged_or_foreign_checkpoint_is_a_bad_signature(tmp_path: Path) -> None:
    _multi_segment_trail(tmp_path, 8, every=4)
    assert verify(tmp_path, Ed25519PrivateKey.generate().public_key()).problems[0].kind \
        == "bad_signature"
    checkpoints = _checkpoints(tmp_path)
    checkpoints[0]["seq"] -= 1  # claims less than was signed
    (tmp_path / CHECKPOINTS).write_text("".join(json.dumps(c) + "\n" for c in checkpoints))
    assert _problems(tmp_path) == [("bad_signature", checkpoints[0]["seq"])]


def test_removing_the_last_segments_is_caught_by_the_signed_checkpoints(tmp_path: Path) -> None:
    _multi_segment_trail(tmp_path, 30, every=1000)
    for path in _segments(tmp_path)[-2:]:
        path.unlink()
    assert ("checkpoint_mismatch", 30) in _problems(tmp_path)


def test_cutting_records_from_the_start_is_unanchored(tmp_path: Path) -> None:
    _multi_segment_trail(tmp_path, 12, every=1000)
    _rewrite(tmp_path, lambda lines: lines[2:])
    assert _problems(tmp_path) == [("unanchored_start", 3)]


def test_the_unsigned_tail_is_counted_not_flagged(tmp_path: Path) -> None:
    log = _open(tmp_path, checkpoint_every=4)
    log.append([_record(i) for i in range(1, 7)])  # checkpoint at 6
    log.append([_record(7), _record(8)])
    report = verify(tmp_path, KEY.public_key())
    assert report.ok and report.unsigned_tail == 2 and report.checkpoints == 1
    log.close()
    assert verify(tmp_path, KEY.public_key()).unsigned_tail == 0


def test_checkpoints_follow_the_count_and_the_interval(tmp_path: Path) -> None:
    clock = Clock()
    log = AuditLog(tmp_path, KEY, checkpoint_every=3, checkpoint_interval_s=10.0, clock=clock)
    log.open()
    log.append([_record(1), _record(2)])
    assert not (tmp_path / CHECKPOINTS).exists()
    log.append([_record(3)])
    assert [c["seq"] for c in _checkpoints(tmp_path)] == [3]
    clock.now += 11
    log.append([_record(4)])
    assert [c["seq"] for c in _checkpoints(tmp_path)] == [3, 4]
    log.checkpoint()  # nothing new: no checkpoint
    assert len(_checkpoints(tmp_path)) == 2
    log.close()
    log.close()  # idempotent
    assert len(_checkpoints(tmp_path)) == 2


def test_fsync_follows_the_interval_and_precedes_every_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    clock = Clock()
    log = AuditLog(tmp_path, KEY, checkpoint_every=1000, checkpoint_interval_s=3600,
                   fsync_interval_s=1.0, clock=clock)
    log.open()
    log.append([_record(1)])
    log.maybe_sync()
    assert synced == []
    clock.now += 1.5
    log.maybe_sync()
    log.maybe_sync()  # nothing written since
    assert synced == ["segment-000000000001.jsonl"]
    log.append([_record(2)])
    log.checkpoint()
    assert synced[1:] == ["segment-000000000001.jsonl", CHECKPOINTS]
    log.close()

    synced.clear()
    eager = AuditLog(tmp_path / "eager", KEY, fsync_interval_s=0)
    eager.open()
    eager.append([_record(1)])
    assert synced == ["segment-000000000001.jsonl"]
    eager.close()


def test_a_torn_batch_is_cut_on_open_and_the_chain_continues(tmp_path: Path) -> None:
    log = _open(tmp_path, checkpoint_every=1000)
    log.append([_record(1), _record(2)])
    # The process died while writing a batch: its first line made it, the second only half.
    torn = b'{"seq": 3, "prev": "' + b"a" * 30
    os.close(log._fd)  # type: ignore[arg-type]  # as the kernel does for a dead process
    os.close(log._lock_fd)  # type: ignore[arg-type]
    with _segments(tmp_path)[0].open("ab") as fh:
        fh.write(torn)
    reopened = _open(tmp_path)
    assert reopened.recovered_torn_bytes == len(torn) and reopened.seq == 2
    reopened.append([_record(3)])
    reopened.close()
    assert verify(tmp_path, KEY.public_key()).ok
    assert [r["request_id"] for r in read_records(tmp_path)] == ["r1", "r2", "r3"]


def test_an_unparseable_last_line_is_cut_on_open(tmp_path: Path) -> None:
    log = _open(tmp_path)
    log.append([_record(1)])
    log.close()
    with _segments(tmp_path)[0].open("ab") as fh:
        fh.write(b'{"seq": 2, "ha\x00\x00\n')
    reopened = _open(tmp_path)
    assert reopened.seq == 1 and reopened.recovered_torn_bytes == 17


def test_a_torn_checkpoint_line_does_not_spoil_the_next_checkpoint(tmp_path: Path) -> None:
    log = _open(tmp_path, checkpoint_every=1)
    log.append([_record(1)])
    os.close(log._fd)  # type: ignore[arg-type]
    os.close(log._lock_fd)  # type: ignore[arg-type]
    with (tmp_path / CHECKPOINTS).open("ab") as fh:
        fh.write(b'{"hash": "ab')  # power lost while a checkpoint was written
    reopened = _open(tmp_path, checkpoint_every=1)
    reopened.append([_record(2)])
    reopened.close()
    assert verify(tmp_path, KEY.public_key()).ok


def _old_segments_then_current(directory: Path) -> AuditLog:
    log = _open(directory, checkpoint_every=1000, segment_bytes=1024)
    for i in range(1, 19):
        log.append([_record(i, ts="2020-01-01T00:00:00Z")])
    return log


def test_purge_removes_old_closed_segments_and_the_rest_verifies(tmp_path: Path) -> None:
    log = _old_segments_then_current(tmp_path)
    log.append([_record(i, ts=datetime.now(UTC).isoformat()) for i in range(19, 30)])
    segments = [p.name for p in _segments(tmp_path)]
    removed = log.purge(datetime.now(UTC) - timedelta(days=90))
    log.close()
    kept = [p.name for p in _segments(tmp_path)]
    assert removed and removed == segments[:len(removed)] and kept == segments[len(removed):]
    report = verify(tmp_path, KEY.public_key())
    assert report.ok, report.problems
    assert report.first_seq is not None and report.first_seq > 1 and report.last_seq == 29


def test_purge_by_another_process_never_removes_the_segment_being_written(
        tmp_path: Path) -> None:
    log = _old_segments_then_current(tmp_path)  # every record old, the gateway still running
    newest = _segments(tmp_path)[-1]
    removed = purge(tmp_path, datetime.now(UTC))
    assert newest.name not in removed and _segments(tmp_path) == [newest]
    log.append([_record(19)])
    log.close()
    report = verify(tmp_path, KEY.public_key())
    assert report.ok and report.last_seq == 19


def test_purge_keeps_segments_newer_than_the_cutoff(tmp_path: Path) -> None:
    _multi_segment_trail(tmp_path, 20)  # TS is in 2026-11
    before = _segments(tmp_path)
    assert purge(tmp_path, datetime(2026, 11, 1, tzinfo=UTC)) == []
    assert _segments(tmp_path) == before


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = _open(tmp_path)
    with pytest.raises(AuditLogError, match=f"another gateway writes to {tmp_path}.*"
                       "ENCLAVE_AUDIT_DIR"):
        _open(tmp_path)
    first.append([_record(1)])
    first.close()
    second = _open(tmp_path)
    assert second.seq == 1
    second.close()


def test_read_records_filters_across_segments(tmp_path: Path) -> None:
    log = _open(tmp_path, segment_bytes=1024)
    for i in range(1, 21):
        log.append([_record(i, ts=f"2026-11-{i:02d}T10:00:00.000Z",
                            client="a" if i % 2 else None)])
    log.close()
    since, until = datetime(2026, 11, 5, tzinfo=UTC), datetime(2026, 11, 15, tzinfo=UTC)
    assert [r["seq"] for r in read_records(tmp_path, since=since, until=until, client="a")] \
        == [5, 7, 9, 11, 13]
    assert [r["seq"] for r in read_records(tmp_path, request_id="r16")] == [16]
