"""Prefix affinity: requests that share a prompt prefix go where that prefix is cached.

vLLM keeps the KV cache of recent prompts (its prefix cache); a request whose prompt starts
like an earlier one skips recomputing that start, but only on the replica that computed it.
So the gateway hashes the start of each prompt in blocks (``prefix_keys``: a chain of hashes,
block i's key covering everything up to its end), remembers which replica each key went to
(``PrefixMap``, bounded, least recently used dropped first), and sends a request to the replica
that served its longest known prefix. A prefix seen for the first time goes to the replica its
first block hashes to on a consistent-hash ring (``Ring``), so every gateway process sends the
same system prompt to the same replica without sharing state.

Bounded loads (consistent hashing with bounded loads): a replica takes an affine request only
while its outstanding requests are under ``LOAD_FACTOR`` times the mean (plus one); past that,
the ring's next replica takes it, so a popular prefix cannot pile onto one engine.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

BLOCK = 1024  # bytes of the serialised prompt per key
MAX_BLOCKS = 32  # keys for at most the first 32 KiB
VNODES = 64
LOAD_FACTOR = 1.25
MAP_SIZE = 1 << 16
_STARTS = (b'"messages":', b'"prompt":')
_SPREAD = 0x9E3779B97F4A7C15  # Fibonacci hashing: a 32-bit CRC spread over the 64-bit ring
_MASK64 = (1 << 64) - 1


class _Named(Protocol):
    name: str
    in_flight: int


def prefix_keys(body: bytes) -> tuple[int, ...]:
    """The chained block hashes of the prompt in a serialised request body (from its
    ``messages`` or ``prompt``; the fields before it vary from request to request). A hint
    only: a body where it is not found hashes from its start.

    The first key (the ring's) is a stable hash (CRC-32 of the first block, spread over 64
    bits), the same in every gateway process; the others only index this process's
    ``PrefixMap``, so they use Python's own hash of each block (SipHash), chained: key i covers
    blocks 0..i."""
    start = 0
    for marker in _STARTS:
        found = body.find(marker)
        if found >= 0:
            start = found
            break
    view = memoryview(body)[start:start + BLOCK * MAX_BLOCKS]
    first = (zlib.crc32(view[:BLOCK]) * _SPREAD) & _MASK64
    keys = [first]
    key = first
    for offset in range(BLOCK, len(view), BLOCK):
        key = hash((key, hash(view[offset:offset + BLOCK])))
        keys.append(key)
    return tuple(keys)


class Prefix:
    """A request's prefix keys, computed only if a decision needs them (one replica to choose
    from needs none), once per request however many attempts it takes."""

    __slots__ = ("_body", "_keys")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._keys: tuple[int, ...] | None = None

    @property
    def keys(self) -> tuple[int, ...]:
        if self._keys is None:
            self._keys = prefix_keys(self._body)
        return self._keys


def bound(loads_total: int, replicas: int) -> int:
    """The most outstanding requests a replica may have and still take an affine request."""
    return math.ceil(LOAD_FACTOR * (loads_total + 1) / replicas)


class Ring:
    """A consistent-hash ring over a version's replicas (by name: stable across processes)."""

    def __init__(self, names: Sequence[str]) -> None:
        points = sorted(
            (int.from_bytes(hashlib.blake2b(f"{name}#{i}".encode(), digest_size=8).digest(),
                            "little"), name)
            for name in names for i in range(VNODES))
        self._hashes = [p[0] for p in points]
        self._names = [p[1] for p in points]
        self.members = frozenset(names)

    def walk(self, key: int) -> list[str]:
        """Replica names in ring order from ``key``, each once."""
        if not self._names:
            return []
        i = bisect.bisect(self._hashes, key)
        seen: list[str] = []
        n = len(self._names)
        for j in range(n):
            name = self._names[(i + j) % n]
            if name not in seen:
                seen.append(name)
                if len(seen) == len(self.members):
                    break
        return seen


class PrefixMap:
    """Which replica each prefix key was last sent to (LRU, ``MAP_SIZE`` keys)."""

    def __init__(self, size: int = MAP_SIZE) -> None:
        self._size = size
        self._map: OrderedDict[int, str] = OrderedDict()

    def longest(self, keys: Sequence[int]) -> tuple[str | None, int]:
        """The replica of the longest known prefix, and how many keys it covers."""
        m = self._map
        for i in range(len(keys) - 1, -1, -1):
            name = m.get(keys[i])
            if name is not None:
                return name, i + 1
        return None, 0

    def record(self, keys: Sequence[int], name: str, known: int = 0) -> None:
        """``keys`` went to ``name``; the first ``known`` already point there (only the longest
        of them is refreshed: a lookup finds it first)."""
        m = self._map
        start = max(known - 1, 0)
        for i in range(start, len(keys)):
            key = keys[i]
            m[key] = name
            m.move_to_end(key)
        while len(m) > self._size:
            m.popitem(last=False)

    def __len__(self) -> int:
        return len(self._map)
