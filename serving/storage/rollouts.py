"""Rows of rollouts, their transitions, their analysis windows, and the controller's lease.

Who writes what: ``create`` and ``command`` come from an operator (the CLI or the admin API);
everything else about a rollout (state, step, weights) only from the gateway that holds the
``rollouts`` lease (``acquire``: one statement, so two gateways cannot both hold it). Each
gateway writes its own rows of ``rollout_windows`` and nobody else's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, desc, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.storage.db import dialect_insert, leases, rollout_events, rollout_windows, rollouts

R = rollouts.c


class RolloutExists(Exception):
    """The model already has a rollout under way."""


class Stale(Exception):
    """The rollout changed since it was read (another controller acted): read it again."""


class CommandWaiting(Exception):
    """An abort waits on the rollout: no other command replaces it."""


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    id: str
    model: str
    version: str
    state: str
    paused: bool
    step: int
    step_started: float | None
    plan: dict[str, Any]
    weights: dict[str, int] | None
    stable: dict[str, int]
    command: str | None
    command_by: str | None
    reason: str | None
    detail: dict[str, Any]
    created_by: str
    created_at: float
    updated_at: float
    active: bool = True

    @property
    def steps(self) -> list[int]:
        return list(self.plan["steps"])

    @property
    def step_weight(self) -> int | None:
        return self.steps[self.step] if 0 <= self.step < len(self.steps) else None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "version": self.version,
                "state": self.state, "paused": self.paused, "active": self.active,
                "step": self.step, "step_weight": self.step_weight, "steps": self.steps,
                "step_started": self.step_started, "weights": self.weights,
                "stable": self.stable, "command": self.command, "reason": self.reason,
                "plan": self.plan, "detail": self.detail, "created_by": self.created_by,
                "created_at": self.created_at, "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    at: float
    from_state: str | None
    to_state: str
    step: int
    weights: dict[str, int] | None
    actor: str
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.from_state, "to": self.to_state, "step": self.step,
                "weights": self.weights, "actor": self.actor, "reason": self.reason}


@dataclass(slots=True)
class WindowRow:
    step: int
    window: int
    version: str
    gateway: str
    stats: dict[str, Any] = field(default_factory=dict)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _record(row: Any) -> RolloutRecord:
    m = row._mapping
    return RolloutRecord(
        id=m["id"], model=m["model"], version=m["version"], state=m["state"],
        paused=bool(m["paused"]), step=m["step"], step_started=m["step_started"],
        plan=json.loads(m["plan"]), weights=_loads(m["weights"]),
        stable=json.loads(m["stable"]), command=m["command"], command_by=m["command_by"],
        reason=m["reason"], detail=_loads(m["detail"]) or {}, created_by=m["created_by"],
        created_at=m["created_at"], updated_at=m["updated_at"],
        active=m["active_model"] is not None)


class RolloutRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # -- rollouts --------------------------------------------------------------------------

    async def create(self, record: RolloutRecord) -> None:
        values = {
            "id": record.id, "model": record.model, "active_model": record.model,
            "version": record.version, "state": record.state, "paused": int(record.paused),
            "step": record.step, "step_started": record.step_started,
            "plan": json.dumps(record.plan), "weights": None,
            "stable": json.dumps(record.stable), "command": None, "command_by": None,
            "reason": record.reason, "detail": json.dumps(record.detail),
            "created_by": record.created_by, "created_at": record.created_at,
            "updated_at": record.updated_at}
        try:
            async with self._engine.begin() as conn:
                await conn.execute(rollouts.insert().values(**values))
                await conn.execute(rollout_events.insert().values(
                    rollout_id=record.id, at=record.created_at, from_state=None,
                    to_state=record.state, step=record.step, weights=None,
                    actor=record.created_by, reason=record.reason))
        except IntegrityError:
            raise RolloutExists(record.model) from None

    async def get(self, rollout_id: str) -> RolloutRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(rollouts).where(R.id == rollout_id))).first()
        return _record(row) if row is not None else None

    async def active(self) -> list[RolloutRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(rollouts).where(R.active_model.is_not(None))
                                       .order_by(R.created_at))).all()
        return [_record(r) for r in rows]

    async def latest(self, model: str) -> RolloutRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(rollouts).where(R.model == model)
                                      .order_by(desc(R.created_at)).limit(1))).first()
        return _record(row) if row is not None else None

    async def recent(self, limit: int = 20) -> list[RolloutRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(rollouts).order_by(desc(R.created_at))
                                       .limit(limit))).all()
        return [_record(r) for r in rows]

    async def command(self, model: str, command: str, actor: str) -> RolloutRecord | None:
        """Leave ``command`` for the controller on the model's rollout under way; None when
        there is none."""
        waiting_ok = or_(R.command.is_(None), R.command != "abort")
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(rollouts).where(and_(R.active_model == model, waiting_ok)
                                       if command != "abort" else R.active_model == model)
                .values(command=command, command_by=actor))
            row = (await conn.execute(select(rollouts).where(R.active_model == model))).first()
        if row is None:
            return None
        if result.rowcount == 0:
            raise CommandWaiting(model)
        return _record(row)

    async def transition(self, current: RolloutRecord, actor: str, *, state: str | None = None,
                         reason: str | None = None, now: float, done_command: str | None = None,
                         **values: Any) -> RolloutRecord:
        """Move the rollout (the controller only): new state and fields, one event row, and
        the command it acted on cleared (only if it is still the one it read). Raises
        ``Stale`` when the row changed since ``current`` was read."""
        changes: dict[str, Any] = {"updated_at": now}
        for name, value in values.items():
            changes[name] = json.dumps(value) if name in ("weights", "detail", "plan") and (
                value is not None) else value
        if "paused" in changes:
            changes["paused"] = int(changes["paused"])
        if state is not None:
            changes["state"] = state
            if state in ("promoted", "rolled_back", "failed"):
                changes["active_model"] = None
        if reason is not None:
            changes["reason"] = reason
        async with self._engine.begin() as conn:
            # Only over the row as it was read: a controller that lost its lease while it
            # worked cannot write over the one that acts now.
            done = await conn.execute(update(rollouts).where(and_(
                R.id == current.id, R.updated_at == current.updated_at)).values(**changes))
            if done.rowcount == 0:
                raise Stale(current.id)
            if done_command is not None:
                await conn.execute(update(rollouts).where(
                    and_(R.id == current.id, R.command == done_command))
                    .values(command=None, command_by=None))
            row = (await conn.execute(select(rollouts).where(R.id == current.id))).one()
            updated = _record(row)
            if state is not None or reason is not None or "step" in values:
                await conn.execute(rollout_events.insert().values(
                    rollout_id=current.id, at=now, from_state=current.state,
                    to_state=updated.state, step=updated.step,
                    weights=json.dumps(updated.weights) if updated.weights else None,
                    actor=actor, reason=reason))
        return updated

    async def events(self, rollout_id: str) -> list[RolloutEvent]:
        e = rollout_events.c
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(rollout_events).where(e.rollout_id == rollout_id)
                                       .order_by(e.id))).all()
        return [RolloutEvent(at=r.at, from_state=r.from_state, to_state=r.to_state, step=r.step,
                             weights=_loads(r.weights), actor=r.actor, reason=r.reason)
                for r in rows]

    # -- analysis windows ------------------------------------------------------------------

    async def put_windows(self, rollout_id: str, gateway: str, rows: list[WindowRow],
                          now: float) -> None:
        if not rows:
            return
        w = rollout_windows.c
        insert = dialect_insert(self._engine, rollout_windows)
        async with self._engine.begin() as conn:
            for row in rows:
                stmt = insert.values(rollout_id=rollout_id, step=row.step, window=row.window,
                                     version=row.version, gateway=gateway,
                                     stats=json.dumps(row.stats), updated_at=now)
                await conn.execute(stmt.on_conflict_do_update(
                    index_elements=[w.rollout_id, w.step, w.window, w.version, w.gateway],
                    set_={"stats": stmt.excluded.stats, "updated_at": now}))

    async def windows(self, rollout_id: str, step: int) -> list[WindowRow]:
        w = rollout_windows.c
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(rollout_windows).where(
                and_(w.rollout_id == rollout_id, w.step == step)))).all()
        return [WindowRow(r.step, r.window, r.version, r.gateway, json.loads(r.stats))
                for r in rows]

    async def drop_windows(self, rollout_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(rollout_windows).where(
                rollout_windows.c.rollout_id == rollout_id))

    # -- the controller's lease --------------------------------------------------------------

    async def acquire(self, name: str, holder: str, ttl_s: float, now: float) -> bool:
        """Hold (or keep holding) the lease ``name`` until ``now + ttl_s``; False while another
        holder's lease runs."""
        lease = leases.c
        insert = dialect_insert(self._engine, leases)
        async with self._engine.begin() as conn:
            await conn.execute(insert.values(name=name, holder=holder, expires_at=now + ttl_s)
                               .on_conflict_do_nothing(index_elements=[lease.name]))
            result = await conn.execute(
                update(leases).where(and_(lease.name == name, or_(
                    lease.holder == holder, lease.expires_at < now)))
                .values(holder=holder, expires_at=now + ttl_s))
        return bool(result.rowcount)

    async def release(self, name: str, holder: str) -> None:
        lease = leases.c
        async with self._engine.begin() as conn:
            await conn.execute(delete(leases).where(and_(lease.name == name,
                                                         lease.holder == holder)))
