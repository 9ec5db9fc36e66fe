"""The shipped Prometheus configuration, rules, alert tests and Grafana dashboards."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import GatewayMetrics
from tests.monitoring import (
    GPU_PREFIXES,
    PROMETHEUS,
    alerts,
    dashboard_exprs,
    dashboards,
    metric_names,
    panels,
    recorded,
    rules,
    tool,
    used_names,
)
from tests.support import REPO


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=PROMETHEUS, capture_output=True,
                          text=True, timeout=120)


def test_promtool_accepts_the_config_and_the_rules() -> None:
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    checked = promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_fires_and_stays_silent_in_promtool_tests() -> None:
    files = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert {f.name for f in files} >= {"alerts_test.yml", "routing_test.yml"}
    result = promtool("test", "rules", *(str(f.relative_to(PROMETHEUS)) for f in files))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [case for f in files for group in yaml.safe_load(f.read_text())["tests"]
             for case in group.get("alert_rule_test", [])]
    for alert in alerts():
        name = alert["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays silent"


def test_every_alert_has_a_severity_summary_and_runbook() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for alert in alerts():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert alert["annotations"]["summary"].strip(), alert["alert"]
        assert len(alert["annotations"]["runbook"]) > 30, alert["alert"]


def test_the_issue_alerts_exist() -> None:
    exprs = {a["alert"]: a["expr"] for a in alerts()}
    assert "DCGM_FI_DEV_SLOWDOWN_TEMP" in exprs["GpuTemperatureNearSlowdown"]
    assert "enclave_gpu_nvml_available" in exprs["GpuNvmlUnavailable"]
    assert all(x in exprs["GpuCriticalXid"]
               for x in ("48", "63", "64", "74", "79", "92", "94", "95", "119", "120"))
    for name in ("GpuDoubleBitEccErrors", "GpuRowRemapFailure", "GpuMissingFromHost",
                 "GpuThrottledWhileBusy", "VllmKvCacheSaturated", "EngineDown",
                 "GatewayErrorBudgetBurnFast", "GatewayErrorBudgetBurnSlow",
                 "GatewayLatencyBudgetBurnFast", "GatewayLatencyBudgetBurnSlow",
                 "ClientRateLimited", "ClientBudgetExhausted"):
        assert name in exprs


def test_the_router_alerts_exist() -> None:
    exprs = {a["alert"]: a["expr"] for a in alerts()}
    for name, metric in (("ModelNoReplica", "enclave:model_replicas_routable:min"),
                         ("ModelDegraded", "enclave:replica_routable:min"),
                         ("ReplicaFlapping", "enclave_replica_ejections_total"),
                         ("HighRetryRatio", "enclave:upstream_retries:ratio_rate5m"),
                         ("RetryBudgetExhausted", "enclave_retry_budget_exhausted_total"),
                         ("FallbackServing", "enclave_fallbacks_total"),
                         ("ReplicaStuckInFlight", "enclave_replica_in_flight")):
        assert metric in exprs[name], name
    # one replica of several down warns (ModelDegraded); EngineDown pages only for a model
    # the gateway does not route over replicas
    assert "enclave_model_replicas" in exprs["EngineDown"]


def gateway_names() -> set[str]:
    """The sample names the gateway's registry exposes (a labelled metric with no child yet
    exposes nothing, so they are derived from each family's name and type)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "summary": ("_count", "_sum")}
    return {family.name + suffix for family in GatewayMetrics().registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_gateway_names_in_rules_and_dashboards_are_what_the_gateway_defines() -> None:
    """Without a running gateway (the integration test scrapes one, which shows a labelled
    metric only once a child exists)."""
    used = {n for n in used_names() if n.startswith("enclave_") and not n.startswith(GPU_PREFIXES)}
    assert {"enclave_replica_routable", "enclave_upstream_attempts_total",
            "enclave_fallbacks_total", "enclave_idempotent_replays_total"} <= used
    missing = used - gateway_names()
    assert not missing, sorted(missing)


def test_recorded_series_used_anywhere_are_defined() -> None:
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    used = {n for e in exprs for n in metric_names(e) if n.startswith("enclave:")}
    assert used <= recorded(), used - recorded()


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names('sum by (le, model) (rate(x_bucket{model=~"$m", le="2.5"}[5m])) '
                        '/ on (a) group_left (b) y * 3.6e9 > bool 1') == {"x_bucket", "y"}
    assert metric_names('histogram_quantile(0.9, vllm:ttft{a="b"}) offset 5m') == {"vllm:ttft"}


def test_dashboards_are_well_formed() -> None:
    boards = dashboards()
    assert set(boards) == {"gateway.json", "engines.json", "gpus.json"}
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        variables = {v["name"] for v in board["templating"]["list"]}
        assert "datasource" in variables
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in panels(board):
            where = f"{name}: {panel['title']}"
            assert panel["datasource"]["uid"] == "${datasource}", where
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                for var in set(re.findall(r"\$(\w+)", target["expr"])):
                    assert var.startswith("__") or var in variables, f"{where}: ${var}"


def test_gpu_names_in_rules_and_dashboards_are_what_the_exporter_exports() -> None:
    """Checked against the exporter's output over a FAKE NVML (this machine has no GPU)."""
    out = subprocess.run([sys.executable, "-m", "monitoring.exporter", "--once",
                          "--fake-gpus", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    exported = {s.name for f in text_string_to_metric_families(out) for s in f.samples}
    gpu_names = {n for n in used_names() if n.startswith(GPU_PREFIXES)}
    assert len(gpu_names) > 30
    assert gpu_names <= exported, sorted(gpu_names - exported)
    board = dashboards()["gpus.json"]
    for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_TEMP",
                 "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK"):  # what 12239 shows
        assert any(name in t["expr"] for p in panels(board) for t in p["targets"])
