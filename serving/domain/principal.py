"""The caller, once authenticated (by ``auth``): read by admission, intake and the outcome."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the client, how it proved it (a key id or a token), what it may do.
    Never the key or the token."""

    key_id: str
    name: str
    client_id: str | None = None
    policy: str | None = None
    scopes: frozenset[str] = frozenset()
    via: str = "key"  # "key" | "token"
