"""Regular-expression scans over large texts in bounded steps.

Python's ``re`` holds the interpreter lock for a whole search. Over a megabyte with no match,
one search takes tens of milliseconds (the injection patterns, hundreds), and while a worker
thread scans a large request the event loop, and with it every other client, waits that long.
``finditer`` yields exactly the matches of ``pattern.finditer(text)`` while no single search
covers more than ``STEP + OVERLAP`` characters (about a millisecond).

It searches windows of ``STEP`` characters plus an ``OVERLAP``: a match must start inside the
window's first ``STEP`` characters (later ones are found from the next window), each search
starts where the previous match ended (as ``finditer`` does), and a match that reaches the end
of a window (only a run longer than ``OVERLAP``; or one that may have backtracked from it) is
taken again from the whole text. This is exact for patterns that never match the empty string,
whose matches are either shorter than ``OVERLAP - MARGIN`` or runs that a truncated text still
matches from the same start (``[A-Za-z0-9]{32,}``); ``re`` lets a lookbehind see before the
start position, so a window's first match is judged on the real text before it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

STEP = 1 << 15
OVERLAP = 1 << 12  # longer than any bounded pattern's match, with MARGIN to spare
MARGIN = 256  # a match ending this close to a window's end is taken again from the whole text


class ScanTooLong(Exception):
    """The scan passed its deadline: the caller refuses the request rather than stall."""


def finditer(pattern: re.Pattern[str], text: str,
             deadline: float | None = None) -> Iterator[re.Match[str]]:
    """``deadline`` (``time.monotonic()``) is checked at every window: past it,
    ``ScanTooLong``."""
    n = len(text)
    if n <= STEP + OVERLAP:
        yield from pattern.finditer(text)
        return
    window = 0
    pos = 0  # where a whole-text finditer would search next
    while pos < n:
        if deadline is not None and time.monotonic() > deadline:
            raise ScanTooLong
        limit = min(window + STEP + OVERLAP, n)
        accept_before = window + STEP if limit < n else n
        for match in pattern.finditer(text, pos, limit):
            if match.start() >= accept_before:
                break  # found again, from its start, by the next window
            if match.end() > limit - MARGIN and limit < n:
                # It may run past the window (or a lookahead may need what follows): the
                # whole text decides, from the same start.
                whole = pattern.match(text, match.start())
                if whole is None:
                    whole = pattern.search(text, match.start() + 1)
                    if whole is None:
                        return
                match = whole
            yield match
            pos = match.end()
            if pos >= accept_before:
                break
        window += STEP
        pos = max(pos, window)
