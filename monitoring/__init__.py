"""Enclave's monitoring: the NVML GPU exporter (``monitoring.exporter``); the Prometheus
configuration, rules and Grafana dashboards beside it are data files, not Python."""
