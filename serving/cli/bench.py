"""`enclave bench`: measure the gateway's overhead and end-to-end throughput."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
from rich.table import Table

from serving.bench import matrix, protection, routing, run
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
@click.option("--matrix", "matrix_", is_flag=True, help="The cost matrix instead: prompt sizes x "
              "density x streamed or not x concurrency, bare proxy vs auth only vs every "
              "guard, with CPU per request and per KB.")
@click.option("--size", "sizes", multiple=True, type=float, default=matrix.SIZES_KB,
              show_default=True, help="Matrix: prompt sizes in KB.")
@click.option("--streams", type=click.Choice(["both", "no", "only"]), default="both",
              show_default=True, help="Matrix: non-streamed answers, streamed, or both.")
@click.option("--workers", default=1, show_default=True,
              help="Matrix: also measure an every-guard gateway with this many workers.")
@click.option("--routing", "routing_", is_flag=True, help="What one routing decision costs, "
              "in-process (prefix keys, pick, release), by body size and replica count.")
def bench(seconds: float, rounds: int, concurrencies: tuple[int, ...], e2e: bool,
          e2e_concurrency: int, shared_state: bool, json_out: Path | None, matrix_: bool,
          sizes: tuple[float, ...], streams: str, workers: int, routing_: bool) -> None:
    """Gateway vs bare FastAPI proxy vs upstream, and gateway vs vLLM direct, in one run;
    or (--matrix) what the gateway costs as prompts grow; or (--routing) what routing costs."""
    if routing_:
        rows = routing.measure(seconds=min(seconds, 1.0), rounds=rounds)
        table = Table("body", "replicas", "CPU us/request", "added to baseline",
                      title="Routing, per request (medians of interleaved rounds)")
        for row in rows:
            table.add_row(f"{row['size_kb']} KB", str(row["case"]), f"{row['us_per_request']}",
                          f"{row['added_us']} us")
        stdout.print(table)
        worst = max(float(str(r["added_us"])) for r in rows)
        stdout.print(f"routing adds at most {worst:.1f} us of CPU per request "
                     f"(target 20 us: {'met' if worst <= 20 else 'missed'})")
        if json_out is not None:
            json_out.write_text(json.dumps({"routing": rows}, indent=2) + "\n")
        return
    if shutil.which("wrk") is None:
        fail("wrk is not installed (Debian: apt-get install wrk nginx-light)")
    settings = load_settings()

    def say(msg: str) -> None:
        console.print(f"[dim]{msg}[/]")

    if matrix_:
        modes = {"both": (False, True), "no": (False,), "only": (True,)}[streams]
        with matrix.running_targets(settings.models_dir, workers) as found:
            cells = matrix.measure(found, matrix.cases(tuple(sizes), modes),
                                   list(concurrencies), seconds, rounds, say)
        _print_matrix(cells, list(found))
        if json_out is not None:
            json_out.write_text(json.dumps({"matrix": matrix.to_json(cells),
                                            "summary": _matrix_summary(cells)},
                                           indent=2) + "\n")
        return

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


def _print_matrix(cells: list[matrix.Cell], names: list[str]) -> None:
    bare = names[0]
    table = Table("prompt", "c", *[f"{n} req/s" for n in names],
                  *[f"{n} / bare" for n in names[1:]], *[f"{n} CPU us/req" for n in names],
                  title="The cost matrix (nginx answers; medians of interleaved rounds)")
    by = {(x.case, x.concurrency, x.target): x for x in cells}
    for case in dict.fromkeys(x.case for x in cells):
        for c in sorted({x.concurrency for x in cells}):
            row = [by[(case, c, n)] for n in names]
            ratios = [matrix.ratio(cells, case, c, n, bare) for n in names[1:]]
            table.add_row(case, str(c), *[f"{x.rps:,.0f}" for x in row],
                          *[f"{r:.2f}x" if r is not None else "-" for r in ratios],
                          *[f"{x.cpu_us_per_request:,.0f}" for x in row])
    stdout.print(table)
    for line in _matrix_summary(cells):
        stdout.print(line)


def _matrix_summary(cells: list[matrix.Cell]) -> list[str]:
    """The issue's targets, each with its figure and whether it is met."""
    guard, bare = matrix.TARGETS[2], matrix.TARGETS[0]
    lines = []
    for case, least in matrix.RATIO_TARGETS:
        r = matrix.ratio(cells, case, 16, guard, bare)
        if r is not None:
            lines.append(f"every guard / bare proxy, {case}, c=16: {r:.2f}x "
                         f"(target >= {least}x: {'met' if r >= least else 'MISSED'})")
    for dense, most in matrix.PER_KB_TARGETS.items():
        kind = "dense" if dense else "plain"
        for target in matrix.TARGETS:
            slope = matrix.per_kb(cells, target, dense)
            if slope is None:
                continue
            verdict = (f" (target <= {most:.0f}: {'met' if slope <= most else 'MISSED'})"
                       if target == guard else "")
            lines.append(f"CPU per extra KB of prompt, {kind}, {target}: {slope:.1f} us"
                         + verdict)
    for target in matrix.TARGETS:
        chunk = matrix.per_chunk(cells, target)
        if chunk is not None:
            verdict = (f" (target <= {matrix.PER_CHUNK_TARGET:.0f}: "
                       f"{'met' if chunk <= matrix.PER_CHUNK_TARGET else 'MISSED'})"
                       if target == guard else "")
            lines.append(f"CPU per streamed event, {target}: {chunk:.1f} us" + verdict)
    return lines


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
