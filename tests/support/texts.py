"""Random texts built from pieces (findings, near-misses, long runs), for tests that compare two
ways of scanning the same text."""

from __future__ import annotations

import random
from collections.abc import Sequence


def pieced(pieces: Sequence[str], seed: int, size: int) -> str:
    """Pieces drawn at random (seeded) and joined, until at least ``size`` characters."""
    rng = random.Random(seed)
    out: list[str] = []
    length = 0
    while length < size:
        piece = rng.choice(pieces)
        out.append(piece)
        length += len(piece)
    return "".join(out)
