"""`enclave models`: build the demo model, list the manifests."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from serving.cli.common import console, fail, load_settings, stdout
from serving.domain.manifest import ManifestError
from serving.engines.environment import EngineEnvironment
from serving.engines.sources import build_demo, model_cache
from serving.settings import Settings
from serving.storage.manifests import load_manifests


def ensure_engine_env(settings: Settings) -> EngineEnvironment:
    env = EngineEnvironment(settings.engine_env_dir)
    if not env.is_ready():
        import subprocess

        try:
            env.ensure(lambda msg: console.print(f"[cyan]engine environment:[/] {msg}"))
        except subprocess.CalledProcessError as exc:
            fail(f"setting up the engine environment failed ({exc}); see the output above")
    return env


def _pinned_demo_sums(settings: Settings) -> dict[str, str]:
    """The checksums the manifests pin for the built demo model (any version)."""
    pinned: dict[str, str] = {}
    with contextlib.suppress(ManifestError):
        for manifest in load_manifests(settings.models_dir):
            for version in manifest.versions:
                if version.source.kind == "built" and version.source.path == "demo-chat":
                    pinned.update(version.sha256)
    return pinned


def _built_matches(out: Path, pinned: dict[str, str]) -> bool:
    try:
        built = json.loads((out / "SHA256SUMS.json").read_text())
    except (OSError, ValueError):
        return False
    return all(built.get(name) == digest for name, digest in pinned.items())


def build_demo_model(settings: Settings, force: bool = False) -> None:
    out = model_cache(settings.cache_dir) / "demo-chat"
    if out.is_dir() and _built_matches(out, _pinned_demo_sums(settings)) and not force:
        console.print(f"demo model already built in {out}")
        return
    env = ensure_engine_env(settings)
    with Progress(TextColumn("[bold]demo-chat[/]"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("starting", total=5)

        def on_progress(step: int, of: int, what: str) -> None:
            progress.update(task, completed=step - 1, total=of, description=what)

        try:
            build_demo(env, out, on_progress)
        except RuntimeError as exc:
            fail(str(exc))
        progress.update(task, completed=5, description="done")
    console.print(f"demo model built in {out}")


@click.group()
def models() -> None:
    """Model manifests and local model builds."""


@models.command("build-demo")
@click.option("--force", is_flag=True, help="Rebuild even if it exists.")
def build_demo_cmd(force: bool) -> None:
    """Build the tiny demo chat model (deterministic) into the local cache."""
    build_demo_model(load_settings(), force=force)


@models.command("list")
def list_() -> None:
    """List the model manifests."""
    settings = load_settings()
    try:
        manifests = load_manifests(settings.models_dir)
    except ManifestError as exc:
        fail(str(exc))
    table = Table("model", "task", "version", "traffic", "port", "source")
    for m in manifests:
        for dep in m.deployments():
            src = dep.version.source
            table.add_row(m.name, m.task, dep.version.name, f"{dep.weight}%",
                          str(dep.port), f"{src.kind}:{src.package or ''}{src.path}")
    stdout.print(table)
