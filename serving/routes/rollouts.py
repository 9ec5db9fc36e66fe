"""The admin API's rollouts (``/admin/v1/rollouts``): start one, follow it, command it.

The same operations as ``enclave rollout``; the gateway holding the rollouts lease carries
them out (``rollouts.controller``), so the answer to a command is the row with the command
waiting on it: follow ``GET /admin/v1/rollouts/{model}`` to see it applied.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.domain.principal import Principal
from serving.durations import parse_duration
from serving.errors import Conflict, GatewayError, InvalidRequest, NotFound
from serving.rollouts.service import Overrides, RolloutRefused, RolloutService
from serving.routes.deps import Admin, services
from serving.routes.responses import JSONResponse

router = APIRouter(prefix="/admin/v1/rollouts")


class NewRollout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    steps: list[int] | None = Field(default=None, max_length=20,
                                    description="Rising percentages ending at 100")
    step_duration: str | None = Field(default=None, description="e.g. 5m")
    window: str | None = Field(default=None, description="The analysis window, e.g. 60s")
    eval: str | None = Field(default=None, max_length=64, description="The evaluation set")
    no_eval: bool = False


def _service(request: Request) -> RolloutService:
    return services(request.scope).rollouts


def _actor(principal: Principal) -> str:
    return f"admin:{principal.name}"


def _seconds(value: str | None, param: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None


def _refused(exc: RolloutRefused) -> GatewayError:
    if exc.kind == "conflict":
        return Conflict(str(exc), param=exc.param)
    if exc.kind == "missing":
        return NotFound(str(exc), param=exc.param)
    return InvalidRequest(str(exc), param=exc.param)


@router.post("", status_code=201)
async def start_rollout(body: NewRollout, request: Request, principal: Admin) -> JSONResponse:
    overrides = Overrides(steps=body.steps,
                          step_duration_s=_seconds(body.step_duration, "step_duration"),
                          window_s=_seconds(body.window, "window"), eval_set=body.eval,
                          no_eval=body.no_eval)
    try:
        record = await _service(request).start(body.model, body.version, _actor(principal),
                                               overrides)
    except RolloutRefused as exc:
        raise _refused(exc) from None
    return JSONResponse(record.as_dict(), status_code=201)


@router.get("")
async def list_rollouts(request: Request, _: Admin,
                        limit: int = Query(20, ge=1, le=200)) -> JSONResponse:
    records = await _service(request).repo.recent(limit)
    return JSONResponse({"data": [r.as_dict() for r in records]})


@router.get("/{model}")
async def rollout_status(model: str, request: Request, _: Admin) -> JSONResponse:
    found = await _service(request).status(model)
    if found is None:
        raise NotFound(f"model '{model[:64]}' has had no rollout", param="model")
    record, events = found
    return JSONResponse({**record.as_dict(), "events": [e.as_dict() for e in events]})


@router.post("/{model}/{command}", status_code=202)
async def command_rollout(model: str, command: Literal["pause", "resume", "promote", "abort"],
                          request: Request, principal: Admin) -> JSONResponse:
    try:
        record = await _service(request).command(model, command, _actor(principal))
    except RolloutRefused as exc:
        raise _refused(exc) from None
    return JSONResponse(record.as_dict(), status_code=202)
