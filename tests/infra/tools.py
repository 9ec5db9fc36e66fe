"""Where the infrastructure scanners live: their own virtualenv, made by tests/run.sh."""

from __future__ import annotations

from tests.infra.hcl import ROOT

BIN = ROOT / ".venv-infra" / "bin"


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: tests/run.sh installs infra/requirements.txt there"
    return str(path)
