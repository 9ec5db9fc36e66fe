"""The audit trail on disk: hash-chained records in append-only segments, signed checkpoints,
reading and retention (``audit_verify`` checks a chain).

Layout of the directory (0700): ``segment-<first seq>.jsonl`` (one record per line: the record,
its ``seq``, ``prev`` = the previous record's hash, ``hash`` = sha256(prev + "\\n" + the
canonical JSON of the record with seq and prev)), ``checkpoints.jsonl`` (``seq``, ``hash``,
``ts``, ``segment`` and an Ed25519 ``sig`` over them), ``.lock`` (held by the one writer).
Every closed segment ends exactly at a checkpoint, so retention removes whole segments and the
rest still verifies from the checkpoint before it.

A batch is written with one ``os.write`` loop on an ``O_APPEND`` descriptor: once ``append``
returns, the records survive the process being killed (they are in the kernel); ``fsync``
follows per the interval given. Never logs a record.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

GENESIS = "0" * 64
CHECKPOINTS = "checkpoints.jsonl"
_TAIL_BYTES = 1 << 20


class AuditLogError(RuntimeError):
    pass


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return _hash(str(body.get("prev", "")), _canonical(body))


def _hash(prev: str, canonical: bytes) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + canonical).hexdigest()


def _line(record: dict[str, Any], prev: str) -> tuple[bytes, str]:
    """The record's line and hash, serialised once: the canonical JSON of the record (with
    ``prev``, without ``hash``) is what is hashed, and the line is those bytes with the hash
    as a last member (a reader parses the line, takes ``hash`` out and canonicalises again:
    ``record_hash``)."""
    canonical = _canonical({k: v for k, v in record.items() if k != "hash"})
    digest = _hash(prev, canonical)
    return canonical[:-1] + b',"hash":"' + digest.encode() + b'"}', digest


def chains(root: Path) -> list[Path]:
    """Every gateway's chain under the audit root (each in its own directory)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (
        (p / CHECKPOINTS).exists() or any(p.glob("segment-*.jsonl"))))


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.jsonl"))


def _segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.jsonl"


def _last_line(path: Path) -> tuple[bytes | None, int]:
    """(the last complete line, the number of bytes after it: a torn write)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        start = max(0, size - _TAIL_BYTES)
        while True:
            fh.seek(start)
            data = fh.read()
            end = data.rfind(b"\n")
            if end < 0 and start > 0:
                start = max(0, start - _TAIL_BYTES)
                continue
            if end < 0:
                return None, len(data)
            torn = len(data) - end - 1
            begin = data.rfind(b"\n", 0, end) + 1
            if begin == 0 and start > 0:
                start = max(0, start - _TAIL_BYTES)
                continue
            return data[begin:end], torn


def _checkpoint_payload(cp: dict[str, Any]) -> bytes:
    return _canonical({k: cp[k] for k in ("seq", "hash", "ts", "segment")})


class AuditLog:
    def __init__(self, directory: Path, signing_key: Ed25519PrivateKey, *,
                 checkpoint_every: int = 256, checkpoint_interval_s: float = 10.0,
                 segment_bytes: int = 64 << 20, fsync_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._key = signing_key
        self._every = checkpoint_every
        self._interval = checkpoint_interval_s
        self._segment_bytes = segment_bytes
        self._fsync_interval = fsync_interval_s
        self._clock = clock
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment: str | None = None
        self._size = 0
        self.seq = 0
        self.last_hash = GENESIS
        self._checkpointed_seq = 0
        self._last_checkpoint = clock()
        self._dirty_since: float | None = None
        self.recovered_torn_bytes = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditLogError(f"another gateway writes to {self.directory}; give each "
                                "gateway its own ENCLAVE_AUDIT_DIR") from None
        self._lock_fd = fd
        self._recover()

    def _recover(self) -> None:
        cp_path = self.directory / CHECKPOINTS
        if cp_path.exists() and cp_path.stat().st_size:
            _, torn = _last_line(cp_path)
            if torn:  # a checkpoint half-written at a power loss: the next one starts clean
                with cp_path.open("r+b") as fh:
                    fh.truncate(cp_path.stat().st_size - torn)
        checkpoints = [cp for cp in _read_jsonl(cp_path) if cp[1]]
        if checkpoints:
            self._checkpointed_seq = int(checkpoints[-1][1].get("seq", 0))
        for path in reversed(_segments(self.directory)):
            line, torn = _last_line(path)
            if torn:
                with path.open("r+b") as fh:
                    fh.truncate(path.stat().st_size - torn)
                self.recovered_torn_bytes += torn
            if line is not None:
                try:
                    last = orjson.loads(line)
                except orjson.JSONDecodeError:
                    # A complete line that is not a record (a crash mid-sector): cut it too.
                    cut = len(line) + 1
                    with path.open("r+b") as fh:
                        fh.truncate(path.stat().st_size - cut)
                    self.recovered_torn_bytes += cut
                    line, _ = _last_line(path)
                    last = orjson.loads(line) if line is not None else None
            if line is None or last is None:
                path.unlink()  # created, then the process died before its first record
                continue
            self.seq, self.last_hash = int(last["seq"]), str(last["hash"])
            self._segment = path.name
            self._size = path.stat().st_size
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            return
        if checkpoints:  # every segment purged: continue from the last checkpoint
            last_cp = checkpoints[-1][1]
            self.seq, self.last_hash = int(last_cp["seq"]), str(last_cp["hash"])

    def append(self, records: list[dict[str, Any]]) -> int:
        if not records:
            return self.seq
        if self._fd is None:
            self._segment = _segment_name(self.seq + 1)
            self._fd = os.open(self.directory / self._segment,
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            self._size = 0
        lines = []
        seq, prev = self.seq, self.last_hash
        for record in records:
            seq += 1
            line, prev = _line({**record, "seq": seq, "prev": prev}, prev)
            lines.append(line)
        data = memoryview(b"\n".join(lines) + b"\n")
        size = len(data)
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
        self.seq, self.last_hash = seq, prev
        self._size += size
        if self._dirty_since is None:
            self._dirty_since = self._clock()
        if self._fsync_interval == 0:
            self.sync()
        if (self.seq - self._checkpointed_seq >= self._every
                or self._clock() - self._last_checkpoint >= self._interval):
            self.checkpoint()
        if self._size >= self._segment_bytes:
            self.checkpoint()
            os.close(self._fd)
            self._fd = None  # the next append starts a new segment
        return self.seq

    def sync(self) -> None:
        if self._fd is not None and self._dirty_since is not None:
            os.fsync(self._fd)
        self._dirty_since = None

    def maybe_sync(self) -> None:
        if self._dirty_since is not None and \
                self._clock() - self._dirty_since >= self._fsync_interval:
            self.sync()

    def checkpoint(self) -> None:
        self._last_checkpoint = self._clock()
        if self.seq == self._checkpointed_seq or self._segment is None:
            return
        self.sync()  # a checkpoint never covers records that are not on disk
        cp: dict[str, Any] = {"seq": self.seq, "hash": self.last_hash,
                              "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                              "segment": self._segment}
        cp["sig"] = base64.b64encode(self._key.sign(_checkpoint_payload(cp))).decode()
        fd = os.open(self.directory / CHECKPOINTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o600)
        try:
            os.write(fd, _canonical(cp) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._checkpointed_seq = self.seq

    def purge(self, before: datetime) -> list[str]:
        return purge(self.directory, before)

    def close(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self.checkpoint()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)
        self._lock_fd = None


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object); an unparseable line comes as an empty dict."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                value = {}
            yield number, value if isinstance(value, dict) else {}


def _ts(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def purge(directory: Path, before: datetime) -> list[str]:
    """Delete the oldest closed segments whose last record is older than ``before``; never the
    newest segment, never one after a segment that is kept. Checkpoints stay."""
    removed = []
    for path in _segments(directory)[:-1]:
        line, _ = _last_line(path)
        last = orjson.loads(line) if line else {}
        ts = _ts(last.get("ts"))
        if ts is None or ts >= before:
            break
        path.unlink()
        removed.append(path.name)
    return removed


def read_records(directory: Path, *, since: datetime | None = None,
                 until: datetime | None = None, client: str | None = None,
                 request_id: str | None = None) -> Iterator[dict[str, Any]]:
    for path in _segments(directory):
        for _, record in _read_jsonl(path):
            if not record:
                continue
            if request_id is not None and record.get("request_id") != request_id:
                continue
            if client is not None and record.get("client") != client:
                continue
            ts = _ts(record.get("ts"))
            if since is not None and (ts is None or ts < since):
                continue
            if until is not None and (ts is None or ts >= until):
                continue
            yield record
