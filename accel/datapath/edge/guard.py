"""The flood guard: a deny trie (edge_deny) with a first-byte prefilter, and a per-source SYN
budget (edge_config), changed so that no denied source slips through while they swap."""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from accel.datapath.edge.encoding import get_addr, put_addr
from accel.model import Guard, IPNetwork


def deny_prefilter(nets: Iterable[IPNetwork]) -> tuple[list[int], list[int]]:
    """The deny4/deny6 bitmaps of edge_config (4 x u64 each) for a deny list.

    Bit b of deny4: some denied IPv4 CIDR holds addresses with first octet b.
    Bit b of deny6: some denied IPv6 CIDR holds addresses with second byte b.
    """
    b4, b6 = 0, 0
    for net in nets:
        raw = net.network_address.packed
        if net.version == 4:
            span = 1 << max(0, 8 - net.prefixlen)
            b4 |= ((1 << span) - 1) << (raw[0] & ~(span - 1) & 0xFF)
            b6 |= 1  # ::ffff:a.b.c.d sources of IPv6 packets share the trie entry
        else:
            if net.prefixlen <= 8:
                span = 256
            else:
                span = 1 << max(0, 16 - net.prefixlen)
            b6 |= ((1 << span) - 1) << (raw[1] & ~(span - 1) & 0xFF)
    words = lambda b: [(b >> (64 * i)) & (2**64 - 1) for i in range(4)]  # noqa: E731
    return words(b4), words(b6)


class EdgeGuard:
    """What the guard holds now (`guard`, `deny`) and how to change it; `table(name)` gives
    the edge program's maps."""

    def __init__(self, table: Callable[[str], Any]):
        self.table = table
        self.guard = Guard()
        self.deny: set[IPNetwork] = set()

    def adopt(self) -> None:
        """The previous agent's deny list stays in force until set() replaces it."""
        for k in self.table("edge_deny").keys():
            addr = get_addr(k.addr)
            plen = k.prefixlen - (96 if addr.version == 4 else 0)
            self.deny.add(ipaddress.ip_network(f"{addr}/{plen}", strict=False))

    def set(self, guard: Guard) -> None:
        """Deny list and SYN budget. New denies go in before the old ones go out."""
        deny = self.table("edge_deny")
        new = set(guard.deny)
        for net in new - self.deny:
            deny[self._deny_key(net)] = ctypes.c_uint32(1)
        self.guard = guard
        self._write_config(self.deny | new)  # the prefilter covers both while they swap
        for net in self.deny - new:
            deny.pop(self._deny_key(net), None)
        self.deny = new
        self._write_config(new)

    def _deny_key(self, net: IPNetwork):
        k = self.table("edge_deny").Key()
        put_addr(k.addr, net.network_address)
        k.prefixlen = net.prefixlen + (96 if net.version == 4 else 0)
        return k

    def _write_config(self, nets: set[IPNetwork]) -> None:
        g = self.guard
        t = self.table("edge_config")
        c = t.Leaf()
        c.syn_rate = g.syn_rate
        c.syn_cap = g.syn_burst * 10**9
        c.syn_fill_ns = -(-c.syn_cap // g.syn_rate) if g.syn_rate else 0
        c.deny_active = 1 if nets else 0
        d4, d6 = deny_prefilter(nets)
        for i in range(4):
            c.deny4[i] = d4[i]
            c.deny6[i] = d6[i]
        t[ctypes.c_uint32(0)] = c
