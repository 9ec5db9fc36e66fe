"""Finding personal data and secrets in text: which type, where. Never keeps or returns a value.

Candidates come from compiled regular expressions; checksums and validators then decide, so a
number that only looks like a card is not flagged: Luhn for payment cards, mod-97 for IBANs
and the French NIR key, the SSA's rules for US SSNs (python-stdnum), the numbering plans for
phone numbers (phonenumbers), ``ipaddress`` for IPs. Secrets are matched by their shape (cloud
access keys, private key blocks, JWTs, bearer tokens) or, for anything else, by length and
entropy. One Hyperscan pass over the text (``prefilter``) says where each pattern could match;
the exact pattern then runs only there, so a prompt without personal data costs about ten
microseconds per kilobyte, and a finding costs its own validation.

Presidio's pattern recognizers do the same job offline; they cost much more per kilobyte on
this hot path (see the README's benchmark), so the gateway uses its own compiled patterns and
the same checksum libraries.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.fr import nir as _nir
from stdnum.us import ssn as _ssn

from serving.domain.policy import PII_TYPES as TYPES  # what a policy may name
from serving.protection import prefilter, scanning


@dataclass(frozen=True, slots=True)
class Finding:
    type: str
    start: int
    end: int


Validator = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class _Rule:
    type: str
    pattern: re.Pattern[str]
    validate: Validator | None = None
    group: int = 0  # the part of the match that is the value (a bearer token, not "Bearer")
    numeric: bool = False  # runs only inside the digit runs ``_NUMERIC`` finds
    # Scanned in bounded steps (``scanning``), except a pattern whose match has no bound that
    # a truncated text still matches (a JWT's segments): it is linear in the text, in one
    # search per match.
    stepped: bool = True
    finder: Callable[[str], Iterator[re.Match[str]]] | None = None  # instead of the pattern
    # Instead of the trigger: the ``prefilter`` anchor every match contains, ending at most
    # ``before`` characters after the match's start; the pattern's bounded part ends at most
    # ``after`` characters past the anchor. The pattern then runs only around it.
    anchor: bytes | None = None
    before: int = 0
    after: int = 0
    tail: re.Pattern[str] | None = None  # see ``prefilter.near``
    # A cheap test that it may match: for a rule without an anchor, or when the text is
    # scanned whole (``prefilter`` said None).
    trigger: Callable[[str], bool] | None = None


_KEY_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_KEY_BLOCK = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
    re.S)


def _key_blocks(text: str) -> Iterator[re.Match[str]]:
    """``_KEY_BLOCK.finditer(text)`` in linear time: the pattern alone tries every BEGIN
    against the rest of the text (a text of BEGIN lines without an END took minutes per
    megabyte). Each BEGIN is matched up to the first END after it; once no END follows, no
    later BEGIN can have one."""
    pos = 0
    while (begin := _KEY_BEGIN.search(text, pos)) is not None:
        end = _KEY_END.search(text, begin.end())
        if end is None:
            return
        block = _KEY_BLOCK.match(text, begin.start(), end.end())
        if block is not None:
            yield block
            pos = block.end()
        else:
            pos = begin.end()


def _has(*needles: str) -> Callable[[str], bool]:
    if len(needles) == 1:
        needle = needles[0]
        return lambda text: needle in text
    return lambda text: any(n in text for n in needles)


_DIGIT = re.compile(r"\d")


def _has_digits(text: str) -> bool:
    return _DIGIT.search(text) is not None


def _digits(value: str) -> str:
    return "".join(c for c in value if c.isdigit())


def _card(value: str) -> bool:
    digits = _digits(value)
    # Issuer prefixes of the networks in use (Visa 4, Mastercard 5 and 2221-2720, Amex 3,
    # Discover 6), then Luhn: a random 16-digit number passes Luhn one time in ten. Mastercard's
    # 2-series has 16 digits: any number starting with 2 took French social security numbers
    # (15 digits, passing Luhn as often) for cards.
    if not 13 <= len(digits) <= 19 or not _luhn.is_valid(digits):
        return False
    if digits[0] == "2":
        return len(digits) == 16 and 2221 <= int(digits[:4]) <= 2720
    return digits[0] in "3456"


def _ssn_valid(value: str) -> bool:
    return bool(_ssn.is_valid(_digits(value)))


def _nir_valid(value: str) -> bool:
    return bool(_nir.is_valid(value.replace(" ", "")))


def _ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_PHONE_REGIONS = ("US", "FR", "GB", "DE")


def _phone(value: str) -> bool:
    regions = (None,) if value.startswith("+") else _PHONE_REGIONS
    for region in regions:
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


def _entropy(value: str) -> float:
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _high_entropy(value: str) -> bool:
    # Long, mixed letters and digits, and close to random: keys, tokens, passwords. Hex digests
    # qualify too (they are how many secrets are written).
    stripped = value.rstrip("=")
    return (any(c.isdigit() for c in stripped) and any(c.isalpha() for c in stripped)
            and _entropy(stripped) >= 3.5)


# Order matters: a span claimed by an earlier rule is not matched again by a later one (an
# IBAN's digits are not also a phone number; a JWT is not also a long token). Rules marked
# ``numeric`` run only inside the runs of digits and separators that ``_NUMERIC`` finds in one
# pass: a regular expression costs about 10 ns per character scanned, so scanning the whole
# text once per kind of number would cost five times as much.
# At least 7 characters and 4 digits, separators in runs of at most 4 (the numbers below have 2
# at most): a run of separators cannot make one search scan far past the digits.
_NUMERIC = re.compile(r"(?=[\d ().+-]{7})\d(?:[ ().+-]{0,4}\d){3,}")
# Python's \s and \d for text (str.isspace, str.isdecimal), as a prefilter anchor sees them.
_SPACE_ANCHOR = rb"[\t-\r\x1c-\x20\x82]"
_DIGIT_ANCHOR = rb"[0-9\x81]"
_RULES: tuple[_Rule, ...] = (
    _Rule("PRIVATE_KEY", _KEY_BLOCK, trigger=_has("PRIVATE KEY-----"), finder=_key_blocks),
    # Starts only where a run of token characters starts: each run is read at most twice.
    _Rule("JWT", re.compile(
        r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
        trigger=_has("eyJ"), stepped=False),
    _Rule("BEARER_TOKEN", re.compile(r"(?i)\bbearer\s{1,64}([A-Za-z0-9._~+/-]{16,}=*)"),
          group=1, anchor=rb"(?i)bearer" + _SPACE_ANCHOR, before=7, after=80,
          trigger=_has("earer", "EARER")),
    _Rule("AWS_ACCESS_KEY", re.compile(
        r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA)[A-Z2-7]{16}\b"),
        anchor=rb"AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA", before=4,
        after=17, trigger=_has("A")),
    _Rule("API_KEY", re.compile(
        r"\b(?:AIza[0-9A-Za-z_-]{35}|gh[pousr]_[A-Za-z0-9]{36,255}|xox[abprs]-[A-Za-z0-9-]{10,}"
        r"|sk-[A-Za-z0-9_-]{20,}|glpat-[A-Za-z0-9_-]{20,})"),
        anchor=rb"AIza|gh[pousr]_|xox[abprs]-|sk-|glpat-", before=6, after=36,
        trigger=_has("AIza", "gh", "xox", "sk-", "glpat-")),
    _Rule("EMAIL", re.compile(
        r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}"),
        anchor=rb"@", before=65, after=66, tail=re.compile(r"[A-Za-z0-9.-]*"),
        trigger=_has("@")),
    _Rule("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
          anchor=rb"[A-Z]{2}" + _DIGIT_ANCHOR + rb"{2}", before=4, after=61,
          trigger=_has_digits),
    _Rule("CREDIT_CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"), _card,
          numeric=True),
    _Rule("FR_NIR", re.compile(
        r"\b[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}\b"),
        _nir_valid, numeric=True),
    _Rule("US_SSN", re.compile(r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])"), _ssn_valid,
          numeric=True),
    _Rule("PHONE", re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
        r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}|0[1-9](?:[ .-]?\d{2}){4})(?!\w)"),
        _phone, numeric=True),
    _Rule("IP_ADDRESS", re.compile(r"(?<![\w.:])(?:\d{1,3}\.){3}\d{1,3}(?![\w:]|\.\w)"), _ip,
          numeric=True),
    _Rule("IP_ADDRESS", re.compile(
        r"(?<![\w.:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:]|\.\w)"),
        validate=_ip, anchor=rb"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:", before=10,
        after=30, trigger=_has(":")),
    # A match starts where a run of token characters starts (the lookbehind).
    _Rule("SECRET_TOKEN", re.compile(
        r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])"),
        validate=_high_entropy, anchor=rb"(?:^|[^A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32}", before=32,
        after=2),
)
# Every ``_NUMERIC`` match starts at a digit not preceded by one (greedy, and a later start in
# the same run would have matched from the earlier digit too), with three more digits in its
# first 16 characters.
_NUMERIC_ANCHOR = (rb"(?:^|[^0-9\x81])" + _DIGIT_ANCHOR + rb"(?:[ ().+-]{0,4}" + _DIGIT_ANCHOR
                   + rb"){3}")
_SCANNER = prefilter.Scanner(
    [prefilter.Anchor("NUMERIC", _NUMERIC_ANCHOR, 16)]
    + [prefilter.Anchor(f"{i}", r.anchor, r.before) for i, r in enumerate(_RULES)
       if r.anchor is not None])


def _iban_span(text: str, start: int, end: int) -> int | None:
    """The end of the longest valid IBAN starting at ``start`` within the candidate: the
    pattern is greedy and may take in a following word in capitals."""
    chars = [(i, c) for i in range(start, end) if (c := text[i]) != " "]
    for n in range(len(chars), 14, -1):
        value = "".join(c for _, c in chars[:n])
        if _mod97_fails(value):
            continue
        if _iban.is_valid(value):
            return chars[n - 1][0] + 1
    return None


_BASE36 = {c: str(int(c, 36)) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def _mod97_fails(value: str) -> bool:
    """ISO 7064 mod 97-10 over an ASCII candidate, before python-stdnum's full check (the
    country's format too, ~50 us): every valid IBAN passes it, nine in ten other strings
    fail it. Other characters: not judged here."""
    try:
        digits = "".join(_BASE36[c] for c in value[4:] + value[:4])
    except KeyError:
        return False
    return int(digits) % 97 != 1


ScanTooLong = scanning.ScanTooLong  # the scan passed its deadline

# The shortest text any rule can match ("a@b.cc"): shorter strings (names, schema keywords)
# are not scanned at all.
MIN_FINDING = 6
# How many candidate matches between two looks at the clock.
_CLOCK_EVERY = 512


class Detector:
    """Finds the types it is given (default: all). Stateless and safe to share.

    Linear in the text and in the number of findings: each rule's matches come in order, are
    checked against the spans earlier rules claimed by binary search, and the two sorted runs
    are merged (one pass each). ``deadline`` (``time.monotonic()``) bounds the work: past it,
    ``ScanTooLong``.
    """

    def __init__(self, types: Iterable[str] = TYPES) -> None:
        wanted = frozenset(types)
        unknown = wanted - set(TYPES)
        if unknown:
            raise ValueError(f"unknown type(s): {', '.join(sorted(unknown))}")
        self.types = wanted
        self._rules = tuple((i, r) for i, r in enumerate(_RULES) if r.type in wanted)
        self._triggers = tuple(r.trigger for _, r in self._rules
                               if r.trigger is not None and r.anchor is None)

    def find(self, text: str, deadline: float | None = None) -> list[Finding]:
        """Non-overlapping findings, in order of position. Where two rules match overlapping
        spans, the earlier rule keeps its span."""
        if len(text) < MIN_FINDING:
            return []
        anchors = _SCANNER.ends(text)
        if anchors is not None and not anchors \
                and not any(trigger(text) for trigger in self._triggers):
            return []  # the common case: nothing any rule could match
        starts: list[int] = []  # claimed spans, sorted and disjoint
        ends: list[int] = []
        kinds: list[str] = []
        windows: list[tuple[int, int]] | None = None
        seen = 0
        for index, rule in self._rules:
            if deadline is not None and time.monotonic() > deadline:
                raise ScanTooLong
            matches: Iterator[re.Match[str]]
            if rule.numeric:
                if windows is None:
                    # A leading "+" or "(" belongs to a phone number.
                    numbers = (scanning.finditer(_NUMERIC, text, deadline) if anchors is None
                               else prefilter.near(_NUMERIC, text, anchors.get("NUMERIC", []),
                                                   16, 3, deadline))
                    windows = [(max(m.start() - 1, 0), m.end()) for m in numbers]
                if not windows:
                    continue
                matches = (m for start, end in windows
                           for m in rule.pattern.finditer(text, start, end))
            elif rule.anchor is not None:
                if anchors is None:  # the whole text, in bounded steps
                    if rule.trigger is not None and not rule.trigger(text):
                        continue
                    matches = scanning.finditer(rule.pattern, text, deadline)
                else:
                    anchored = anchors.get(str(index))
                    if anchored is None:
                        continue
                    matches = prefilter.near(rule.pattern, text, anchored, rule.before,
                                             rule.after, deadline, rule.tail)
            elif rule.trigger is not None and rule.trigger(text):
                if rule.finder is not None:
                    matches = rule.finder(text)
                elif rule.stepped:
                    matches = scanning.finditer(rule.pattern, text, deadline)
                else:
                    matches = rule.pattern.finditer(text)
            else:
                continue
            new_starts: list[int] = []
            new_ends: list[int] = []
            last_end = -1
            for match in matches:
                seen += 1
                if deadline is not None and seen % _CLOCK_EVERY == 0 \
                        and time.monotonic() > deadline:
                    raise ScanTooLong
                start, end = match.span(rule.group)
                if start < last_end:
                    continue  # overlaps this rule's previous match (adjacent windows)
                # The first claimed span ending after this start is the only one that can
                # overlap it: skip cheaply when it holds the start, check fully once the
                # match is validated (an IBAN may end earlier than its match).
                i = bisect_right(ends, start)
                claimed = i < len(starts)
                if claimed and starts[i] <= start:
                    continue
                if rule.type == "IBAN":
                    iban_end = _iban_span(text, start, end)
                    if iban_end is None:
                        continue
                    end = iban_end
                elif rule.validate is not None and not rule.validate(match.group(rule.group)):
                    continue
                if claimed and starts[i] < end:
                    continue
                new_starts.append(start)
                new_ends.append(end)
                last_end = end
            if not new_starts:
                continue
            if not starts:
                starts, ends, kinds = new_starts, new_ends, [rule.type] * len(new_starts)
            else:
                starts, ends, kinds = _merge(starts, ends, kinds, new_starts, new_ends,
                                             rule.type)
        return [Finding(k, s, e) for s, e, k in zip(starts, ends, kinds, strict=True)]


def _merge(starts: list[int], ends: list[int], kinds: list[str], new_starts: list[int],
           new_ends: list[int], kind: str) -> tuple[list[int], list[int], list[str]]:
    """Two sorted, disjoint runs of spans into one, in one pass. Interpreted on purpose: a
    single C call over 100,000 spans (``sorted``) would hold the interpreter lock, and with it
    the event loop, for tens of milliseconds."""
    out_s: list[int] = []
    out_e: list[int] = []
    out_k: list[str] = []
    i = j = 0
    while i < len(starts) and j < len(new_starts):
        if starts[i] < new_starts[j]:
            out_s.append(starts[i])
            out_e.append(ends[i])
            out_k.append(kinds[i])
            i += 1
        else:
            out_s.append(new_starts[j])
            out_e.append(new_ends[j])
            out_k.append(kind)
            j += 1
    out_s += starts[i:] + new_starts[j:]
    out_e += ends[i:] + new_ends[j:]
    out_k += kinds[i:] + [kind] * (len(new_starts) - j)
    return out_s, out_e, out_k
