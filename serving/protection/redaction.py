"""Replacing personal data and secrets with typed placeholders (``<EMAIL_1>``), in request
bodies, complete answers and streamed answers.

One ``Redactor`` per request: the same value maps to the same placeholder in the prompt and in
the answer. The mapping lives only as long as the request and is never logged or stored.
A streamed answer is redacted with a small, bounded hold-back (``StreamRedactor``): a value split
across events is caught without buffering the stream.
"""

from __future__ import annotations

from collections import Counter

from serving.protection.pii import Detector, Finding

# Streams: the last HOLD characters are held back, so that a value with spaces in it (a card
# number, an IBAN, a phone number: none longer than ~45 characters) is complete before it is
# scanned; a word still growing at the end (an e-mail, a token) is held whole, up to MAX_WORD;
# an open private key block is held up to MAX_BLOCK. Past those bounds text is released.
HOLD = 64
MAX_WORD = 4096
MAX_BLOCK = 16384
_KEY_BLOCK = "-----BEGIN "


class Redactor:
    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.counts: Counter[str] = Counter()  # findings by type, for the audit and metrics
        self._placeholders: dict[str, str] = {}
        self._numbers: Counter[str] = Counter()

    def find(self, text: str, deadline: float | None = None) -> list[Finding]:
        return self.detector.find(text, deadline)

    def placeholder(self, kind: str, value: str) -> str:
        existing = self._placeholders.get(value)
        if existing is not None:
            return existing
        self._numbers[kind] += 1
        name = f"<{kind}_{self._numbers[kind]}>"
        self._placeholders[value] = name
        return name

    def redact(self, text: str, findings: list[Finding] | None = None) -> str:
        if findings is None:
            findings = self.find(text)
        if not findings:
            return text
        out: list[str] = []
        at = 0
        for f in findings:
            out.append(text[at:f.start])
            out.append(self.placeholder(f.type, text[f.start:f.end]))
            self.counts[f.type] += 1
            at = f.end
        out.append(text[at:])
        return "".join(out)


class StreamRedactor:
    """One per streamed choice: ``feed`` the text of each event, send what it returns;
    ``flush`` at the end of the choice."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._pending = ""

    def feed(self, text: str) -> str:
        buf = self._pending + text if self._pending else text
        if len(buf) <= HOLD:
            self._pending = buf
            return ""
        findings = self._redactor.find(buf)
        cut = len(buf) - HOLD
        # A word across the cut may still grow (an e-mail address, a token): hold it whole.
        if not buf[cut - 1].isspace() and not buf[cut].isspace():
            word_start = cut - 1
            floor = max(len(buf) - MAX_WORD, 0)
            while word_start > floor and not buf[word_start - 1].isspace():
                word_start -= 1
            cut = word_start if word_start > floor else cut
        block = buf.rfind(_KEY_BLOCK, 0, cut)
        if block >= 0 and "-----END " not in buf[block:] and len(buf) - block <= MAX_BLOCK:
            cut = block
        for f in findings:
            if f.start < cut < f.end:
                cut = f.start
        if cut <= 0:
            self._pending = buf
            return ""
        self._pending = buf[cut:]
        head = [f for f in findings if f.end <= cut]
        return self._redactor.redact(buf[:cut], head)

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return self._redactor.redact(rest) if rest else ""
