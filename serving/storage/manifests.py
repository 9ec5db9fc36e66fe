"""The model manifests on disk: one YAML file per model in ``models/``, read and validated into
``domain.manifest.Manifest``; errors name the file and the field at fault."""

from __future__ import annotations

from pathlib import Path

from serving.domain.manifest import Manifest, ManifestError
from serving.storage.yamlfile import parse_model


def load_manifest(path: Path) -> Manifest:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    manifest = parse_model(text, str(path), Manifest, ManifestError)
    if path.stem != manifest.name:
        raise ManifestError(f"{path}: the file must be named {manifest.name}.yaml")
    return manifest


def load_manifests(directory: Path) -> list[Manifest]:
    if not directory.is_dir():
        raise ManifestError(f"{directory}: no such models directory")
    manifests = [load_manifest(p) for p in sorted(directory.glob("*.yaml"))]
    ports: dict[int, str] = {}
    for manifest in manifests:
        for dep in manifest.all_deployments():  # a staged version's ports are taken too
            for index, port, _ in dep.version.engine.local_replicas():
                name = dep.replica_name(index)
                if port in ports:
                    raise ManifestError(
                        f"{directory}: {name} and {ports[port]} both use port {port}")
                ports[port] = name
    return manifests
