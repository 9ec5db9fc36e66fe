"""Adding a version to a model's manifest file, keeping the operator's comments and layout
(ruamel.yaml's round trip), validated as a whole before the file is replaced."""

from __future__ import annotations

import io
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import RoundTripConstructor

from serving.domain.manifest import Manifest, ManifestError
from serving.storage.manifests import load_manifests
from serving.storage.yamlfile import parse_model

# PyYAML's (YAML 1.1) float: what the manifest loader takes for a number. ruamel reads YAML 1.2,
# where a plain ``3311740e6583`` (a revision, a digest) is a float too, and would write it back
# as ``.inf``; read as the loader reads it, it stays the string it is.
_YAML11_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE)


class _Constructor(RoundTripConstructor):
    def construct_yaml_float(self, node: Any) -> Any:
        if _YAML11_FLOAT.match(str(node.value)):
            return super().construct_yaml_float(node)
        return self.construct_scalar(node)  # a string (written back quoted: it is one)


_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_yaml_float)


def _yaml() -> YAML:
    yaml = YAML()
    yaml.Constructor = _Constructor
    yaml.preserve_quotes = True
    yaml.width = 100
    return yaml


def _write(path: Path, yaml: YAML, data: Any) -> None:
    out = io.StringIO()
    yaml.dump(data, out)
    text = out.getvalue()
    # The whole file must still be a valid manifest, read as the loader reads it (PyYAML's
    # YAML 1.1: ruamel's 1.2 would take a digest like 12e45 for a number).
    parse_model(text, f"{path} (after the change)", Manifest, ManifestError)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def set_versions(models_dir: Path, model: str, *, states: dict[str, str] | None = None,
                 traffic: dict[str, int] | None = None) -> None:
    """Set versions' states and (all of) the traffic split in ``model``'s manifest, comments
    and layout kept; refused (``ManifestError``) when the result would not validate."""
    path = models_dir / f"{model}.yaml"
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest for model '{model}'")
    yaml = _yaml()
    data = yaml.load(path.read_text())
    by_name = {v["name"]: v for v in data["versions"]}
    for version, state in (states or {}).items():
        if version not in by_name:
            raise ManifestError(f"{path}: no version '{version}'")
        if state == "serving" and "state" in by_name[version]:
            del by_name[version]["state"]  # the default
        elif state != "serving":
            by_name[version]["state"] = state
    if traffic is not None:
        for version in list(data["traffic"]):
            if version not in traffic:
                del data["traffic"][version]
        for version, weight in traffic.items():
            data["traffic"][version] = weight
    _write(path, yaml, data)


def _bindable(port: int) -> bool:
    """Nothing on this host listens on (or holds) ``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def add_version(models_dir: Path, model: str, version: str, source_path: Path, revision: str,
                sums: dict[str, str], port: int | None = None) -> dict[str, Any]:
    """Append ``version`` (weights in ``source_path``, pinned by ``sums``) to ``model``'s
    manifest, staged at traffic weight 0, its engine block copied from the version serving
    most of the traffic (local replicas only: engines elsewhere are the operator's to list)
    and moved to ``port`` or else the next ports that no manifest uses and nothing on this host
    holds. Returns the new version as written. Raises ``ManifestError``."""
    path = models_dir / f"{model}.yaml"
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest for model '{model}'; write one first")
    yaml = _yaml()
    data = yaml.load(path.read_text())
    versions = data["versions"]
    if any(v["name"] == version for v in versions):
        raise ManifestError(f"{path}: version '{version}' exists already")
    used = {port for m in load_manifests(models_dir) for d in m.all_deployments()
            for _, port, _ in d.version.engine.local_replicas()}
    # The engine block of the version serving most of the traffic (plain values: no
    # comments), without its endpoints: those are the old version's engines elsewhere.
    traffic = data.get("traffic") or {}
    template = max(versions, key=lambda v: (v.get("state", "serving") == "serving",
                                            traffic.get(v["name"], 0)))
    engine = json.loads(json.dumps(template["engine"]))
    engine.pop("endpoints", None)
    if int(engine.get("replicas", 1)) < 1:
        engine["replicas"] = 1
    replicas = int(engine.get("replicas", 1))
    wanted = range(port, port + max(replicas, 1)) if port is not None else None
    if wanted is not None and any(p in used for p in wanted):
        raise ManifestError(f"{path}: port {port} is another version's "
                            f"(ports in use by the manifests: {sorted(used)})")
    if port is None:  # the next ports no manifest uses and nothing on this host holds now
        port = max(used) + 1 if used else int(engine["port"])
        while any(p in used or not _bindable(p)
                  for p in range(port, port + max(replicas, 1))):
            port += 1
    engine["port"] = port
    entry = {"name": version, "source": {"kind": "path", "path": str(source_path)},
             "revision": revision, "sha256": dict(sorted(sums.items())), "engine": engine,
             "state": "staged"}
    versions.append(entry)
    data["traffic"][version] = 0
    _write(path, yaml, data)
    return entry
