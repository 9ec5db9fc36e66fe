"""What a client may do, checked before anything reaches an engine: its policy, scopes, model
allowlist and caps, then its rate limits, concurrent slots and token budget. ``finish`` gives
back what ``admit`` took, once the response has ended however it ended.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from dataclasses import dataclass

from serving.admission import budgets
from serving.admission.budgets import BudgetLedger, LedgerUnavailable, Reservation
from serving.admission.cost import Cost
from serving.admission.policy_store import PolicyStore
from serving.admission.ratelimits import Denied, RateLimiter
from serving.contract import PATHS
from serving.domain.outcome import RequestContext
from serving.domain.policy import Policy
from serving.domain.principal import Principal
from serving.errors import (
    ModelNotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    StoreUnavailable,
)
from serving.metrics import GatewayMetrics
from serving.upstream.pool import ModelRoute

log = logging.getLogger("enclave.admission")
_PROCESS = secrets.token_hex(6)
_LEASES = itertools.count()
_PATHS = {**PATHS, "models": "/v1/models"}


@dataclass(slots=True)
class Admission:
    client_id: str
    policy: Policy
    model: str
    lease_id: str | None = None
    reservation: Reservation | None = None
    prompt_estimate: int = 0


class Gatekeeper:
    def __init__(self, policies: PolicyStore, limiter: RateLimiter, ledger: BudgetLedger,
                 metrics: GatewayMetrics) -> None:
        self.policies = policies
        self.limiter = limiter
        self.ledger = ledger
        self.metrics = metrics

    def _reject(self, client_id: str, reason: str) -> None:
        self.metrics.count_rejection(client_id, reason)

    def _rate_limited(self, client_id: str, denied: Denied) -> RateLimited:
        self._reject(client_id, f"rate_{denied.what}")
        what = {"requests": "requests per minute", "tokens": "tokens per minute"}[denied.what]
        return RateLimited(f"Rate limit reached for this client ({what}). "
                           f"Retry after {denied.retry_after_s} s.", denied.retry_after_s)

    def authorize(self, principal: Principal, scope: str) -> Policy:
        """The caller's policy, if it grants ``scope`` to this key or token."""
        client_id = principal.client_id or ""
        policy = self.policies.get(principal.policy) if principal.policy else None
        if policy is None or not client_id:
            self._reject(client_id or "none", "no_policy")
            raise PermissionDenied("This key's client has no policy in force.")
        if scope not in principal.scopes or scope not in policy.scopes:
            self._reject(client_id, "scope")
            raise PermissionDenied(
                f"This key is not allowed to call {_PATHS.get(scope, scope)} "
                f"(it lacks the '{scope}' scope).")
        return policy

    def check_model(self, principal: Principal, policy: Policy, route: ModelRoute,
                    asked: str) -> None:
        if not policy.allows_model(route.name):
            self._reject(principal.client_id or "none", "model")
            # The same answer as for a model that does not exist: no enumeration.
            raise ModelNotFound(f"The model '{asked[:100]}' does not exist or you do not have "
                                "access to it.", param="model")

    async def admit(self, principal: Principal, policy: Policy, model: str,
                    cost: Cost) -> Admission:
        client_id = principal.client_id or ""
        limits = policy.limits
        denied = await self.limiter.admit(client_id, limits)
        if denied is not None:
            raise self._rate_limited(client_id, denied)
        tokens = cost.tokens
        admission = Admission(client_id, policy, model, prompt_estimate=cost.prompt)
        if limits.concurrent is not None:
            lease = f"{_PROCESS}.{next(_LEASES)}"  # unique without a syscall per request
            if not await self.limiter.acquire(client_id, limits.concurrent, lease):
                self._reject(client_id, "concurrency")
                raise RateLimited(f"This client already has {limits.concurrent} requests in "
                                  "flight, its limit. Retry when one ends.", 1)
            admission.lease_id = lease
        if policy.budgets.any:
            try:
                admission.reservation = await self.ledger.reserve(client_id, policy.budgets,
                                                                  tokens)
            except budgets.QuotaExceeded as exc:
                await self._release(admission)
                self._reject(client_id, f"budget_{exc.period}")
                raise QuotaExceeded(
                    f"This client's token budget for the {exc.period} is spent (this request "
                    f"could use up to {tokens} tokens).", exc.retry_after_s) from None
            except LedgerUnavailable:
                await self._release(admission)
                raise StoreUnavailable(
                    "The budget ledger cannot be written; retry shortly.", 1) from None
            except BaseException:
                await self._release(admission)
                raise
        return admission

    async def _release(self, admission: Admission) -> None:
        if admission.lease_id is not None:
            lease, admission.lease_id = admission.lease_id, None
            await self.limiter.release(admission.client_id, admission.policy.limits.concurrent,
                                       lease)

    @staticmethod
    def charge(admission: Admission, ctx: RequestContext) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, tokens charged to the budget) for a request that
        has ended, however it ended."""
        reservation = admission.reservation
        if ctx.upstream_status == 200 and ctx.prompt_tokens is not None:
            prompt, completion = ctx.prompt_tokens, ctx.completion_tokens or 0
            return prompt, completion, prompt + completion  # the engine's own count
        if ctx.upstream_status == 200 or (ctx.forwarding and ctx.client_disconnected
                                          and ctx.upstream_status is None):
            # The engine took the request and the count is missing: the client left first.
            if ctx.stream:
                return 0, 0, admission.prompt_estimate  # nothing was generated yet
            # A non-streamed request: the engine may finish it anyway; charge what was held.
            return 0, 0, reservation.tokens if reservation is not None else 0
        return 0, 0, 0  # refused or failed before the engine did any work

    def reckon(self, admission: Admission, ctx: RequestContext) -> None:
        """Record in ``ctx`` what the request will be charged, once its answer is complete
        (before the last byte: the audit record is written then); ``finish`` settles it."""
        ctx.charged_tokens = self.charge(admission, ctx)[2]

    async def finish(self, admission: Admission, ctx: RequestContext) -> None:
        """Settle the reservation with the real usage and give back the concurrent slot."""
        prompt, completion, charge = self.charge(admission, ctx)
        ctx.charged_tokens = charge  # the same as ``reckon``'s, or the end of an interrupted one
        reservation = admission.reservation
        if reservation is not None and charge > reservation.tokens:
            log.warning("usage above the reservation", extra={
                "client": admission.client_id, "reserved": reservation.tokens, "used": charge})
        worked = ctx.upstream_status is not None or charge > 0
        try:
            if worked or reservation is not None:
                self.ledger.settle(reservation, admission.client_id,
                                   admission.model if worked else "", prompt, completion, charge)
        finally:
            await self._release(admission)
        if charge:
            self.metrics.count_client_tokens(admission.client_id, admission.model, charge)
            await self.limiter.charge_tokens(admission.client_id, admission.policy.limits, charge)

    async def admit_listing(self, principal: Principal, policy: Policy) -> None:
        """``/v1/models``: counts against requests per minute only."""
        client_id = principal.client_id or ""
        denied = await self.limiter.admit(client_id, policy.limits, count_tokens=False)
        if denied is not None:
            raise self._rate_limited(client_id, denied)
