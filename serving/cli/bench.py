"""`enclave bench`: measure the gateway's overhead and end-to-end throughput."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
from rich.table import Table

from serving.bench import protection, run
from serving.cli.common import console, fail, load_settings, stdout


def _table(title: str, cells: list[run.Cell]) -> Table:
    table = Table("target", "concurrency", "req/s", "p50 ms", "p99 ms", "errors", title=title)
    for c in cells:
        table.add_row(c.target, str(c.concurrency), f"{c.rps:,.0f}", f"{c.p50_ms:.2f}",
                      f"{c.p99_ms:.2f}", str(c.errors))
    return table


def _ratios(proxy: list[run.Cell]) -> list[str]:
    by = {(c.target, c.concurrency): c for c in proxy}
    lines = []
    for conc in sorted({c.concurrency for c in proxy}):
        gw, bare, up = by[("gateway", conc)], by[("bare proxy", conc)], by[("upstream", conc)]
        lines.append(f"c={conc}: gateway/bare proxy req/s = {gw.rps / bare.rps:.2f}x; "
                     f"gateway p50 adds {gw.p50_ms - up.p50_ms:+.2f} ms over the upstream, "
                     f"bare proxy adds {bare.p50_ms - up.p50_ms:+.2f} ms")
        shared = by.get(("gateway pg+redis", conc))
        if shared is not None:
            lines.append(f"c={conc}: gateway on PostgreSQL+Redis/bare proxy req/s = "
                         f"{shared.rps / bare.rps:.2f}x; p50 adds "
                         f"{shared.p50_ms - up.p50_ms:+.2f} ms over the upstream")
    return lines


@click.command()
@click.option("--seconds", default=5.0, show_default=True, help="Length of one measurement.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds (median kept).")
@click.option("--concurrency", "concurrencies", multiple=True, type=int, default=(1, 16, 64),
              show_default=True)
@click.option("--e2e/--no-e2e", default=True, help="Also measure against the real vLLM engine.")
@click.option("--e2e-concurrency", default=8, show_default=True)
@click.option("--shared-state/--no-shared-state", default=True,
              help="Also measure a gateway on PostgreSQL + Redis (Debian packages).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON.")
def bench(seconds: float, rounds: int, concurrencies: tuple[int, ...], e2e: bool,
          e2e_concurrency: int, shared_state: bool, json_out: Path | None) -> None:
    """Gateway vs bare FastAPI proxy vs upstream, and gateway vs vLLM direct, in one run."""
    if shutil.which("wrk") is None:
        fail("wrk is not installed (Debian: apt-get install wrk nginx-light)")
    settings = load_settings()

    def say(msg: str) -> None:
        console.print(f"[dim]{msg}[/]")

    proxy = run.proxy_overhead(seconds, rounds, list(concurrencies), settings.models_dir, say,
                               shared_state)
    stdout.print(_table("Proxy overhead (nginx canned answer upstream)", proxy))
    lines = _ratios(proxy)
    e2e_cells: list[run.Cell] = []
    if e2e:
        e2e_cells = run.end_to_end(seconds * 2, max(2, rounds - 1), e2e_concurrency,
                                   settings.models_dir, say)
        stdout.print(_table("End to end (demo-chat on vLLM, 32 tokens per request)", e2e_cells))
        direct, via = e2e_cells
        lines.append(f"end to end c={e2e_concurrency}: gateway/direct req/s = "
                     f"{via.rps / direct.rps:.3f}x")
    for line in lines:
        stdout.print(line)
    if json_out is not None:
        json_out.write_text(json.dumps({"proxy": run.to_json(proxy),
                                        "e2e": run.to_json(e2e_cells),
                                        "summary": lines}, indent=2) + "\n")


@click.command("bench-protection")
@click.option("--seconds", default=5.0, show_default=True, help="Length of one measurement.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds (median kept).")
@click.option("--concurrency", default=16, show_default=True)
def bench_protection(seconds: float, rounds: int, concurrency: int) -> None:
    """The cost of redaction, guards and the audit trail: the gateway with them against the
    same gateway without and the bare proxy (~1 KB prompts); detector and stream filter costs."""
    if shutil.which("wrk") is None:
        fail("wrk is not installed (Debian: apt-get install wrk nginx-light)")
    settings = load_settings()

    def say(msg: str) -> None:
        console.print(f"[dim]{msg}[/]")

    micro = protection.inprocess()
    cells = protection.gateway_cells(seconds, rounds, concurrency, settings.models_dir, say)
    stdout.print(_table(f"Data protection, ~1 KB prompts, c={concurrency}", cells))
    by = {c.target: c for c in cells}
    bare, plain, prot = by["bare proxy"], by["gateway"], by["gateway + protection"]
    stdout.print(f"gateway + protection / bare proxy req/s = {prot.rps / bare.rps:.2f}x; "
                 f"/ gateway without protection = {prot.rps / plain.rps:.2f}x; "
                 f"gateway / bare proxy = {plain.rps / bare.rps:.2f}x")
    for name, value in micro.items():
        stdout.print(f"{name}: {value:.1f}")
