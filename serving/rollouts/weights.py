"""The traffic split at a canary step: the canary's share, the rest spread over the stable
versions in their proportions at the start, whole percents adding up to 100."""

from __future__ import annotations


def canary_weights(stable: dict[str, int], canary: str, share: int) -> dict[str, int]:
    others = {v: w for v, w in stable.items() if v != canary and w > 0}
    rest = 100 - share
    total = sum(others.values())
    if not others or total == 0:
        return {canary: 100}
    out = {v: rest * w // total for v, w in others.items()}
    # The percents lost to rounding go to the largest remainders first (Hamilton's method).
    by_remainder = sorted(others, key=lambda x: (-(rest * others[x] % total), -others[x]))
    for v in by_remainder[:rest - sum(out.values())]:
        out[v] += 1
    return {canary: share, **out}
