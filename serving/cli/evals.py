"""`enclave eval`: run an evaluation set against a model version, straight to its engines (a
staged version has no traffic yet, and the gateway's policies are not what is measured), side
by side with another version; list the sets."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass

import click
import httpx
from rich.markup import escape
from rich.table import Table

from serving.cli.common import console, fail, load_settings, stdout
from serving.domain.manifest import ENDPOINTS_BY_TASK, Manifest, ManifestError, Version
from serving.evals.runner import ByModel, Count, ReplicaTarget, Report, Target, run_set
from serving.evals.sets import CHECK_KINDS, EvalSet, EvalSetError, load_set, set_names
from serving.settings import Settings
from serving.storage.manifests import load_manifests
from serving.upstream.tls import client_context

MAX_FAILURES_SHOWN = 20


@dataclass(frozen=True, slots=True)
class Engines:
    """One version's engines: what a ``ReplicaTarget`` posts to."""

    label: str  # MODEL@VERSION
    model: str  # the name vLLM serves it under
    urls: list[str]


class Unreachable(Exception):
    """An engine did not answer its health check."""


@click.group("eval")
def evals() -> None:
    """Evaluation sets (evals/NAME/*.jsonl): requests with checks on their answers."""


@evals.command("list")
def list_() -> None:
    """List the evaluation sets with their case counts and digests."""
    settings = load_settings()
    table = Table("set", "cases", "files", "digest")
    problems: list[str] = []
    for name in set_names(settings.evals_dir):
        try:
            eval_set = load_set(settings.evals_dir, name)
        except EvalSetError as exc:
            table.add_row(escape(name), "-", "-", "[red]invalid[/]")
            problems.append(str(exc))
            continue
        table.add_row(escape(name), str(len(eval_set.cases)), str(len(eval_set.files)),
                      eval_set.digest[:12])
    stdout.print(table)
    if problems:
        fail("\n".join(escape(p) for p in problems))


@evals.command("run")
@click.argument("target", metavar="MODEL@VERSION")
@click.argument("set_name", metavar="SET")
@click.option("--compare", metavar="VERSION", default=None,
              help="Run the set against this version of the same model too, side by side.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Cases in flight at once, per version.")
def run(target: str, set_name: str, compare: str | None, as_json: bool,
        concurrency: int) -> None:
    """Run the evaluation set SET against MODEL@VERSION's engines and print pass rates per
    kind of check."""
    settings = load_settings()
    try:
        eval_set = load_set(settings.evals_dir, set_name)
    except EvalSetError as exc:
        fail(escape(str(exc)))
    try:
        manifests = load_manifests(settings.models_dir)
    except ManifestError as exc:
        fail(escape(str(exc)))
    model, _, version = target.partition("@")
    if not model or not version:
        fail(f"name the version: MODEL@VERSION (e.g. demo-chat@v1), not {escape(target)!r}")
    manifest = _manifest(manifests, model)
    endpoints = {c.endpoint for c in eval_set.cases} - ENDPOINTS_BY_TASK[manifest.task]
    if endpoints:
        fail(f"set {set_name} has {', '.join(sorted(endpoints))} cases; {model} is a "
             f"{manifest.task} model")
    versions = [version] + ([compare] if compare else [])
    targets = [_engines(settings, manifest, _serving(manifest, v)) for v in versions]
    embedders, default = _embedders(settings, manifests, eval_set)
    try:
        reports = asyncio.run(_run(settings, eval_set, targets, embedders, default,
                                   concurrency))
    except Unreachable as exc:
        fail(escape(str(exc)))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        _print(eval_set, reports)


def _manifest(manifests: list[Manifest], model: str) -> Manifest:
    found = next((m for m in manifests if m.name == model), None)
    if found is None:
        fail(f"no model {escape(model)!r}; known: {', '.join(m.name for m in manifests)}")
    return found


def _serving(manifest: Manifest, name: str) -> Version:
    version = manifest.version(name)
    if version is None:
        fail(f"{manifest.name} has no version {escape(name)!r}; known: "
             f"{', '.join(v.name for v in manifest.versions)}")
    if version.state != "serving":
        fail(f"{manifest.name}@{name} is {version.state}: its engines do not run (a rollout "
             "starts a staged version's engines)")
    return version


def _engines(settings: Settings, manifest: Manifest, version: Version) -> Engines:
    engine = version.engine
    urls = [f"http://{settings.engine_host}:{port}" for _, port, _ in engine.local_replicas()]
    urls += [e.url for e in engine.endpoints]
    return Engines(f"{manifest.name}@{version.name}", manifest.name, urls)


def _embedders(settings: Settings, manifests: list[Manifest],
               eval_set: EvalSet) -> tuple[dict[str, Engines], str | None]:
    """The embedding models the set's ``similar`` checks need, by name, and the default one
    (the first embedding model with a serving version) for checks that name none."""
    named = {c.checks.similar.model for c in eval_set.cases
             if c.checks.similar is not None and c.checks.similar.model}
    needs_default = any(c.checks.similar is not None and not c.checks.similar.model
                        and c.endpoint != "embeddings" for c in eval_set.cases)
    serving = {m.name: m for m in manifests if m.task == "embed" and m.deployments()}
    default = next(iter(serving), None) if needs_default else None
    if needs_default and default is None:
        console.print("[yellow]warning:[/] no embedding model is serving: the similar checks "
                      "will fail")
    missing = sorted(named - set(serving))
    if missing:
        fail(f"a similar check names {escape(missing[0])!r}, which is not an embedding model "
             "with a serving version")
    return {name: _engines(settings, serving[name], serving[name].deployments()[0].version)
            for name in named | ({default} if default else set())}, default


async def _run(settings: Settings, eval_set: EvalSet, targets: list[Engines],
               embedders: dict[str, Engines], default: str | None,
               concurrency: int) -> list[Report]:
    every = targets + list(embedders.values())
    verify: ssl.SSLContext | bool = True
    if any(u.startswith("https://") for e in every for u in e.urls):
        try:
            verify = client_context(settings.engine_ca_file, settings.engine_cert_file,
                                    settings.engine_key_file)
        except ValueError as exc:
            raise Unreachable(str(exc)) from None
    timeout = httpx.Timeout(settings.upstream_read_timeout_s,
                            connect=settings.upstream_connect_timeout_s)
    async with httpx.AsyncClient(timeout=timeout, verify=verify) as client:
        for engines in every:
            await _reach(client, engines)
        by_model: dict[str, Target] = {
            name: ReplicaTarget(client, e.urls, e.model) for name, e in embedders.items()}
        embedder = ByModel(by_model, default) if by_model else None
        return [await run_set(eval_set, ReplicaTarget(client, t.urls, t.model), embedder,
                              concurrency, label=t.label) for t in targets]


async def _reach(client: httpx.AsyncClient, engines: Engines) -> None:
    """Every engine answers its health check, so a refused connection reads as what it is
    rather than as a set of failed checks."""
    for url in engines.urls:
        try:
            response = await client.get(f"{url}/health")
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach {engines.label} at {url}: "
                              f"{str(exc) or type(exc).__name__}") from None
        if response.status_code != 200:
            raise Unreachable(f"cannot reach {engines.label} at {url}: its health check "
                              f"answered HTTP {response.status_code}")


def _print(eval_set: EvalSet, reports: list[Report]) -> None:
    table = Table("check", *(escape(r.label) for r in reports),
                  title=f"{escape(eval_set.name)}: {len(eval_set.cases)} cases, digest "
                        f"{eval_set.digest[:12]}")
    for kind in CHECK_KINDS:
        if any(r.checks[kind].total for r in reports):
            table.add_row(kind, *(_rate(r.checks[kind]) for r in reports))
    table.add_section()
    table.add_row("[bold]cases[/]", *(f"[bold]{_rate(Count(r.passed, r.cases))}[/]"
                                      for r in reports))
    stdout.print(table)
    for report in reports:
        failed = [r for r in report.results if not r.passed]
        for result in failed[:MAX_FAILURES_SHOWN]:
            stdout.print(f"{report.label} {result.id}: {'; '.join(result.failures)}",
                         markup=False)
        if len(failed) > MAX_FAILURES_SHOWN:
            stdout.print(f"{report.label}: {len(failed) - MAX_FAILURES_SHOWN} more failed "
                         "cases (--json lists them all)", markup=False)


def _rate(count: Count) -> str:
    return f"{count.rate:.0%} ({count.passed}/{count.total})" if count.total else "-"
