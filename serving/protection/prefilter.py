"""One pass over a text that says where the detectors' patterns could match (Hyperscan).

Python's ``re`` costs 20-50 ns per character for each pattern that cannot skip ahead (a
lookbehind or ``\\b`` first): the PII detector and the injection guard ran more than a dozen such
scans over every prompt. Hyperscan runs all of them at once, in about a nanosecond per
character, and reports where each *anchor* ends: a short pattern that every match of the exact
pattern contains, at a known distance from the match's start. The exact ``re`` pattern then runs
only around those places (``near``), so what is found is exactly what a whole-text ``finditer``
finds; text without an anchor costs nothing more.

The exact patterns are Unicode-aware (``\\d`` matches every decimal digit, ``\\s`` every space).
For the detector, whose anchors give offsets, a text that is not ASCII is scanned as its
*shadow*: one byte per character, so offsets stay the same; a non-ASCII decimal digit becomes
``DIGIT``, a non-ASCII space ``SPACE``, anything else ``OTHER`` (anchors spell ``\\d`` as
``[0-9\\x81]``; an ASCII class, as in ``re``, matches none of them). A text mostly not ASCII
costs more to shadow than to scan whole, and is scanned whole. The injection signals, which
only need a yes or no, are scanned as UTF-8 with Hyperscan's Unicode classes and case folding
(``unicode=True``; the ASCII separators 0x1c-0x1f, which ``re``'s ``\\s`` matches and
Unicode's White_Space does not, read as spaces).
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


def _handler(char: Callable[[str], bytes]) -> Callable[[UnicodeError], tuple[bytes, int]]:
    def handle(exc: UnicodeError) -> tuple[bytes, int]:
        if not isinstance(exc, UnicodeEncodeError):
            raise exc
        return b"".join(char(c) for c in exc.object[exc.start:exc.end]), exc.end
    return handle


codecs.register_error("enclave-shadow", _handler(_exact))
# re's \s matches the ASCII separators 0x1c-0x1f; Hyperscan's (Unicode's White_Space) does
# not: spaces, for the patterns matched in Unicode mode.
_SEPARATORS = bytes(range(0x1C)) + b"    " + bytes(range(0x20, 256))
# Past this share of non-ASCII characters (one in eight), building the shadow costs more
# than scanning the text whole: ``shadow`` says None and the caller does that instead.
_MAX_NON_ASCII = 8


def shadow(text: str) -> bytes | None:
    """The bytes Hyperscan scans, one per character (offsets stay the same); None for a text
    mostly not ASCII (Cyrillic, Chinese...), which is cheaper to scan whole."""
    if text.isascii():
        return text.encode("ascii")
    extra = len(text.encode("utf-8", "surrogatepass")) - len(text)
    if extra * _MAX_NON_ASCII > len(text):
        return None
    return text.encode("ascii", "enclave-shadow")


# The characters re.IGNORECASE equates with an ASCII letter (found by trying every code point
# against every letter): the dotted capital and dotless small i, the long s, the Kelvin sign.
_RE_FOLDS = (("\u0130", "i"), ("\u0131", "i"), ("\u017f", "s"), ("\u212a", "k"))


def _utf8(text: str) -> bytes:
    if not text.isascii():
        for char, letter in _RE_FOLDS:
            if char in text:
                text = text.replace(char, letter)
    return text.encode("utf-8", "surrogatepass").translate(_SEPARATORS)


_ALL: list[Scanner] = []


def warm() -> None:
    """Compile every scanner now (a gateway does at start, not on its first request)."""
    for scanner in _ALL:
        scanner.compile()


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

    def __init__(self, anchors: Sequence[Anchor], unicode: bool = False) -> None:
        """``unicode``: the text is scanned as its UTF-8 bytes (the four letters ``re`` folds
        to ASCII ones replaced, the separators 0x1c-0x1f as spaces): for callers that only ask
        which patterns may match, whose patterns allow for characters of several bytes (the
        offsets are in bytes)."""
        self.anchors = tuple(anchors)
        self._names = tuple(a.name for a in self.anchors)
        self._unicode = unicode
        self._local = threading.local()
        self._db: Any = None
        self._scratch: Any = None
        self._lock = threading.Lock()
        _ALL.append(self)

    def compile(self) -> bool:
        """Compile the anchors (once, on first use or at ``warm``: a fraction of a second);
        False without Hyperscan."""
        if self._db is not None:
            return True
        if hyperscan is None:
            return False
        with self._lock:
            if self._db is None:
                db = hyperscan.Database()
                db.compile(expressions=[a.pattern for a in self.anchors],
                           ids=list(range(len(self.anchors))), elements=len(self.anchors),
                           flags=[a.flags for a in self.anchors])
                self._scratch = hyperscan.Scratch(db)
                self._db = db
        return True

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
        if self._db is None and not self.compile():
            return None
        hits: list[tuple[int, int]] = []
        add = hits.append

        def on_match(anchor: int, _start: int, end: int, _flags: int, _ctx: object) -> bool:
            add((anchor, end))
            return len(hits) > MAX_HITS  # True stops the scan

        data = _utf8(text) if self._unicode else shadow(text)
        if data is None:
            return None
        try:
            self._db.scan(data, match_event_handler=on_match,
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
         deadline: float | None = None,
         tail: re.Pattern[str] | None = None) -> Iterator[re.Match[str]]:
    """Exactly ``pattern.finditer(text)``, given that every match contains an anchor ending at
    one of ``ends`` (ascending) at most ``before`` characters after the match's start, and
    that the text cut ``after`` characters past an anchor's end still matches from the same
    start (the pattern's bounded part fits; an unbounded run is cut short). Searches only the
    windows from ``before`` characters ahead of each anchor's end to ``after + MARGIN`` behind
    it (overlapping windows merged); ``re`` lets a lookbehind see before a window. A match that
    ends within ``MARGIN`` of a window's end is taken again from the whole text. ``tail``: for
    a pattern whose unbounded part must end in a certain way (an e-mail's domain ends with
    letters), the run of characters that part may take: each window then reaches past the
    whole run, so the pattern sees all of it."""
    n = len(text)
    pos = 0  # where a whole-text finditer would search next
    i = 0
    while i < len(ends):
        if deadline is not None and time.monotonic() > deadline:
            raise ScanTooLong
        reach = after + MARGIN
        start = max(ends[i] - before, pos)
        stop = _stop(text, ends[i], reach, tail)
        i += 1
        while i < len(ends) and ends[i] - before <= stop:
            stop = _stop(text, ends[i], reach, tail)
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


def _stop(text: str, end: int, reach: int, tail: re.Pattern[str] | None) -> int:
    if tail is not None:
        run = tail.match(text, end)
        if run is not None:
            return min(max(run.end(), end) + reach, len(text))
    return min(end + reach, len(text))
