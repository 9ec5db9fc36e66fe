"""Test helpers, by subject: a gateway on a real uvicorn server or as a process, its settings
and policies (``gateway``), the real engines (``engines``), the real CLI (``cli``).

Import them from here: ``from tests.support import GatewayServer, new_key``.
"""

from tests.support.cli import cli, new_key, settings_env
from tests.support.engines import ENGINE_START_TIMEOUT_S, Engines
from tests.support.gateway import (
    REPO,
    TEST_PEPPER,
    TEST_POLICIES,
    GatewayProcess,
    GatewayServer,
    LogCapture,
    RecordingProxy,
    assert_openai_error,
    bearer,
    copy_manifests,
    engineless_gateway,
    free_port,
    free_ports,
    gateway_settings,
    running_gateway,
    stop_process,
    wait_until,
    write_policies,
)

__all__ = [
    "ENGINE_START_TIMEOUT_S", "REPO", "TEST_PEPPER", "TEST_POLICIES", "Engines",
    "GatewayProcess", "GatewayServer", "LogCapture", "RecordingProxy", "assert_openai_error",
    "bearer", "cli", "copy_manifests", "engineless_gateway", "free_port", "free_ports",
    "gateway_settings",
    "new_key", "running_gateway", "settings_env", "stop_process", "wait_until",
    "write_policies",
]
