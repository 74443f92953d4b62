"""Maglev lookup tables (Eisenbud et al., NSDI 2016), weighted.

Each backend walks its own permutation of the table's slots (an offset and a
skip derived from a stable hash of its name) and, on its turn, takes the next
free slot on that walk. Turns are handed out in proportion to the weights, so
a backend's share of the slots is its share of the weight, and removing one of
N backends moves about 1/N of the slots: the others mostly keep theirs.

The table depends only on the set of (name, weight) pairs, never on input
order or on the process: an agent restarted with the same endpoints builds the
same table, so flows it has forgotten still land where they were.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections.abc import Iterable

DEFAULT_SIZE = 65537
NO_BACKEND = -1


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def check_size(size: int, backends: int = 0) -> None:
    """The table size must be prime (every skip then visits every slot) and room for all."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"maglev table size must be an integer >= 2, got {size!r}")
    if not is_prime(size):
        raise ValueError(f"maglev table size {size} is not prime (try 65537 or 16411)")
    if backends > size:
        raise ValueError(f"{backends} backends do not fit a maglev table of {size} slots")


def _offset_skip(name: str, size: int) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode(), digest_size=16, person=b"accel-maglev").digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def build(backends: Iterable[tuple[str, int]], size: int = DEFAULT_SIZE) -> array:
    """The lookup table: for each slot, the index of its backend in sorted-name order.

    `backends` are (name, weight) pairs with unique names and weights >= 1; the
    returned indices refer to `sorted(names)`. With no backend every slot is
    NO_BACKEND.
    """
    items = sorted(backends)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("maglev backend names must be unique")
    for name, weight in items:
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"maglev backend {name!r}: weight must be an integer >= 1")
    check_size(size, len(items))
    table = array("i", [NO_BACKEND]) * size
    if not items:
        return table

    pos: list[int] = []
    skip: list[int] = []
    for name in names:
        off, sk = _offset_skip(name, size)
        pos.append(off)
        skip.append(sk)

    weights = [w for _, w in items]
    filled = 0
    if len(set(weights)) == 1:
        order: Iterable[int] = _round_robin(len(items))
    else:
        order = _weighted_turns(weights)
    for i in order:
        c = pos[i]
        s = skip[i]
        while table[c] != NO_BACKEND:
            c += s
            if c >= size:
                c -= size
        table[c] = i
        c += s
        if c >= size:
            c -= size
        pos[i] = c
        filled += 1
        if filled == size:
            break
    return table


def _round_robin(n: int) -> Iterable[int]:
    r = range(n)
    while True:
        yield from r


def _weighted_turns(weights: list[int]) -> Iterable[int]:
    """Backend i's k-th turn falls at time k / weight_i; ties go to the lower index.

    The same schedule as Envoy's weighted Maglev, computed with a heap so a
    tiny weight beside a huge one costs nothing extra.
    """
    heap = [(1 / w, i, 1) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    while True:
        _, i, k = heap[0]
        yield i
        heapq.heapreplace(heap, ((k + 1) / weights[i], i, k + 1))


def shares(table: array, n: int) -> list[float]:
    """Fraction of the slots each of n backends holds."""
    counts = [0] * n
    for b in table:
        if b != NO_BACKEND:
            counts[b] += 1
    total = len(table)
    return [c / total for c in counts]
