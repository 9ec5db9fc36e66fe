"""The audit log survives a real SIGKILL of its writer: every batch acknowledged before the
kill is on disk and the chain verifies."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serving.storage.audit_chain import (
    AuditLog,
)
from serving.storage.audit_crypto import load_or_create_signing_key
from serving.storage.audit_verify import verify

KEY = Ed25519PrivateKey.generate()
TS = "2026-11-23T10:00:00.000Z"


def _record(i: int, ts: str = TS, client: str | None = "c") -> dict[str, Any]:
    return {"ts": ts, "request_id": f"r{i}", "client": client, "status": 200,
            "pad": "x" * 100}


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.jsonl"))


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from serving.storage.audit_chain import AuditLog
    from serving.storage.audit_crypto import load_or_create_signing_key
    log = AuditLog(Path(sys.argv[1]), load_or_create_signing_key(Path(sys.argv[2])),
                   checkpoint_every=50, fsync_interval_s=60, segment_bytes=64 * 1024)
    log.open()
    i = 0
    while True:
        batch = [{"ts": "2026-11-23T10:00:00Z", "request_id": f"r{i + j}", "client": "c",
                  "pad": "x" * 200} for j in range(20)]
        i += 20
        print(log.append(batch), flush=True)
""")


def test_every_batch_appended_before_a_sigkill_survives(tmp_path: Path) -> None:
    trail, key_file = tmp_path / "audit", tmp_path / "signing.key"
    key = load_or_create_signing_key(key_file)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(trail), str(key_file)],
                             stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    assert child.stdout is not None
    acknowledged = 0
    for line in child.stdout:  # kill it mid-stream, while it is appending
        acknowledged = int(line)
        if acknowledged >= 2000:
            break
    child.send_signal(signal.SIGKILL)
    rest, _ = child.communicate(timeout=30)
    acknowledged = max([acknowledged, *(int(s) for s in rest.split())])
    assert child.returncode == -signal.SIGKILL

    log = AuditLog(trail, key)
    log.open()
    assert log.seq >= acknowledged
    log.append([_record(0)])
    log.close()
    report = verify(trail, key.public_key())
    assert report.ok, report.problems
    assert report.first_seq == 1 and report.last_seq == log.seq and report.records == log.seq
    assert len(_segments(trail)) > 1
