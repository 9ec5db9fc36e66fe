"""Durations as people write them: ``90d``, ``12h``, ``30m``, ``45s``, ``2w``."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RE = re.compile(r"^\s*(\d{1,6})\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    match = _RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write a number and a unit, "
                         "s, m, h, d or w (e.g. 90d, 12h)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return timedelta(seconds=seconds)


def expiry_after(text: str | None) -> datetime | None:
    """``now + duration``, or None (never) when no duration is given."""
    return None if text is None else datetime.now(UTC) + parse_duration(text)
