"""The GPU exporter: NVML read at scrape time, exposed under DCGM's metric names.

Modules: ``nvml`` (loading the library, naming its errors), ``devices`` (a GPU's identity and
labels), ``readings`` (what is read per GPU), ``collector`` (the prometheus-client collector),
``xid`` (the XID event thread), ``pcie`` (PCIe throughput, sampled in the background),
``deployments`` (process id → model deployment),
``fake_nvml`` (a fake NVML for tests and the benchmark: never used unless asked for by name),
``exposition`` (the HTTP endpoint), ``worker`` (the background threads), ``cli``
(`enclave exporter`; its benchmark is ``serving/bench/exporter.py``).

It never imports the gateway (``serving``): it runs on GPU hosts as its own process.
"""
