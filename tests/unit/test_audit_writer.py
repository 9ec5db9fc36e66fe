"""The audit writer (``audit.trail``) on its own: a request's outcome becomes one record, written
before ``record`` returns; encrypted content never reaches the file in clear; closing signs a
checkpoint and the chain verifies."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from serving.audit.trail import AuditTrail, build_record
from serving.domain.outcome import Decisions, RequestContext
from serving.domain.policy import Policy
from serving.metrics import GatewayMetrics
from serving.settings import Settings
from serving.storage.audit_chain import read_records
from serving.storage.audit_crypto import ContentKeyring, load_or_create_signing_key
from serving.storage.audit_verify import verify
from tests.support import TEST_PEPPER

pytestmark = pytest.mark.anyio
SECRET_PROMPT = "my card is 4111 1111 1111 1111"



def outcome(request_id: str, content: str = "none", status: int = 200):  # type: ignore[no-untyped-def]
    ctx = RequestContext(request_id=request_id, started=0.0, endpoint="chat")
    ctx.key_id, ctx.client_id, ctx.model = "k1", "svc", "demo-chat"
    ctx.policy = Policy.model_validate({"scopes": ["chat"], "models": ["demo-chat"],
                                        "audit": {"content": content}})
    ctx.decisions = Decisions()
    ctx.decisions.pii_input.update({"card": 1})
    ctx.decisions.pii_input_action = "redact"
    ctx.request_text, ctx.response_text = SECRET_PROMPT, "noted"
    ctx.prompt_tokens, ctx.completion_tokens = 12, 3
    return ctx.finish(status)


async def test_records_are_written_encrypted_where_asked_and_the_chain_verifies(
        tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, pepper=SecretStr(TEST_PEPPER))
    metrics = GatewayMetrics()
    trail = AuditTrail(settings, metrics)
    trail.start()
    try:
        await trail.record(build_record(outcome("r-plain")))
        await trail.record(build_record(outcome("r-sealed", content="encrypted")))
        # Written before record() returned: on disk now, while the writer still runs.
        on_disk = {r["request_id"]: r for r in read_records(settings.audit_chain_dir)}
        assert set(on_disk) == {"r-plain", "r-sealed"}
    finally:
        await trail.close()
    raw = b"".join(p.read_bytes() for p in settings.audit_chain_dir.glob("segment-*.jsonl"))
    assert SECRET_PROMPT.encode() not in raw  # neither record holds the text in clear
    plain, sealed = on_disk["r-plain"], on_disk["r-sealed"]
    assert "content" not in plain
    assert plain["decisions"] == {"pii_input": {"action": "redact", "types": {"card": 1}}}
    assert (plain["client"], plain["model"], plain["prompt_tokens"]) == ("svc", "demo-chat", 12)
    assert sealed["content"]["mode"] == "encrypted"
    keyring = ContentKeyring(settings.resolved_audit_keys_dir, None)
    clear = orjson.loads(keyring.decrypt(sealed["content"], b"r-sealed"))
    assert clear["request"] == SECRET_PROMPT and clear["response"] == "noted"
    key = load_or_create_signing_key(settings.resolved_audit_signing_key_file)
    report = verify(settings.audit_chain_dir, key.public_key())
    assert report.ok and report.records == 2 and report.unsigned_tail == 0
    assert metrics.registry.get_sample_value("enclave_audit_records_total") == 2
