"""The model registry's schema: one manifest per model (``storage.manifests`` reads ``models/``).

A manifest names the model clients call, its task, its versions (where the weights come from,
their pinned checksums, the vLLM engine arguments) and how traffic splits across versions.
Loading validates everything and fails with the file and field at fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.domain.rollout import RolloutPolicy

NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"
# Engine flags the supervisor owns: a manifest must not move the engine off loopback or expose
# vLLM's development endpoints.
OWNED_ENGINE_ARGS = frozenset({
    "--host", "--port", "--model", "--served-model-name", "--api-key", "--uds",
    "--shutdown-timeout",
    "--enable-server-load-tracking", "--allow-credentials", "--allowed-origins",
})
# Flags that would let a request do what the gateway's contract refuses (a template or
# processor arguments from the request, prompt embeddings, media fetched from URLs or read from
# the engine host's disk, calls to an outside tool server), open another listener, load code,
# or write prompts and answers into the engine's log.
UNSAFE_ENGINE_ARGS = frozenset({
    "--trust-request-chat-template", "--trust-request-mm-kwargs", "--enable-prompt-embeds",
    "--allowed-local-media-path", "--allowed-media-domains", "--tool-server", "--middleware",
    "--grpc-port", "--enable-log-requests", "--enable-log-outputs", "--root-path",
})
FORBIDDEN_ENGINE_ARGS = OWNED_ENGINE_ARGS | UNSAFE_ENGINE_ARGS
# Engine environment variables that open development endpoints (/collective_rpc, /sleep, ...)
# or turn request logging on.
FORBIDDEN_ENGINE_ENV = frozenset({
    "VLLM_SERVER_DEV_MODE", "VLLM_DEBUG_LOG_API_SERVER_RESPONSE",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_TORCH_PROFILER_DIR",
})

Task = Literal["chat", "embed"]
# serving: its engines run and it may take traffic; staged: imported, engines not started (a
# rollout starts them); retired: rolled back or replaced, engines stopped.
VersionState = Literal["serving", "staged", "retired"]
ENDPOINTS_BY_TASK: dict[str, frozenset[str]] = {
    "chat": frozenset({"chat", "completions"}),
    "embed": frozenset({"embeddings"}),
}


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the problem."""


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["built", "python-package", "path"]
    # built: a directory under the cache's models/ made by an `enclave models build-*` command.
    # python-package: a directory inside an installed package of the engine environment.
    # path: an absolute directory (pinned weights on a GPU host).
    name: str | None = None
    package: str | None = None
    path: str

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Source:
        if self.kind == "python-package" and not self.package:
            raise ValueError("source.package is required when kind is python-package")
        if self.kind == "path" and not Path(self.path).is_absolute():
            raise ValueError("source.path must be absolute when kind is path")
        if self.kind != "path" and (Path(self.path).is_absolute() or ".." in Path(self.path).parts):
            raise ValueError("source.path must be a relative path without '..'")
        return self


class Endpoint(BaseModel):
    """An engine (or a fleet of them) this host does not supervise.

    ``url`` is ``https://host:port`` (``http://`` only where the gateway allows plain text to
    engines). A host given as an address is one replica; a name is re-resolved every few
    seconds and each of its private addresses is a replica (a Kubernetes headless service, an
    internal DNS name for a fleet)."""

    model_config = ConfigDict(extra="forbid")

    url: str

    @field_validator("url")
    @classmethod
    def _plain_origin(cls, url: str) -> str:
        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError("an endpoint url starts with https:// (or http://)")
        if not parsed.hostname or parsed.port is None:
            raise ValueError("an endpoint url names a host and a port: https://host:port")
        if parsed.username or parsed.password or parsed.query or parsed.fragment or (
                parsed.path not in ("", "/")):
            raise ValueError("an endpoint url is scheme://host:port, nothing more")
        return url.rstrip("/")

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0


class Engine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=1024, le=65535, description="The first local replica's port; "
                      "replica i listens on port + i")
    max_model_len: int = Field(ge=16)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: float = Field(600.0, gt=0)
    replicas: int = Field(1, ge=0, le=64, description="Engines this host supervises")
    devices: list[str] = Field(
        default_factory=list, description="GPU devices for the local replicas, handed out "
        "devices_per_replica at a time in order (CUDA_VISIBLE_DEVICES)")
    devices_per_replica: int = Field(1, ge=1, le=16)
    endpoints: list[Endpoint] = Field(default_factory=list)
    shutdown_timeout_s: int = Field(
        60, ge=0, description="vLLM's --shutdown-timeout: on SIGTERM, requests in flight get "
        "this long to finish")

    @model_validator(mode="after")
    def _replicas_fit(self) -> Engine:
        if self.replicas == 0 and not self.endpoints:
            raise ValueError("a version needs replicas >= 1 or at least one endpoint")
        if self.port + max(self.replicas, 1) - 1 > 65535:
            raise ValueError(f"replicas use ports {self.port}..{self.port + self.replicas - 1}, "
                             "past 65535")
        if self.devices:
            wanted = self.replicas * self.devices_per_replica
            if len(self.devices) < wanted:
                raise ValueError(f"{self.replicas} replicas of {self.devices_per_replica} "
                                 f"device(s) need {wanted} devices; {len(self.devices)} listed")
            if len(set(self.devices)) != len(self.devices):
                raise ValueError("devices repeat")
            if "CUDA_VISIBLE_DEVICES" in self.env:
                raise ValueError("set devices or env.CUDA_VISIBLE_DEVICES, not both")
        urls = [e.url for e in self.endpoints]
        if len(set(urls)) != len(urls):
            raise ValueError("endpoints repeat")
        return self

    def local_replicas(self) -> list[tuple[int, int, str | None]]:
        """(index, port, CUDA_VISIBLE_DEVICES or None) of each local replica."""
        n = self.devices_per_replica
        return [(i, self.port + i,
                 ",".join(self.devices[i * n:(i + 1) * n]) if self.devices else None)
                for i in range(self.replicas)]

    @field_validator("args")
    @classmethod
    def _no_owned_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in OWNED_ENGINE_ARGS:
                raise ValueError(f"engine argument {flag} is set by the supervisor, not a manifest")
            if flag in UNSAFE_ENGINE_ARGS:
                raise ValueError(f"engine argument {flag} would let requests or logs past the "
                                 "gateway's policy; it cannot be set")
        return args

    @field_validator("env")
    @classmethod
    def _no_unsafe_env(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if name in FORBIDDEN_ENGINE_ENV:
                raise ValueError(f"engine environment variable {name} opens development "
                                 "endpoints or logs requests; it cannot be set")
        return env


class Version(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_RE)
    source: Source
    revision: str
    sha256: dict[str, str] = Field(default_factory=dict)
    engine: Engine
    state: VersionState = "serving"

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, sums: dict[str, str]) -> dict[str, str]:
        for file, digest in sums.items():
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"sha256 of {file} is not 64 lowercase hex digits")
        return sums


class Routing(BaseModel):
    """How the gateway spreads a model's requests over its replicas."""

    model_config = ConfigDict(extra="forbid")

    prefix_affinity: bool | None = Field(
        default=None, description="Requests sharing a prompt prefix prefer the replica that served "
        "it (vLLM's prefix cache), bounded by load; default on for chat models")
    balance: Literal["least_outstanding", "round_robin"] = Field(
        default="least_outstanding", description="least_outstanding: the less loaded of two "
        "random replicas (with affinity, when on); round_robin: in turn, load and prefixes "
        "ignored (a baseline for comparisons)")
    engine_load: bool = Field(
        default=True, description="Refine least-outstanding picking with the engines' own queue "
        "length and KV-cache use (their /metrics, scraped at most every second)")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_RE)
    task: Task
    description: str = ""
    versions: list[Version] = Field(min_length=1)
    traffic: dict[str, int]
    routing: Routing = Field(default_factory=Routing)
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)

    @property
    def prefix_affinity(self) -> bool:
        setting = self.routing.prefix_affinity
        return self.task == "chat" if setting is None else setting

    @model_validator(mode="after")
    def _traffic_matches_versions(self) -> Manifest:
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError("version names must be unique")
        unknown = set(self.traffic) - set(names)
        if unknown:
            raise ValueError(f"traffic names unknown versions: {sorted(unknown)}")
        if any(w < 0 for w in self.traffic.values()) or sum(self.traffic.values()) != 100:
            raise ValueError("traffic weights must be non-negative and add up to 100")
        idle = sorted(v.name for v in self.versions
                      if v.state != "serving" and self.traffic.get(v.name, 0) > 0)
        if idle:
            raise ValueError(f"versions {idle} have traffic but are not in state 'serving'")
        return self

    def version(self, name: str) -> Version | None:
        return next((v for v in self.versions if v.name == name), None)

    def deployments(self) -> list[Deployment]:
        """The versions in state ``serving``: the ones with engines and routes."""
        return [d for d in self.all_deployments() if d.version.state == "serving"]

    def all_deployments(self) -> list[Deployment]:
        """Every version, staged and retired ones too."""
        return [Deployment(model=self.name, task=self.task, version=v,
                           weight=self.traffic.get(v.name, 0)) for v in self.versions]


class Deployment(BaseModel):
    """One version of one model, served by one engine."""

    model_config = ConfigDict(frozen=True)

    model: str
    task: Task
    version: Version
    weight: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.version.name}"

    @property
    def port(self) -> int:
        return self.version.engine.port

    def replica_name(self, index: int) -> str:
        """A local replica's name: ``demo-chat-v1/r0``."""
        return f"{self.name}/r{index}"
