"""`enclave models`: build the demo model, list the manifests, import and verify weights."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from serving.cli.common import console, fail, load_settings, stdout
from serving.domain.manifest import ManifestError
from serving.engines.environment import EngineEnvironment
from serving.engines.sources import build_demo, model_cache, resolve_model_dir
from serving.engines.store import StoreError, hash_tree, import_tree, verify_tree
from serving.settings import Settings
from serving.storage.manifest_edit import add_version
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
    table = Table("model", "task", "version", "state", "traffic", "port", "source")
    for m in manifests:
        for dep in m.all_deployments():
            src = dep.version.source
            where = f"{src.package}/{src.path}" if src.package else src.path
            table.add_row(m.name, m.task, dep.version.name, dep.version.state, f"{dep.weight}%",
                          str(dep.port), f"{src.kind}:{where}")
    stdout.print(table)


@models.command("import")
@click.argument("name")
@click.option("--from", "src", required=True, type=click.Path(path_type=Path, exists=True,
              file_okay=False), help="The weights directory (a Hugging Face snapshot as is).")
@click.option("--version", "version", required=True, help="The new version's name (v2).")
@click.option("--revision", default=None, help="Where the weights come from (a commit, a "
              "training run); default the import's first 12 hex of the weights' digest.")
@click.option("--port", type=click.IntRange(1024, 65535), default=None,
              help="The first replica's port (default: the next ports no manifest uses and "
              "nothing on this host holds).")
def import_cmd(name: str, src: Path, version: str, revision: str | None,
               port: int | None) -> None:
    """Hash every file of a weights directory, keep the files in the content-addressed model
    store, and add the version to the model's manifest (traffic 0) with its sha256 table."""
    settings = load_settings()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("hashing", total=None)
        try:
            sums = hash_tree(src, lambda done, total: bar.update(task, completed=done,
                                                                  total=total))
        except StoreError as exc:
            fail(str(exc))
    try:
        manifest = next(m for m in load_manifests(settings.models_dir) if m.name == name)
    except (ManifestError, StopIteration):
        fail(f"no valid manifest for model '{name}' in {settings.models_dir}")
    existing = next((v for v in manifest.versions if v.name == version), None)
    if existing is not None:
        if existing.sha256 == sums:
            stdout.print(f"{name}@{version} is already imported with these bytes", markup=False)
            return
        fail(f"{name}@{version} exists with other bytes: choose another version name")
    dest = settings.model_store_dir / "versions" / name / version
    try:
        import_tree(src, sums, settings.model_store_dir, dest)
        whole = hashlib.sha256("".join(sorted(sums.values())).encode()).hexdigest()
        entry = add_version(settings.models_dir, name, version, dest, revision or whole[:12],
                            sums, port)
    except (StoreError, ManifestError) as exc:
        fail(str(exc))
    if entry["engine"].get("devices"):
        console.print(f"[yellow]note:[/] {version}'s engine was copied with the serving "
                      f"version's devices {entry['engine']['devices']}: if those GPUs cannot "
                      f"hold both versions, give {version} devices of its own in "
                      f"{settings.models_dir / (name + '.yaml')} before the rollout")
    stdout.print(f"imported {name}@{version}: {len(sums)} files, engine port "
                 f"{entry['engine']['port']}, staged (traffic 0, no engine until a rollout starts "
                 f"it: enclave rollout start {name} {version})", markup=False)


@models.command("verify")
@click.argument("target")
def verify_cmd(target: str) -> None:
    """Check a model's versions (NAME) or one (NAME@VERSION) against their pinned sha256."""
    settings = load_settings()
    name, _, only = target.partition("@")
    try:
        manifest = next(m for m in load_manifests(settings.models_dir) if m.name == name)
    except (ManifestError, StopIteration):
        fail(f"no valid manifest for model '{name}' in {settings.models_dir}")
    deps = [d for d in manifest.all_deployments() if not only or d.version.name == only]
    if not deps:
        fail(f"{name} has no version '{only}'")
    env = None
    failed = False
    for dep in deps:
        if dep.version.source.kind == "python-package" and env is None:
            env = ensure_engine_env(settings)
        directory = resolve_model_dir(dep, settings.cache_dir, env)  # type: ignore[arg-type]
        try:
            verify_tree(directory, dep.version.sha256)
        except StoreError as exc:
            failed = True
            stdout.print(f"{dep.model}@{dep.version.name}: FAILED: {exc}", markup=False)
            continue
        stdout.print(f"{dep.model}@{dep.version.name}: ok ({len(dep.version.sha256)} files)",
                     markup=False)
    if failed:
        raise SystemExit(1)
