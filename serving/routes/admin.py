"""The admin API (``/admin/v1``): clients, keys, policies, usage, signing keys, engines.

Every route needs a key or token with the ``admin`` scope, which only an operators' client can
hold (a policy with ``admin`` has no other scope). Keys are shown once, in the response that
creates them; nothing here ever returns a key digest, a secret or the pepper.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.admission.budgets import BudgetLedger, budget_status
from serving.admission.policy_store import PolicyStore, key_scopes
from serving.auth.clients import ClientService
from serving.auth.keys import KeyService
from serving.auth.tokens import TokenIssuer
from serving.domain.policy import SCOPES, PolicyError
from serving.durations import expiry_after, parse_duration
from serving.errors import InvalidRequest, NotFound
from serving.routes.deps import Admin, Pool, services
from serving.routes.responses import JSONResponse
from serving.storage.clients import ClientExists, ClientRecord
from serving.upstream.pool import EnginePool as PoolT
from serving.upstream.replicas import Replica

router = APIRouter(prefix="/admin/v1")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewClient(_Body):
    name: str = Field(min_length=1, max_length=63)
    policy: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=500)


class ClientChange(_Body):
    policy: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = Field(None, max_length=500)
    disabled: bool | None = None


class NewKey(_Body):
    client: str = Field(min_length=1, max_length=63)
    scopes: list[Literal["chat", "completions", "embeddings", "models", "admin"]] | None = None
    expires_in: str | None = Field(None, description="e.g. 90d")
    name: str = Field("", max_length=200)
    kind: Literal["api", "secret"] = "api"


class Rotation(_Body):
    grace: str | None = Field("24h", description="How long the old key stays valid; null: "
                              "until revoked")
    expires_in: str | None = None


def _duration(value: str | None, param: str) -> datetime | None:
    try:
        return expiry_after(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None


def _client_json(c: ClientRecord) -> dict[str, object]:
    return {"name": c.id, "policy": c.policy, "description": c.description,
            "created_at": c.created_at.isoformat(),
            "disabled_at": c.disabled_at.isoformat() if c.disabled_at else None}


def _services(request: Request) -> tuple[ClientService, KeyService, PolicyStore]:
    s = services(request.scope)
    return s.clients, s.keys, s.policies


@router.get("/clients")
async def list_clients(request: Request, _: Admin) -> JSONResponse:
    clients, _k, _p = _services(request)
    return JSONResponse({"data": [_client_json(c) for c in await clients.all()]})


@router.post("/clients", status_code=201)
async def create_client(request: Request, body: NewClient, _: Admin) -> JSONResponse:
    clients, _k, _p = _services(request)
    try:
        created = await clients.create(body.name, body.policy, body.description)
    except ClientExists as exc:
        raise InvalidRequest(str(exc), param="name", code="client_exists") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="policy" if "policy" in str(exc) else "name") \
            from None
    return JSONResponse(_client_json(created), status_code=201)


async def _client(request: Request, name: str) -> ClientRecord:
    clients, _k, _p = _services(request)
    found = await clients.get(name)
    if found is None:
        raise NotFound(f"No client named '{name[:64]}'.", code="client_not_found")
    return found


@router.get("/clients/{name}")
async def show_client(request: Request, name: str, _: Admin) -> JSONResponse:
    client = await _client(request, name)
    _c, keys, policies = _services(request)
    ledger: BudgetLedger = services(request.scope).ledger
    policy = policies.get(client.policy)
    budgets = {b.kind: {"period": b.period, "limit": b.limit, "used": b.used,
                        "reserved": b.reserved}
               for b in await budget_status(ledger.repo, client.id,
                                            policy.budgets if policy else None)}
    return JSONResponse({**_client_json(client), "policy_in_force": policy is not None,
                         "budgets": budgets,
                         "keys": [k.public() for k in await keys.all(client.id)]})


@router.patch("/clients/{name}")
async def change_client(request: Request, name: str, body: ClientChange,
                        _: Admin) -> JSONResponse:
    await _client(request, name)
    clients, _k, _p = _services(request)
    try:
        updated = await clients.update(name, policy=body.policy, description=body.description,
                                       disabled=body.disabled)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="policy") from None
    assert updated is not None
    return JSONResponse(_client_json(updated))


@router.get("/keys")
async def list_keys(request: Request, _: Admin,
                    client: str | None = Query(None, max_length=63)) -> JSONResponse:
    _c, keys, _p = _services(request)
    return JSONResponse({"data": [k.public() for k in await keys.all(client)]})


@router.post("/keys", status_code=201)
async def create_key(request: Request, body: NewKey, _: Admin) -> JSONResponse:
    client = await _client(request, body.client)
    _c, keys, policies = _services(request)
    policy = policies.get(client.policy)
    if policy is None:
        raise InvalidRequest(f"The client's policy '{client.policy}' is not defined.",
                             param="client")
    try:
        scopes = key_scopes(client.policy, policy, body.scopes)
    except ValueError as exc:
        raise InvalidRequest(f"{str(exc).capitalize()}.", param="scopes") from None
    issued = await keys.issue(client.id, scopes, name=body.name, kind=body.kind,
                              expires_at=_duration(body.expires_in, "expires_in"))
    return JSONResponse({**issued.record.public(), "key": issued.key}, status_code=201,
                        headers={"Cache-Control": "no-store"})


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str, _: Admin) -> JSONResponse:
    _c, keys, _p = _services(request)
    record = await keys.get(key_id)
    if record is None:
        raise NotFound(f"No key with id '{key_id[:32]}'.", code="key_not_found")
    revoked = await keys.revoke(record.id)
    current = await keys.get(record.id)
    assert current is not None
    return JSONResponse({**current.public(), "revoked_now": bool(revoked)})


@router.post("/keys/{key_id}/rotate", status_code=201)
async def rotate_key(request: Request, key_id: str, body: Rotation, _: Admin) -> JSONResponse:
    _c, keys, _p = _services(request)
    grace = None
    if body.grace is not None:
        try:
            grace = parse_duration(body.grace)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="grace") from None
    try:
        issued, old = await keys.rotate(key_id, grace, _duration(body.expires_in, "expires_in"))
    except LookupError:
        raise NotFound(f"No active key with id '{key_id[:32]}'.", code="key_not_found") from None
    current_old = await keys.get(old.id)
    assert current_old is not None
    return JSONResponse({**issued.record.public(), "key": issued.key,
                         "previous": current_old.public()}, status_code=201,
                        headers={"Cache-Control": "no-store"})


@router.get("/policies")
async def show_policies(request: Request, _: Admin) -> JSONResponse:
    policies: PolicyStore = services(request.scope).policies
    return JSONResponse({"version": policies.version, "file": str(policies.path),
                         "last_error": policies.last_error, "scopes": list(SCOPES),
                         "policies": {n: p.model_dump(mode="json")
                                      for n, p in policies.current.policies.items()}})


@router.post("/policies/reload")
async def reload_policies(request: Request, _: Admin) -> JSONResponse:
    policies: PolicyStore = services(request.scope).policies
    try:
        policies.reload()
    except PolicyError as exc:
        raise InvalidRequest(f"Policy file refused, version {policies.version} stays in force: "
                             f"{exc}", code="invalid_policy_file") from None
    return JSONResponse({"version": policies.version,
                         "policies": sorted(policies.current.policies)})


@router.get("/usage")
async def usage(request: Request, _: Admin,
                client: str | None = Query(None, max_length=63),
                since: str | None = Query(None, alias="from"),
                until: str | None = Query(None, alias="to")) -> JSONResponse:
    for param, value in (("from", since), ("to", until)):
        if value is not None and not _DAY.match(value):
            raise InvalidRequest(f"'{param}' must be a day, YYYY-MM-DD.", param=param)
    ledger: BudgetLedger = services(request.scope).ledger
    return JSONResponse({"data": await ledger.repo.usage(client, since, until)})


@router.get("/engines")
async def list_engines(request: Request, pool: Pool, _: Admin) -> JSONResponse:
    """Every replica this gateway routes to, with its state (ready, down, ejected, half_open,
    draining, removed), in-flight count, ejection and the engine's reported load; each
    model's weights as routed now; when the manifests were last applied, and the last one
    refused (file and field)."""
    watcher = services(request.scope).manifests
    return JSONResponse({"data": [e.status() for e in pool.engines],
                         "models": {name: {"ready": route.ready(),
                                           "retry_budget": round(route.budget.tokens, 2),
                                           "prefix_affinity": route.prefixes is not None,
                                           "weights": {v.deployment.version.name:
                                                       route.weight_of(v)
                                                       for v in route.versions},
                                           "rollout": route.canary}
                                    for name, route in sorted(pool.routes.items())},
                         "manifests": {"applied_at": watcher.applied_at,
                                       "refused": watcher.last_error}})


def _targets(pool: PoolT, name: str) -> list[Replica]:
    group = pool.deployment(name)
    if group is not None:
        return list(group.replicas)
    replica = pool.replica(name)
    if replica is None:
        raise NotFound(f"no engine deployment or replica {name[:100]!r}; see GET "
                       "/admin/v1/engines", param="deployment")
    return [replica]


async def _drain(pool: PoolT, name: str, draining: bool) -> JSONResponse:
    replicas = _targets(pool, name)
    for replica in replicas:
        pool.set_draining(replica, draining)
    statuses = [r.status() for r in replicas]
    return JSONResponse({"deployment": name, "draining": draining,
                         "in_flight": sum(r.in_flight for r in replicas), "replicas": statuses})


@router.post("/engines/{name:path}/drain")
async def drain_engine(name: str, pool: Pool, _: Admin) -> JSONResponse:
    """No new requests for this deployment (every replica) or one replica, on this gateway;
    those in flight finish (watch ``in_flight``)."""
    return await _drain(pool, name, True)


@router.post("/engines/{name:path}/undrain")
async def undrain_engine(name: str, pool: Pool, _: Admin) -> JSONResponse:
    return await _drain(pool, name, False)


@router.post("/signing-keys/rotate", status_code=201)
async def rotate_signing_key(request: Request, _: Admin) -> JSONResponse:
    issuer: TokenIssuer = services(request.scope).issuer
    kid = await issuer.rotate()
    return JSONResponse({"kid": kid, "published": [k["kid"] for k in issuer.jwks()["keys"]]},
                        status_code=201)
