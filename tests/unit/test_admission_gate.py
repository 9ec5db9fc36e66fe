"""The admission gate on its own (in-memory limits, a SQLite ledger in a temporary directory):
scopes and models are refused before anything is held, a concurrent slot is given back on every
way a request ends, and a budget is charged what the engine reported, or what was held when the
count is missing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.admission.budgets import BudgetLedger
from serving.admission.cost import Cost
from serving.admission.gate import Gatekeeper
from serving.admission.policy_store import PolicyStore
from serving.admission.ratelimits import RateLimiter
from serving.domain.outcome import RequestContext
from serving.domain.principal import Principal
from serving.errors import ModelNotFound, PermissionDenied, QuotaExceeded, RateLimited
from serving.metrics import GatewayMetrics
from serving.storage import migrate
from serving.storage.db import create_engine
from serving.storage.ledger import LedgerRepository
from serving.upstream.pool import ModelRoute
from tests.support import write_policies

pytestmark = pytest.mark.anyio
POLICIES = """
version: 1
policies:
  one-at-a-time:
    models: [demo-chat]
    scopes: [chat, models]
    limits: {concurrent: 1}
  budgeted:
    models: [demo-chat]
    scopes: [chat]
    budgets: {tokens_per_day: 1000}
"""



@dataclass
class Rig:
    gate: Gatekeeper
    ledger: BudgetLedger
    metrics: GatewayMetrics

    def rejected(self, client: str, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "enclave_rejections_total", {"client": client, "reason": reason})
        return value or 0.0


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    await migrate.upgrade(db)
    ledger = BudgetLedger(LedgerRepository(db), reservation_ttl_s=900)
    ledger.start()
    metrics = GatewayMetrics()
    limiter = RateLimiter(None, lease_ttl_s=600)
    policies = PolicyStore(write_policies(tmp_path, POLICIES), {"demo-chat"})
    yield Rig(Gatekeeper(policies, limiter, ledger, metrics), ledger, metrics)
    await ledger.stop()
    await limiter.close()
    await db.dispose()


def price(tokens: int, prompt: int) -> Cost:
    return Cost(tokens=tokens, prompt=prompt, choices=1)


def who(policy: str, scopes: frozenset[str] = frozenset({"chat", "models"})) -> Principal:
    return Principal(key_id="k1", name="svc", client_id="svc", policy=policy, scopes=scopes)


def ended(status: int | None, prompt: int | None = None, completion: int | None = None, *,
          stream: bool = False, disconnected: bool = False) -> RequestContext:
    ctx = RequestContext(request_id="r", started=0.0, endpoint="chat", stream=stream)
    ctx.forwarding = True
    ctx.upstream_status = status
    ctx.prompt_tokens, ctx.completion_tokens = prompt, completion
    ctx.client_disconnected = disconnected
    return ctx


async def test_a_scope_the_key_lacks_is_refused_and_counted(rig: Rig) -> None:
    with pytest.raises(PermissionDenied, match="lacks the 'chat' scope"):
        rig.gate.authorize(who("one-at-a-time", frozenset({"models"})), "chat")
    assert rig.rejected("svc", "scope") == 1


async def test_a_model_off_the_allowlist_looks_like_a_missing_one(rig: Rig) -> None:
    policy = rig.gate.authorize(who("one-at-a-time"), "chat")
    other = ModelRoute(name="secret-model", task="chat", max_model_len=128)
    with pytest.raises(ModelNotFound, match="does not exist or you do not have access"):
        rig.gate.check_model(who("one-at-a-time"), policy, other, "secret-model")


async def test_the_concurrent_slot_comes_back_however_the_request_ended(rig: Rig) -> None:
    principal = who("one-at-a-time")
    policy = rig.gate.authorize(principal, "chat")
    for end in (ended(200, 5, 3), ended(None), ended(None, disconnected=True), ended(502)):
        held = await rig.gate.admit(principal, policy, "demo-chat", price(20, 10))
        with pytest.raises(RateLimited, match="1 requests in flight"):
            await rig.gate.admit(principal, policy, "demo-chat", price(20, 10))
        await rig.gate.finish(held, end)
    assert rig.rejected("svc", "concurrency") == 4


async def test_the_budget_is_charged_the_engines_count_and_refuses_past_it(rig: Rig) -> None:
    principal = who("budgeted", frozenset({"chat"}))
    policy = rig.gate.authorize(principal, "chat")
    held = await rig.gate.admit(principal, policy, "demo-chat", price(600, 100))
    assert held.reservation is not None and held.reservation.tokens >= 600
    ctx = ended(200, 40, 60)
    await rig.gate.finish(held, ctx)
    assert ctx.charged_tokens == 100  # what the engine reported, not the 600 held
    # 900 left of 1000: a request that could use 950 is refused, one of 900 is not.
    with pytest.raises(QuotaExceeded):
        await rig.gate.admit(principal, policy, "demo-chat", price(950, 50))
    fits = await rig.gate.admit(principal, policy, "demo-chat", price(900, 50))
    await rig.gate.finish(fits, ended(None))  # refused upstream: nothing charged
    assert rig.rejected("svc", "budget_day") == 1


async def test_a_stream_the_client_left_is_charged_its_prompt_a_body_what_was_held(
        rig: Rig) -> None:
    principal = who("budgeted", frozenset({"chat"}))
    policy = rig.gate.authorize(principal, "chat")
    held = await rig.gate.admit(principal, policy, "demo-chat", price(200, 30))
    assert Gatekeeper.charge(held, ended(None, stream=True, disconnected=True))[2] == 30
    assert Gatekeeper.charge(held, ended(None, disconnected=True))[2] == \
        (held.reservation.tokens if held.reservation else 0)
    await rig.gate.finish(held, ended(None))
