"""One pass over a text that says where the detectors' patterns could match (Hyperscan).

Python's ``re`` costs 20-50 ns per character for each pattern that cannot skip ahead (a
lookbehind or ``\\b`` first): the PII detector and the injection guard ran more than a dozen such
scans over every prompt. Hyperscan runs all of them at once, in about a nanosecond per
character, and reports where each *anchor* ends: a short pattern that every match of the exact
pattern contains, at a known distance from the match's start. The exact ``re`` pattern then runs
only around those places (``near``), so what is found is exactly what a whole-text ``finditer``
finds; text without an anchor costs nothing more.

Hyperscan reads bytes and knows only ASCII classes, while the exact patterns are Unicode-aware
(``\\d`` matches every decimal digit, ``\\s`` every space, ``re.IGNORECASE`` folds the Kelvin sign
to ``k``). A text that is not ASCII is therefore scanned as its *shadow*: one byte per
character, so offsets stay the same. For the detector's anchors a non-ASCII decimal digit
becomes ``DIGIT``, a non-ASCII space ``SPACE`` and anything else ``OTHER`` (anchors spell
``\\d`` as ``[0-9\\x81]``; an ASCII class, as in ``re``, matches none of them). For patterns
matched case-insensitively (``fold=True``: the injection signals, in prefilter mode) a digit
becomes ``0``, a space `` ``, a letter that folds to an ASCII one that letter, anything else
``OTHER``: a superset of what ``re`` matches.
"""

from __future__ import annotations

import codecs
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from serving.protection.scanning import ScanTooLong

try:
    import hyperscan
except ImportError:  # no wheel for this machine (hyperscan 0.9 is x86-64 only)
    hyperscan = None  # type: ignore[assignment]  # every text is then scanned whole: same findings

# Anchor flags (Hyperscan's values; unused without it).
SINGLEMATCH = hyperscan.HS_FLAG_SINGLEMATCH if hyperscan else 0
# A pattern in ``re`` syntax matched case-insensitively across lines, compiled as a superset of
# itself: reported at most once per text.
SIGNAL = (hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_CASELESS
          | hyperscan.HS_FLAG_DOTALL | hyperscan.HS_FLAG_MULTILINE) if hyperscan else 0

# A match ending this close to its window's end may have been cut short, or judged by a
# lookahead or ``\\b`` that saw the window's end (the patterns look at most 2 characters
# ahead): it is taken again from the whole text, from the same start.
MARGIN = 8
# Past this many anchors in one text, the caller scans it whole instead (``Scanner.ends``).
MAX_HITS = 4096


OTHER, DIGIT, SPACE = b"\x80", b"\x81", b"\x82"


def _exact(c: str) -> bytes:
    return DIGIT if c.isdecimal() else SPACE if c.isspace() else OTHER


def _folded(c: str) -> bytes:
    if c.isdecimal():
        return b"0"
    if c.isspace():
        return b" "
    for pair in (c.lower(), c.upper()):  # the Kelvin sign, the long s, the dotless i...
        if pair[:1].isascii() and pair[:1].isalpha():
            return pair[0].encode()
    return OTHER


def _handler(char: Callable[[str], bytes]) -> Callable[[UnicodeError], tuple[bytes, int]]:
    def handle(exc: UnicodeError) -> tuple[bytes, int]:
        if not isinstance(exc, UnicodeEncodeError):
            raise exc
        return b"".join(char(c) for c in exc.object[exc.start:exc.end]), exc.end
    return handle


codecs.register_error("enclave-shadow", _handler(_exact))
codecs.register_error("enclave-shadow-folded", _handler(_folded))


def shadow(text: str, fold: bool = False) -> bytes:
    """The bytes Hyperscan scans: the text itself when ASCII, else its shadow."""
    return text.encode("ascii", "enclave-shadow-folded" if fold else "enclave-shadow")


@dataclass(frozen=True)
class Anchor:
    """``pattern`` (Hyperscan syntax) ends at most ``before`` characters after the start of any
    match of the exact pattern it stands for, and lies inside that match (or, for a leading
    context character, just before it)."""
    name: str
    pattern: bytes
    before: int
    flags: int = 0


class Scanner:
    """A compiled set of anchors. ``ends(text)``: for each anchor, the offsets where it ends,
    ascending. Safe to share between threads (each has its own scratch space)."""

    def __init__(self, anchors: Sequence[Anchor], fold: bool = False) -> None:
        self.anchors = tuple(anchors)
        self._names = tuple(a.name for a in self.anchors)
        self._errors = "enclave-shadow-folded" if fold else "enclave-shadow"
        self._local = threading.local()
        self._db: Any = None
        if hyperscan is None:
            return
        self._db = hyperscan.Database()
        self._db.compile(expressions=[a.pattern for a in self.anchors],
                         ids=list(range(len(self.anchors))), elements=len(self.anchors),
                         flags=[a.flags for a in self.anchors])
        self._scratch = hyperscan.Scratch(self._db)

    def _thread_scratch(self) -> Any:
        try:
            return self._local.scratch
        except AttributeError:
            scratch = self._local.scratch = self._scratch.clone()
            return scratch

    def ends(self, text: str) -> dict[str, list[int]] | None:
        """None when the anchors are more than ``MAX_HITS`` (a text that dense costs less to
        scan whole, pattern by pattern, than to hand a Python callback every anchor), or
        without Hyperscan."""
        if self._db is None:
            return None
        hits: list[tuple[int, int]] = []
        add = hits.append

        def on_match(anchor: int, _start: int, end: int, _flags: int, _ctx: object) -> bool:
            add((anchor, end))
            return len(hits) > MAX_HITS  # True stops the scan

        try:
            self._db.scan(text.encode("ascii", self._errors), match_event_handler=on_match,
                          scratch=self._thread_scratch())
        except hyperscan.ScanTerminated:
            return None
        out: dict[str, list[int]] = {}
        if not hits:
            return out
        names = self._names
        for anchor, end in hits:
            found = out.get(names[anchor])
            if found is None:
                out[names[anchor]] = [end]
            elif end >= found[-1]:
                found.append(end)
            else:
                found.append(end)
                found.sort()
        return out


def near(pattern: re.Pattern[str], text: str, ends: list[int], before: int, after: int,
         deadline: float | None = None) -> Iterator[re.Match[str]]:
    """Exactly ``pattern.finditer(text)``, given that every match contains an anchor ending at
    one of ``ends`` (ascending) at most ``before`` characters after the match's start, and
    that the text cut ``after`` characters past an anchor's end still matches from the same
    start (the pattern's bounded part fits; an unbounded run is cut short). Searches only the
    windows from ``before`` characters ahead of each anchor's end to ``after + MARGIN`` behind
    it (overlapping windows merged); ``re`` lets a lookbehind see before a window. A match that
    ends within ``MARGIN`` of a window's end is taken again from the whole text."""
    n = len(text)
    pos = 0  # where a whole-text finditer would search next
    i = 0
    while i < len(ends):
        if deadline is not None and time.monotonic() > deadline:
            raise ScanTooLong
        reach = after + MARGIN
        start = max(ends[i] - before, pos)
        stop = min(ends[i] + reach, n)
        i += 1
        while i < len(ends) and ends[i] - before <= stop:
            stop = min(ends[i] + reach, n)
            i += 1
        at = start
        while at < stop:
            resume = None
            for match in pattern.finditer(text, at, stop):
                if stop < n and match.end() > stop - MARGIN:
                    whole = pattern.match(text, match.start())
                    if whole is None:  # cut short: not a match; search on past its start
                        resume = match.start() + 1
                        break
                    yield whole
                    pos = resume = whole.end()
                    break
                yield match
                pos = match.end()
            if resume is None:
                break
            at = resume
