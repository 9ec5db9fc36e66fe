"""Checking an audit chain: every record's hash and link, every checkpoint's signature, and
what is missing, inserted, reordered or torn, as a report of problems by sequence number."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serving.storage.audit_chain import (
    CHECKPOINTS,
    GENESIS,
    _checkpoint_payload,
    _read_jsonl,
    _segments,
    record_hash,
)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # edited, deleted, inserted, reordered, torn, bad_signature,
    # checkpoint_mismatch, unanchored_start
    seq: int | None
    detail: str


@dataclass(slots=True)
class VerifyReport:
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    unsigned_tail: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def verify(directory: Path, public_key: Ed25519PublicKey) -> VerifyReport:
    report = VerifyReport()
    problems = report.problems
    by_seq: dict[int, dict[str, Any]] = {}
    last_seen = 0
    for path in _segments(directory):
        for number, record in _read_jsonl(path):
            seq = record.get("seq")
            if not isinstance(seq, int) or "hash" not in record:
                problems.append(Problem("torn", None, f"{path.name} line {number} is not a "
                                        "record"))
                continue
            report.records += 1
            if seq in by_seq:
                problems.append(Problem("inserted", seq, f"seq {seq} appears again "
                                        f"({path.name} line {number})"))
                continue
            if seq < last_seen:
                problems.append(Problem("reordered", seq, f"record {seq} comes after record "
                                        f"{last_seen}"))
            last_seen = max(last_seen, seq)
            by_seq[seq] = record
            if record_hash(record) != record["hash"]:
                problems.append(Problem("edited", seq, f"record {seq} does not match its hash"))
    if by_seq:
        first, last = min(by_seq), max(by_seq)
        report.first_seq, report.last_seq = first, last
        missing = [s for s in range(first, last + 1) if s not in by_seq]
        for a, b in _ranges(missing):
            problems.append(Problem("deleted", a, f"record {a} is missing" if a == b
                                    else f"records {a}-{b} are missing"))
        for s in range(first + 1, last + 1):
            here, before = by_seq.get(s), by_seq.get(s - 1)
            if here is not None and before is not None and here.get("prev") != before["hash"]:
                # The earlier record was changed and re-hashed: its successor still holds the
                # hash it had.
                problems.append(Problem("edited", s - 1, f"record {s - 1} was changed and "
                                        "re-hashed (the next record's link no longer matches)"))
    signed: dict[int, str] = {}
    for number, cp in _read_jsonl(directory / CHECKPOINTS):
        report.checkpoints += 1
        try:
            public_key.verify(base64.b64decode(cp["sig"]), _checkpoint_payload(cp))
        except (InvalidSignature, KeyError, ValueError, TypeError):
            problems.append(Problem("bad_signature", cp.get("seq") if isinstance(
                cp.get("seq"), int) else None, f"checkpoint on line {number} is not validly "
                "signed"))
            continue
        seq = int(cp["seq"])
        signed[seq] = str(cp["hash"])
        covered = by_seq.get(seq)
        if report.last_seq is not None and seq > report.last_seq:
            problems.append(Problem("checkpoint_mismatch", seq, f"signed records up to {seq} "
                                    f"are gone (the trail ends at {report.last_seq})"))
        elif report.last_seq is None and seq > 0 and any(_segments(directory)):
            problems.append(Problem("checkpoint_mismatch", seq, "signed records are gone"))
        elif covered is not None and covered["hash"] != cp["hash"]:
            problems.append(Problem("checkpoint_mismatch", seq, f"record {seq} differs from "
                                    "what its signed checkpoint covers"))
    if report.first_seq is not None and report.last_seq is not None:
        first_record = by_seq[report.first_seq]
        anchor = GENESIS if report.first_seq == 1 else signed.get(report.first_seq - 1)
        if first_record.get("prev") != anchor:
            problems.append(Problem("unanchored_start", report.first_seq, "the first record "
                                    "is not vouched for by the chain's start or a signed "
                                    "checkpoint"))
        report.unsigned_tail = report.last_seq - max(
            (s for s in signed if s <= report.last_seq), default=report.first_seq - 1)
    problems.sort(key=lambda p: (p.seq if p.seq is not None else -1, p.kind))
    return report
