"""The scanners the issue names, run on the real tree: terraform fmt, checkov, trivy, hadolint.
Each is also shown a planted flaw, so a scanner that silently checks nothing fails here."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.infra.hcl import ROOT, TERRAFORM
from tests.infra.tools import tool

DOCKERFILES = [ROOT / "Dockerfile.gpu", ROOT / "Dockerfile.cpu"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def tree_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, copy, ignore=shutil.ignore_patterns(".terraform*"))
    return copy


def test_terraform_fmt_finds_nothing_to_change() -> None:
    result = run(tool("terraform"), "fmt", "-check", "-recursive", "-diff", str(TERRAFORM))
    assert result.returncode == 0, result.stdout + result.stderr


def test_terraform_fmt_sees_a_misformatted_file(tree_copy: Path) -> None:
    (tree_copy / "bad.tf").write_text('variable "x" {\ntype=string\n}\n')
    assert run(tool("terraform"), "fmt", "-check", "-recursive", str(tree_copy)).returncode == 3


def checkov(directory: Path) -> dict[str, object]:
    result = run(tool("checkov"), "-d", str(directory), "--framework", "terraform",
                 "--skip-download", "--quiet", "-o", "json")
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    return report if isinstance(report, dict) else report[0]  # type: ignore[no-any-return]


def test_checkov_reports_no_failed_check() -> None:
    report = checkov(TERRAFORM)
    summary = report["summary"]
    assert isinstance(summary, dict)
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]  # type: ignore[index]
    assert summary["failed"] == 0, failed
    assert summary["passed"] > 200 and summary["parsing_errors"] == 0


def test_checkov_catches_an_optional_imds_token(tree_copy: Path) -> None:
    lt = tree_copy / "modules" / "aws" / "node-group" / "main.tf"
    lt.write_text(lt.read_text().replace('http_tokens                 = "required"',
                                         'http_tokens                 = "optional"'))
    failed = {c["check_id"] for c in checkov(tree_copy)["results"]["failed_checks"]}  # type: ignore[index]
    assert "CKV_AWS_79" in failed


def trivy(directory: Path) -> list[str]:
    result = run(tool("trivy"), "config", "--skip-check-update", "--quiet", "--format", "json",
                 "--exit-code", "0", str(directory))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return [m["ID"] for r in report.get("Results", []) for m in r.get("Misconfigurations", [])
            if m.get("Status") == "FAIL"]


def test_trivy_reports_no_misconfiguration() -> None:
    assert trivy(TERRAFORM) == []


def test_trivy_catches_an_optional_imds_token(tree_copy: Path) -> None:
    lt = tree_copy / "modules" / "aws" / "node-group" / "main.tf"
    lt.write_text(lt.read_text().replace('http_tokens                 = "required"',
                                         'http_tokens                 = "optional"'))
    assert "AWS-0130" in trivy(tree_copy)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = run(tool("hadolint"), str(dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_base_and_a_root_user(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "USER root\n")
    result = run(tool("hadolint"), str(bad))
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3002"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_are_pinned_and_run_unprivileged(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = [line.split("=", 1)[1] for line in text.splitlines()
             if line.startswith("ARG ") and "_IMAGE=" in line]
    assert bases and all("@sha256:" in b and len(b.split("@sha256:")[1]) == 64 for b in bases)
    assert "USER 10001:10001" in text and "HEALTHCHECK" in text
    assert "org.opencontainers.image.version" in text
    assert "ENCLAVE_ENGINE_ENV=/opt/enclave/engine-venv" in text  # built in, read-only
