"""The gateway's Prometheus metrics, in a registry of its own (one per app).

Labels carry only bounded values: the route template, a manifest's model name (or ``unknown``),
the status code, a client name (clients are created by operators, not by callers). Never a
key, a client secret or request text.

Several worker processes (``enclave gateway --workers N``) share one set of metrics through
prometheus_client's multiprocess mode: each worker writes its values to files in one directory
(``share_between_processes``, before any metric is made) and a scrape of any worker sums them
(gauges: in-flight and audit queue summed over live workers, engine state the latest seen).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from serving.domain.endpoints import QUIET
from serving.domain.outcome import Outcome

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_M = TypeVar("_M", Counter, Histogram, Gauge)


def share_between_processes(directory: Path) -> None:
    """This process's metrics go to ``directory``, summed with the other workers' on scrape."""
    os.environ[_DIR_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def process_exited(pid: int, directory: Path) -> None:
    """A worker is gone: its live gauges no longer count."""
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}
        self.requests = Counter(
            "enclave_requests", "Requests by endpoint, model and HTTP status.",
            ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram(
            "enclave_request_duration_seconds", "Time from request to the last byte sent.",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "enclave_time_to_first_token_seconds", "Time from request to the first streamed event.",
            ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "enclave_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter(
            "enclave_completion_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.in_flight = Gauge(
            "enclave_requests_in_flight", "Requests being served now.", registry=r,
            multiprocess_mode="livesum")
        self.engine_up = Gauge(
            "enclave_engine_up", "1 when the engine answers /health.", ["model", "deployment"],
            registry=r, multiprocess_mode="livemostrecent")
        self.engine_draining = Gauge(
            "enclave_engine_draining", "1 while an operator drains the engine (no new requests).",
            ["model", "deployment"], registry=r, multiprocess_mode="livemostrecent")
        self.rejections = Counter(
            "enclave_rejections", "Requests refused by a client's policy, by reason: scope, "
            "model, no_policy, rate_requests, rate_tokens, concurrency, budget_day, "
            "budget_month.", ["client", "reason"], registry=r)
        self.client_tokens = Counter(
            "enclave_client_tokens", "Tokens charged to a client's budget, by model.",
            ["client", "model"], registry=r)
        self.guard_decisions = Counter(
            "enclave_guard_decisions", "Guard decisions by guard (pii_input, pii_output, "
            "injection, tools, caps), action (allow, redact, flag, block) and type (a personal "
            "data type, an injection signal, a parameter): never a value.",
            ["guard", "action", "type"], registry=r)
        self.audit_records = Counter(
            "enclave_audit_records", "Audit records written.", registry=r)
        self.audit_failures = Counter(
            "enclave_audit_write_failures", "Audit batches that could not be written.",
            registry=r)
        self.audit_queue = Gauge(
            "enclave_audit_queue", "Audit records waiting to be written.", registry=r,
            multiprocess_mode="livesum")
        replica = ["model", "deployment", "replica"]
        self.replica_routable = Gauge(
            "enclave_replica_routable", "1 when the replica may get new requests (healthy, not "
            "ejected, not draining); the least of the workers'.", replica, registry=r,
            multiprocess_mode="livemin")
        self.replica_ejected = Gauge(
            "enclave_replica_ejected", "1 while the replica is passively ejected (by any "
            "worker).", replica, registry=r, multiprocess_mode="livemax")
        self.replica_draining = Gauge(
            "enclave_replica_draining", "1 while an operator or the supervisor drains it.",
            replica, registry=r, multiprocess_mode="livemax")
        self.replica_in_flight = Gauge(
            "enclave_replica_in_flight", "Requests this gateway has outstanding on the "
            "replica.", replica, registry=r, multiprocess_mode="livesum")
        self.rollout_step = Gauge(
            "enclave_rollout_step_percent", "The canary's share in the current step of the "
            "model's rollout (0: no rollout in its canary steps).", ["model"],
            registry=r, multiprocess_mode="livemax")
        self.version_weight = Gauge(
            "enclave_model_version_weight", "Each serving version's traffic weight (percent) "
            "as the gateway routes now: the manifest's split, or a rollout's.",
            ["model", "version"], registry=r, multiprocess_mode="livemax")
        self.rollout_transitions = Counter(
            "enclave_rollout_transitions", "Rollout state changes made by this gateway's "
            "controller, by the state entered.", ["model", "state"], registry=r)
        self.rollouts_finished = Counter(
            "enclave_rollouts_finished", "Rollouts ended, by outcome (promoted, rolled_back, "
            "failed) and trigger (automatic: the controller decided; manual: an operator).",
            ["model", "outcome", "trigger"], registry=r)
        self.model_replicas = Gauge(
            "enclave_model_replicas", "Replicas known for the model.", ["model"], registry=r,
            multiprocess_mode="livemostrecent")
        self.model_replicas_routable = Gauge(
            "enclave_model_replicas_routable", "Replicas of the model that may get requests.",
            ["model"], registry=r, multiprocess_mode="livemostrecent")
        self.attempts = Counter(
            "enclave_upstream_attempts", "Attempts sent to replicas, by outcome: ok, engine_4xx, "
            "engine_5xx, connect_error, connect_timeout, first_byte_timeout, broken, "
            "client_gone.", ["model", "replica", "outcome"], registry=r)
        self.retries = Counter(
            "enclave_upstream_retries", "Attempts retried on another replica, by the failed "
            "attempt's outcome.", ["model", "reason"], registry=r)
        self.budget_exhausted = Counter(
            "enclave_retry_budget_exhausted", "Retries wanted but refused by the model's retry "
            "budget.", ["model"], registry=r)
        self.ejections = Counter(
            "enclave_replica_ejections", "Replicas passively ejected, by reason.",
            ["model", "replica", "reason"], registry=r)
        self.affinity = Counter(
            "enclave_affinity", "Prefix-affinity decisions: hit, miss, overloaded.",
            ["model", "result"], registry=r)
        self.fallbacks = Counter(
            "enclave_fallbacks", "Requests answered by a fallback model because every replica "
            "of the model was out.", ["model", "fallback"], registry=r)
        self.idempotent_replays = Counter(
            "enclave_idempotent_replays", "Requests answered from a stored answer (same "
            "Idempotency-Key and body).", ["model"], registry=r)
        self.client_disconnects = Counter(
            "enclave_client_disconnects", "Requests the client abandoned before the end.",
            ["endpoint", "model"], registry=r)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or every worker's summed."""
        directory = os.environ.get(_DIR_ENV)
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def _child(self, metric: _M, *labels: str) -> _M:
        """``metric.labels(*labels)``, looked up once per label set (every request would
        otherwise validate its labels and take the metric's lock)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]

    def count_guard(self, guard: str, action: str, kind: str, n: int = 1) -> None:
        self._child(self.guard_decisions, guard, action, kind).inc(n)

    def count_rejection(self, client: str, reason: str) -> None:
        self._child(self.rejections, client, reason).inc()

    def prime(self, models: dict[str, list[str]]) -> None:
        """Every model's routing counters at 0 from the start (``models``: model → replica
        names), so the first retry, ejection or fallback is an increase Prometheus sees."""
        for model, replicas in models.items():
            self._child(self.retries, model, "engine_5xx")
            self._child(self.budget_exhausted, model)
            self._child(self.affinity, model, "hit")
            self._child(self.idempotent_replays, model)
            for outcome in ("promoted", "rolled_back", "failed"):
                for trigger in ("automatic", "manual"):
                    self._child(self.rollouts_finished, model, outcome, trigger)
            self._child(self.rollout_transitions, model, "canary")
            for replica in replicas:
                self._child(self.attempts, model, replica, "ok")
                self._child(self.ejections, model, replica, "engine_5xx")
            for other in models:
                if other != model:
                    self._child(self.fallbacks, model, other)

    def count_attempt(self, model: str, replica: str, outcome: str) -> None:
        self._child(self.attempts, model, replica, outcome).inc()

    def count_retry(self, model: str, reason: str) -> None:
        self._child(self.retries, model, reason).inc()

    def count_budget_exhausted(self, model: str) -> None:
        self._child(self.budget_exhausted, model).inc()

    def count_ejection(self, model: str, replica: str, reason: str) -> None:
        self._child(self.ejections, model, replica, reason).inc()

    def count_affinity(self, model: str, result: str) -> None:
        self._child(self.affinity, model, result).inc()

    def count_fallback(self, model: str, fallback: str) -> None:
        self._child(self.fallbacks, model, fallback).inc()

    def count_replay(self, model: str) -> None:
        self._child(self.idempotent_replays, model).inc()

    def count_client_tokens(self, client: str, model: str, tokens: int) -> None:
        self._child(self.client_tokens, client, model).inc(tokens)

    def observe(self, outcome: Outcome) -> None:
        """A request's metrics, from its outcome (the probes are not counted)."""
        child = self._child
        if outcome.endpoint not in QUIET:
            model = outcome.model_label
            child(self.requests, outcome.endpoint, model, str(outcome.status)).inc()
            child(self.latency, outcome.endpoint, model).observe(outcome.duration_s)
        if outcome.model is None:
            return
        if outcome.prompt_tokens:
            child(self.prompt_tokens, outcome.model).inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            child(self.completion_tokens, outcome.model).inc(outcome.completion_tokens)
        if outcome.ttft_s is not None:
            child(self.ttft, outcome.model).observe(outcome.ttft_s)
        if outcome.client_disconnected:
            child(self.client_disconnects, outcome.endpoint, outcome.model).inc()
