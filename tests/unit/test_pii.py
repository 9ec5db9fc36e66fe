"""Detecting and redacting personal data and secrets: what is found, what is not (checksums),
placeholders, and streamed text split anywhere."""

from __future__ import annotations

import itertools
import time

import pytest

from serving.protection.pii import Detector, ScanTooLong
from serving.protection.redaction import HOLD, Redactor, StreamRedactor

CARD = "4111 1111 1111 1111"
IBAN = "FR76 3000 6000 0112 3456 7890 189"
AWS = "AKIAIOSFODNN7EXAMPLE"
EMAIL = "jane.doe@example.com"

CASES = [
    ("EMAIL", f"write to {EMAIL} today"),
    ("PHONE", "call +33 6 12 34 56 78 now"),
    ("PHONE", "call (415) 555-2671 now"),
    ("CREDIT_CARD", f"card {CARD} exp 12/29"),
    ("CREDIT_CARD", "card 5500-0000-0000-0004."),
    ("CREDIT_CARD", "card 2221 0000 0000 0009"),  # Mastercard's 2-series
    ("FR_NIR", "nir 2 61 02 48 881 888 48"),  # passes Luhn too: not a card (15 digits, 26...)
    ("IBAN", f"iban {IBAN} please"),
    ("IBAN", "DE89370400440532013000"),
    ("IP_ADDRESS", "host 10.1.2.3."),
    ("IP_ADDRESS", "host 2001:db8::1 is up"),
    ("US_SSN", "ssn 123-45-6789"),
    ("FR_NIR", "nir 1 85 05 78 006 084 91"),
    ("AWS_ACCESS_KEY", f"key {AWS}"),
    ("API_KEY", "token ghp_" + "a1" * 18),
    ("PRIVATE_KEY", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"),
    ("JWT", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc123def456ghi"),
    ("BEARER_TOKEN", "Authorization: Bearer abcdefghijklmnop1234"),
    ("SECRET_TOKEN", "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
]


@pytest.mark.parametrize(("kind", "text"), CASES)
def test_each_type_is_found(kind: str, text: str) -> None:
    assert [f.type for f in Detector().find(text)] == [kind]


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",  # bad Luhn
    "iban FR76 3000 6000 0112 3456 7890 188",  # bad mod-97
    "ssn 000-12-3456",  # never issued
    "nir 1 85 05 78 006 084 92",  # bad key
    "at 12:30:45 on 2026-11-23, version 1.2.3, order 12345",
    "The quarterly report shows revenue grew 12% year over year.",
    "a long word: internationalization_and_localization_together",
    "ip 999.1.2.3",
])
def test_lookalikes_are_not_flagged(text: str) -> None:
    assert Detector().find(text) == []


def test_types_can_be_narrowed() -> None:
    assert [f.type for f in Detector(["EMAIL"]).find(f"{EMAIL} {CARD}")] == ["EMAIL"]
    with pytest.raises(ValueError, match="unknown"):
        Detector(["NAME"])


def test_same_value_same_placeholder_within_a_request() -> None:
    r = Redactor(Detector())
    first = r.redact(f"{EMAIL} and {CARD} and {EMAIL}")
    second = r.redact(f"again {EMAIL}, other bob@example.org")
    assert first == "<EMAIL_1> and <CREDIT_CARD_1> and <EMAIL_1>"
    assert second == "again <EMAIL_1>, other <EMAIL_2>"
    assert r.counts == {"EMAIL": 4, "CREDIT_CARD": 1}


def _stream(text: str, sizes: list[int]) -> tuple[str, int]:
    r = Redactor(Detector())
    s = StreamRedactor(r)
    out, at, i, held = [], 0, 0, 0
    while at < len(text):
        size = sizes[i % len(sizes)]
        out.append(s.feed(text[at:at + size]))
        at += size
        i += 1
        held = max(held, at - sum(len(o) for o in out))
    out.append(s.flush())
    return "".join(out), held


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [13, 1, 4], [50]])
def test_values_split_across_stream_events_are_redacted(sizes: list[int]) -> None:
    text = (f"Sure. Her e-mail is {EMAIL}, her card {CARD} and IBAN {IBAN}; the key "
            f"{AWS} must be rotated. " * 3)
    out, _ = _stream(text, sizes)
    assert EMAIL not in out and CARD not in out and IBAN not in out and AWS not in out
    assert out.count("<EMAIL_1>") == 3 and out.count("<IBAN_1>") == 3
    assert out.startswith("Sure. Her e-mail is <EMAIL_1>")


def test_stream_hold_back_is_bounded() -> None:
    text = "word " * 2000
    out, held = _stream(text, [3])
    assert out == text
    assert held <= HOLD + 8


def test_a_scan_past_its_deadline_stops() -> None:
    text = " ".join(f"u{i}@ex.io" for i in range(50_000))
    with pytest.raises(ScanTooLong):
        Detector().find(text, deadline=time.monotonic() - 1)


def test_overlapping_findings_keep_the_earlier_rules_span() -> None:
    # A JWT holds long tokens; an e-mail inside a URL-like string; each span is claimed once.
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc123def456ghi"
    found = Detector().find(f"{jwt} then {EMAIL} then {jwt}")
    assert [f.type for f in found] == ["JWT", "EMAIL", "JWT"]
    assert all(a.end <= b.start for a, b in itertools.pairwise(found))
