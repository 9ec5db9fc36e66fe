"""Reading a few of vLLM's gauges from its ``/metrics`` text, cheaply (no full parser): the
supervisor's drain waits on requests running and waiting; the gateway's router weighs replicas
by requests waiting and KV-cache use."""

from __future__ import annotations

from collections.abc import Iterable


def samples(text: bytes, names: Iterable[str]) -> dict[str, list[float]]:
    """Each named metric's sample values (any labels), matched by exact name: ``a`` does not
    match ``a_by_reason``."""
    wanted = {name.encode(): name for name in names}
    found: dict[str, list[float]] = {name: [] for name in wanted.values()}
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        end = line.find(b"{")
        if end < 0:
            end = line.find(b" ")
        name = wanted.get(line[:end])
        if name is None:
            continue
        try:
            found[name].append(float(line.rsplit(b" ", 1)[1]))
        except (ValueError, IndexError):
            continue
    return found
