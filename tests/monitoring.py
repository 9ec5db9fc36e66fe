"""What the monitoring tests share: the shipped rule and dashboard files, and the metric names
their PromQL uses."""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import yaml

from tests.support import REPO

MONITORING = REPO / "monitoring"
PROMETHEUS = MONITORING / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
DASHBOARDS = sorted((MONITORING / "grafana").glob("*.json"))
GPU_PREFIXES = ("DCGM_", "enclave_gpu_")

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "offset", "bool", "inf", "nan"}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install Debian's prometheus package (tests/run.sh does)"
    return path


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for board in dashboards().values() for p in panels(board)
            for t in p["targets"]]


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana would."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def used_names() -> set[str]:
    """Metric names (not recorded series) used by the rules and the dashboards."""
    names: set[str] = set()
    for rule in rules():
        names |= metric_names(rule["expr"])
    for expr in dashboard_exprs():
        names |= metric_names(expr)
    return names - recorded()
