"""One local engine process (``EngineProcess``: a replica of a deployment) and what it starts
from: its vLLM command line; its environment (offline, no usage statistics, none of the
gateway's secrets and settings: ``engine_environment``); its weights, checked against the
manifest's sha256 before it starts (``verify_weights``). ``supervisor`` runs them.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.domain.manifest import FORBIDDEN_ENGINE_ENV, Deployment
from serving.engines.store import StoreError, verify_tree

# Environment for every engine: offline, and no usage statistics sent anywhere.
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "PYTHONUNBUFFERED": "1",
}
# On CPU hosts: vLLM's default pins every engine's compute thread to the same core and reserves
# the other for "everything else"; with two engines on a small host that starves the API
# servers, and streams arrive in one burst at the end. One unpinned thread per engine streams
# token by token (measured on 2 cores: first of 600 tokens at ~0.1 s instead of 1-3.5 s).
CPU_ENGINE_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


# Never passed to an engine: the gateway's secrets and settings, and the gateway's virtualenv.
_WITHHELD_PREFIXES = ("ENCLAVE_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")


def engine_environment(extra: dict[str, str], gpu: bool = False) -> dict[str, str]:
    # Nor what would open an engine's development endpoints, whoever's shell set it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_WITHHELD_PREFIXES) and k not in FORBIDDEN_ENGINE_ENV}
    return {**env, **ENGINE_ENV, **({} if gpu else CPU_ENGINE_ENV), **extra}


class WeightsError(RuntimeError):
    """Weights missing or not matching their pinned checksum."""


def verify_weights(directory: Path, sha256: dict[str, str]) -> None:
    """``store.verify_tree``, as the supervisor's ``WeightsError``."""
    try:
        verify_tree(directory, sha256)
    except StoreError as exc:
        raise WeightsError(str(exc)) from None


@dataclass(eq=False)
class EngineProcess:
    """One local replica of a deployment."""

    deployment: Deployment
    index: int
    port: int
    devices: str | None
    model_dir: Path
    host: str
    log_path: Path
    # starting | healthy | draining | backoff | held (drained, stopped until started) | stopped
    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    held: bool = False
    terminating: bool = False  # SIGTERM sent: the engine is finishing its requests
    resume: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def name(self) -> str:
        return self.deployment.replica_name(self.index)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, python: Path) -> list[str]:
        engine = self.deployment.version.engine
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.deployment.model,
            "--host", self.host, "--port", str(self.port),
            "--max-model-len", str(engine.max_model_len),
            "--shutdown-timeout", str(engine.shutdown_timeout_s),
            *engine.args,
        ]

    def environment(self, gpu: bool) -> dict[str, str]:
        extra = dict(self.deployment.version.engine.env)
        if self.devices is not None:
            extra["CUDA_VISIBLE_DEVICES"] = self.devices
        return engine_environment(extra, gpu=gpu)

    def status(self) -> dict[str, object]:
        return {"replica": self.name, "deployment": self.deployment.name,
                "model": self.deployment.model, "version": self.deployment.version.name,
                "pid": self.pid, "port": self.port, "url": self.url, "devices": self.devices,
                "state": self.state, "restarts": self.restarts, "last_exit": self.last_exit}
