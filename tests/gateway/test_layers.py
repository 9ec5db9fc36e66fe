"""The layer rules hold (``lint-imports``, configured in pyproject.toml), and the check is real:
an upward import planted in a copy of the package breaks it, naming the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(REPO / "serving", root / "serving",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_tree_keeps_its_layers(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_planted_upward_import_is_refused(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    target = root / "serving" / "domain" / "policy.py"
    target.write_text(target.read_text() + "\nfrom serving.routes import deps  # noqa\n")
    result = _lint(root)
    assert result.returncode != 0
    assert "serving.domain.policy -> serving.routes.deps" in result.stdout


def test_the_web_framework_stays_in_the_web_layer(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    target = root / "serving" / "admission" / "cost.py"
    target.write_text(target.read_text() + "\nimport starlette  # noqa\n")
    result = _lint(root)
    assert result.returncode != 0
    assert "serving.admission.cost -> starlette" in result.stdout


def test_a_cycle_between_packages_of_one_layer_is_refused(tmp_path: Path) -> None:
    root = _copy(tmp_path)  # admission.gate imports upstream.pool; now the other way too
    target = root / "serving" / "upstream" / "pool.py"
    target.write_text(target.read_text() + "\nimport serving.admission.gate  # noqa\n")
    result = _lint(root)
    assert result.returncode != 0
    assert "No import cycle" in result.stdout and "BROKEN" in result.stdout
