"""One scrape's metric families, before they become text or prometheus-client objects.

A sample keeps the GPU's label values (one tuple per GPU, made once at start) apart from its
own extra labels, so the text exposition escapes each GPU's labels once, not per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LabelValues = tuple[str, ...]


@dataclass
class Family:
    name: str  # without "_total" for counters
    doc: str
    type: str  # "gauge" | "counter"
    base: tuple[str, ...]  # label names shared by the family's samples (DCGM's, or none)
    extra: tuple[str, ...] = ()
    samples: list[tuple[LabelValues, LabelValues, float]] = field(default_factory=list)

    def add(self, base: LabelValues, extra: LabelValues, value: float) -> None:
        self.samples.append((base, extra, value))

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name
