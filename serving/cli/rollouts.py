"""`enclave rollout`: move a model's traffic to a new version in steps, and back.

The commands write to the state database the gateways share; the gateway holding the rollouts
lease carries them out. ``start --wait`` and ``status --watch`` follow the rollout as it goes.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from datetime import UTC, datetime

import click
from rich.table import Table

from serving.cli.common import Store, console, fail, load_settings, stdout, with_store
from serving.domain.rollout import DONE_STATES
from serving.durations import parse_duration
from serving.rollouts.service import Overrides, RolloutRefused
from serving.storage.rollouts import RolloutEvent, RolloutRecord


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _seconds(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        fail(f"{option}: {exc}")


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")


def _weights(weights: dict[str, int] | None) -> str:
    return ", ".join(f"{v} {w}%" for v, w in weights.items()) if weights else "(manifest's)"


def _side(side: dict[str, object]) -> str:
    def ms(value: object) -> str:
        return f"{float(value) * 1000:.0f} ms" if isinstance(value, int | float) else "-"

    rate = side.get("error_rate")
    errors = f"{float(rate):.1%}" if isinstance(rate, int | float) else "-"
    return (f"{side.get('requests', 0)} requests, errors {errors}, TTFT p95 "
            f"{ms(side.get('ttft_p95_s'))}, TPOT p95 {ms(side.get('tpot_p95_s'))}")


def _print(record: RolloutRecord, events: list[RolloutEvent]) -> None:
    step = (f"{record.step + 1}/{len(record.steps)} ({record.step_weight}%)"
            if record.step >= 0 else f"- of {record.steps}")
    stdout.print(f"rollout {record.id}: {record.model} → {record.version}  "
                 f"[bold]{record.state}[/]{' (paused)' if record.paused else ''}")
    stdout.print(f"  step {step}   weights: {_weights(record.weights)}")
    if record.reason:
        stdout.print(f"  {record.reason}", markup=False)
    window = record.detail.get("last_window")
    if window:
        canary, stable = window.get("canary") or {}, window.get("stable") or {}
        stdout.print(f"  last window (step {window['step'] + 1}, #{window['window'] + 1}): "
                     f"{window['result']}; canary {_side(canary)}; stable {_side(stable)}"
                     + "".join(f"\n    {reason}" for reason in window.get("reasons", [])),
                     markup=False)
    evaluation = record.detail.get("eval")
    if evaluation:
        stable_eval = evaluation.get("stable") or {}
        stdout.print(f"  eval {evaluation['set']} ({evaluation['digest'][:12]}): canary "
                     f"{evaluation['canary']['pass_rate']:.0%}, stable "
                     f"{stable_eval.get('pass_rate', float('nan')):.0%}", markup=False)
    table = Table("time", "from", "to", "step", "weights", "by", "why")
    for e in events[-15:]:
        table.add_row(_when(e.at), e.from_state or "", e.to_state,
                      str(e.step + 1) if e.step >= 0 else "", _weights(e.weights), e.actor,
                      e.reason or "")
    stdout.print(table)


@click.group("rollout")
def rollout() -> None:
    """Roll a model version out in canary steps (and back)."""


@rollout.command("start")
@click.argument("model")
@click.argument("version")
@click.option("--steps", help="Canary shares, rising to 100 (default the manifest's "
              "rollout.steps, else 5,25,50,100).")
@click.option("--step-duration", help="How long each step lasts at least (e.g. 5m).")
@click.option("--window", help="The analysis window (e.g. 60s).")
@click.option("--eval", "eval_set", help="The evaluation set the version must pass first.")
@click.option("--no-eval", is_flag=True, help="No evaluation gate.")
@click.option("--wait", is_flag=True, help="Follow it until it ends; exit 1 unless promoted.")
def start(model: str, version: str, steps: str | None, step_duration: str | None,
          window: str | None, eval_set: str | None, no_eval: bool, wait: bool) -> None:
    """Start rolling VERSION of MODEL out (verify, start, evaluate, canary steps, promote)."""
    settings = load_settings()
    try:
        parsed = [int(s) for s in steps.split(",")] if steps else None
    except ValueError:
        fail("--steps: whole percentages separated by commas, e.g. 5,25,50,100")
    overrides = Overrides(steps=parsed,
                          step_duration_s=_seconds(step_duration, "--step-duration"),
                          window_s=_seconds(window, "--window"), eval_set=eval_set,
                          no_eval=no_eval)

    async def go(store: Store) -> RolloutRecord:
        try:
            return await store.rollouts.start(model, version, _actor(), overrides)
        except RolloutRefused as exc:
            fail(str(exc))

    record = with_store(settings, go)
    console.print(f"rollout {record.id} of {model} → {version} started: steps "
                  f"{record.steps}, {record.plan['step_duration_s']:.0f} s each, eval "
                  f"{record.plan['eval']['set'] or 'none'}; a gateway's controller carries it "
                  f"out (enclave rollout status {model})")
    if wait:
        _follow(model, until_done=True)


@rollout.command("status")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Print each change until the rollout ends.")
def status(model: str | None, as_json: bool, watch: bool) -> None:
    """The latest rollout of MODEL (all recent ones without MODEL)."""
    settings = load_settings()
    if model is None:
        records = with_store(settings, lambda s: s.rollouts.repo.recent(20))
        if as_json:
            stdout.print_json(json.dumps([r.as_dict() for r in records]))
            return
        table = Table("id", "model", "version", "state", "step", "weights", "started")
        for r in records:
            table.add_row(r.id, r.model, r.version, r.state + (" (paused)" if r.paused else ""),
                          str(r.step_weight or ""), _weights(r.weights), _when(r.created_at))
        stdout.print(table)
        return
    if watch:
        _follow(model, until_done=True)
        return
    found = with_store(settings, lambda s: s.rollouts.status(model))
    if found is None:
        fail(f"model '{model}' has had no rollout")
    record, events = found
    if as_json:
        stdout.print_json(json.dumps({**record.as_dict(),
                                      "events": [e.as_dict() for e in events]}))
        return
    _print(record, events)


def _follow(model: str, until_done: bool) -> None:
    settings = load_settings()

    async def watch(store: Store) -> str:
        seen = 0
        while True:
            found = await store.rollouts.status(model)
            if found is not None:
                record, events = found
                for e in events[seen:]:
                    stdout.print(f"{_when(e.at)}  {e.to_state:<12} step "
                                 f"{e.step + 1 if e.step >= 0 else '-'}  "
                                 f"{_weights(e.weights)}  {e.reason or ''}", markup=False)
                seen = len(events)
                if until_done and record.state in DONE_STATES:
                    return record.state
            await asyncio.sleep(1.0)

    started = time.monotonic()
    state = with_store(settings, watch)
    console.print(f"{state} after {time.monotonic() - started:.0f} s")
    if state != "promoted":
        raise SystemExit(1)


def _command(name: str, help_text: str) -> None:
    @rollout.command(name, help=help_text)
    @click.argument("model")
    def run(model: str) -> None:
        settings = load_settings()

        async def go(store: Store) -> RolloutRecord:
            try:
                return await store.rollouts.command(model, name, _actor())
            except RolloutRefused as exc:
                fail(str(exc))

        record = with_store(settings, go)
        console.print(f"{name} sent to rollout {record.id} ({record.state}); the controller "
                      "applies it within a second or two")


_command("pause", "Hold the rollout at its current step (the canary keeps its share).")
_command("resume", "Go on from the current step (its analysis starts again).")
_command("promote", "Send all traffic to the new version now and retire the old one.")
_command("abort", "Roll back: the stable weights back, the new version drained and stopped.")
