"""A labelled corpus for the PII detector: realistic business prose with personal data and
secrets planted at known offsets, and near-misses that must not be flagged (numbers that fail
their checksum, e-mail-like strings in code, dates, versions, order numbers, digests).
Generated from a fixed seed; the committed copy is ``tests/data/pii_corpus.jsonl``.

    python -m tests.support.pii_corpus    # rewrite the committed copy
"""

from __future__ import annotations

import base64
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers
from stdnum import iban, luhn
from stdnum.fr import nir

CORPUS = Path(__file__).resolve().parent.parent / "data" / "pii_corpus.jsonl"
SEED = 20261205
DOCUMENTS = 400

FIRST = ["jane", "omar", "li", "sofia", "marc", "anna", "ravi", "chloe", "tom", "ines"]
LAST = ["doe", "haddad", "wei", "garcia", "dubois", "kowalski", "patel", "martin", "berg"]
DOMAINS = ["example.com", "corp.example.org", "mail.example.net", "finance.example.co.uk"]
PROSE = [
    "The quarterly review covered the migration of the billing platform to the new region.",
    "Please find attached the minutes of Tuesday's steering committee.",
    "Our on-call rotation changes next week; the handover notes are in the usual folder.",
    "The supplier confirmed delivery of the replacement parts before the end of the month.",
    "Latency on the search service improved after the cache was resized.",
    "The audit found no material issues, but two controls need better documentation.",
    "We agreed to revisit the retention policy once legal has reviewed the draft.",
    "Customer satisfaction rose slightly, mostly thanks to faster support responses.",
    "The training session on incident response is scheduled for the third week.",
    "Budget figures for the next fiscal year are still being consolidated by finance.",
]


@dataclass
class Document:
    text: str = ""
    labels: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, text: str, kind: str | None = None) -> None:
        if kind is not None:
            self.labels.append((kind, len(self.text), len(self.text) + len(text)))
        self.text += text


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _card(rng: random.Random, valid: bool) -> str:
    body = rng.choice("45") + _digits(rng, 14)
    check = luhn.calc_check_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    number = body + check
    sep = rng.choice([" ", "-", ""])
    return sep.join(number[i:i + 4] for i in range(0, 16, 4))


def _iban(rng: random.Random, valid: bool) -> str:
    country, bban = rng.choice([("FR", "3000600001" + _digits(rng, 13)),
                                ("DE", _digits(rng, 18)), ("NL", "ABNA" + _digits(rng, 10))])
    check = iban.calc_check_digits(country + "00" + bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 50)) % 97 + 2:02d}"
    number = country + check + bban
    return " ".join(number[i:i + 4] for i in range(0, len(number), 4))


def _ssn(rng: random.Random, valid: bool) -> str:
    if valid:
        area = rng.choice([rng.randint(1, 665), rng.randint(667, 899)])
        return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    return rng.choice([f"000-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
                       f"666-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
                       f"{rng.randint(1, 665):03d}-00-{rng.randint(1, 9999):04d}"])


def _nir(rng: random.Random) -> str:
    number = (f"{rng.choice('12')}{rng.randint(40, 99):02d}{rng.randint(1, 12):02d}"
              f"{rng.randint(1, 95):02d}{rng.randint(1, 999):03d}{rng.randint(1, 999):03d}")
    key = nir.calc_check_digits(number)
    full = number + key
    return " ".join([full[0], full[1:3], full[3:5], full[5:7], full[7:10], full[10:13],
                     full[13:]])


def _phone(rng: random.Random) -> str:
    region = rng.choice(["US", "FR", "GB", "DE"])
    kind = rng.choice([phonenumbers.PhoneNumberType.MOBILE,
                       phonenumbers.PhoneNumberType.FIXED_LINE])
    example = phonenumbers.example_number_for_type(region, kind)
    assert example is not None
    for _ in range(50):
        national = str(example.national_number)
        candidate = national[:-3] + _digits(rng, 3)
        number = phonenumbers.parse(f"+{example.country_code}{candidate}", None)
        if phonenumbers.is_valid_number(number):
            style = rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL,
                                phonenumbers.PhoneNumberFormat.E164])
            return phonenumbers.format_number(number, style)
    return phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


def _token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits,
           ) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _jwt(rng: random.Random) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return (part({"alg": "HS256", "typ": "JWT"}) + "." +
            part({"sub": _token(rng, 8), "exp": rng.randint(1_700_000_000, 1_900_000_000)}) +
            "." + _token(rng, 43, string.ascii_letters + string.digits + "-_"))


def _private_key(rng: random.Random) -> str:
    body = "\n".join(_token(rng, 64, string.ascii_letters + string.digits + "+/")
                     for _ in range(4))
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----"


def _plant(rng: random.Random) -> tuple[str | None, str, str, str]:
    """(type, text before, the value, text after); type None: a near-miss, nothing to find."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    choices: list[tuple[str | None, str, str, str]] = [
        ("EMAIL", "You can reach the account owner at ", f"{first}.{last}@{rng.choice(DOMAINS)}",
         " for any question."),
        ("PHONE", "Call the site manager on ", _phone(rng), " before noon."),
        ("CREDIT_CARD", "The refund goes back to card ", _card(rng, True), " within five days."),
        ("IBAN", "Wire the deposit to IBAN ", _iban(rng, True), " and quote the invoice."),
        ("US_SSN", "Her social security number, ", _ssn(rng, True), ", is on the form."),
        ("FR_NIR", "Numéro de sécurité sociale : ", _nir(rng), ", à vérifier."),
        ("IP_ADDRESS", "The attempts came from ", f"{rng.randint(11, 223)}.{rng.randint(0, 255)}"
         f".{rng.randint(0, 255)}.{rng.randint(1, 254)}", " during the night."),
        ("AWS_ACCESS_KEY", "Rotate the key ", "AKIA" + _token(rng, 16, string.ascii_uppercase
                                                              + "234567"), " today."),
        ("API_KEY", "The old token ", "ghp_" + _token(rng, 36), " was revoked."),
        ("JWT", "The session cookie held ", _jwt(rng), " until logout."),
        ("PRIVATE_KEY", "Someone pasted this into the ticket:\n", _private_key(rng), "\n"),
        ("BEARER_TOKEN", "The request header was Authorization: Bearer ", _token(rng, 40),
         " as captured."),
        ("SECRET_TOKEN", "The database password is ", _token(rng, 36), " for now."),
        # near-misses
        (None, "The card number ", _card(rng, False), " was rejected as invalid."),
        (None, "The IBAN ", _iban(rng, False), " failed validation."),
        (None, "Reference ", _ssn(rng, False), " is not a valid number."),
        (None, "In the code, ", rng.choice(["user@localhost", "@property", "a@b",
                                            "git@host:repo", "foo@bar"]), " appears twice."),
        (None, "The release ", f"v{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",
         " ships next week."),
        (None, "The meeting on ", f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
         " at 10:30 was moved."),
        (None, "Order ", f"{rng.randint(10000, 99999)}", " left the warehouse."),
        (None, "Revenue grew by ", f"{rng.randint(1, 40)}.{rng.randint(0, 9)} percent",
         " this quarter."),
        (None, "The ticket number is ", f"INC-{rng.randint(100000, 999999)}", "."),
    ]
    return rng.choice(choices)


def generate(seed: int = SEED, documents: int = DOCUMENTS) -> list[Document]:
    rng = random.Random(seed)
    out = []
    for _ in range(documents):
        doc = Document()
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.6:
                kind, before, value, after = _plant(rng)
                doc.add(before)
                doc.add(value, kind)
                doc.add(after)
            else:
                doc.add(rng.choice(PROSE))
            doc.add(" ")
        out.append(doc)
    return out


def dumps(docs: list[Document]) -> str:
    return "".join(json.dumps({"text": d.text, "labels": d.labels}, ensure_ascii=False) + "\n"
                   for d in docs)


if __name__ == "__main__":
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    CORPUS.write_text(dumps(generate()))
    print(f"wrote {CORPUS}")
