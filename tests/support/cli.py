"""The real ``enclave`` CLI, run as a process against a gateway's state."""

from __future__ import annotations

import os
import subprocess
import sys

from serving.settings import Settings
from tests.support.gateway import REPO, TEST_PEPPER


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `enclave` CLI against a gateway's state."""
    return subprocess.run([sys.executable, "-m", "serving.cli.main", *args],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives the CLI or a gateway process these settings' state."""
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(settings.data_dir),
           "ENCLAVE_MODELS_DIR": str(settings.models_dir), "ENCLAVE_PEPPER": TEST_PEPPER,
           "ENCLAVE_POLICIES_FILE": str(settings.policies_file)}
    for name in ("database_url", "redis_url"):
        value = getattr(settings, name)
        if value:
            env[f"ENCLAVE_{name.upper()}"] = str(value)
    for name in ("key_cache_ttl_s", "reservation_ttl_s", "ledger_sweep_interval_s",
                 "engine_health_interval_s", "policy_reload_interval_s"):
        env[f"ENCLAVE_{name.upper()}"] = str(getattr(settings, name))
    return env


def new_key(settings: Settings, client: str, policy: str = "default", *args: str) -> str:
    """A key for ``client`` (created with ``policy`` if it does not exist), via the real CLI."""
    made = cli(settings, "clients", "create", client, "--policy", policy)
    assert made.returncode == 0 or "exists already" in made.stderr, made.stderr
    out = cli(settings, "keys", "create", "--client", client, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
