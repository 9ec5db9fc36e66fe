"""Clients: create, change, look up (cached, like keys), always against the policies in force."""

from __future__ import annotations

import re
import time

from serving.admission.policy_store import PolicyStore
from serving.domain.manifest import NAME_RE
from serving.storage.clients import ClientRecord, ClientRepository


class ClientService:
    def __init__(self, repo: ClientRepository, policies: PolicyStore | None,
                 cache_ttl_s: float = 2.0) -> None:
        self.repo = repo
        self._policies = policies
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, ClientRecord | None]] = {}

    def _check_policy(self, policy: str) -> None:
        if self._policies is not None and self._policies.get(policy) is None:
            known = ", ".join(sorted(self._policies.current.policies))
            raise ValueError(f"no policy named {policy!r} in {self._policies.path} "
                             f"(known: {known})")

    async def create(self, client_id: str, policy: str, description: str = "") -> ClientRecord:
        if not re.fullmatch(NAME_RE, client_id):
            raise ValueError("a client name is 1 to 63 lowercase letters, digits, '.', '_' or "
                             "'-', starting with a letter or digit")
        if len(description) > 500:
            raise ValueError("a description is at most 500 characters")
        self._check_policy(policy)
        return await self.repo.add(client_id, policy, description)

    async def update(self, client_id: str, *, policy: str | None = None,
                     description: str | None = None,
                     disabled: bool | None = None) -> ClientRecord | None:
        if policy is not None:
            self._check_policy(policy)
        self._cache.pop(client_id, None)
        return await self.repo.update(client_id, policy=policy, description=description,
                                      disabled=disabled)

    async def get(self, client_id: str) -> ClientRecord | None:
        now = time.monotonic()
        hit = self._cache.get(client_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = await self.repo.get(client_id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[client_id] = (now + self._ttl, record)
        return record

    async def all(self) -> list[ClientRecord]:
        return await self.repo.all()
