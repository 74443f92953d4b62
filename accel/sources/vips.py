"""Deterministic VIP allocation: service name -> address in a CIDR.

Each name hashes to a slot of the CIDR; when two names want the same slot, the names are
taken in sorted order and a later one probes on (name#1, name#2, ...). So the same set of
names always gets the same VIPs (across controller restarts and in `accel compose hosts`,
which must agree with the controller), and adding a name moves no other name's VIP unless
it collides with it and sorts before it: pin `meshaccel.vip` where that must never happen.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping

from accel.model import IPAddress, IPNetwork, ValidationError, parse_network

DEFAULT_VIP_CIDR = "10.96.0.0/16"


def parse_cidr(value: str | IPNetwork, path: str = "--vip-cidr") -> IPNetwork:
    net = value if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network) else (
        parse_network(value, path))
    if _usable(net)[1] < 1:
        raise ValidationError(path, f"{net} has no usable addresses")
    return net


def _usable(net: IPNetwork) -> tuple[int, int]:
    """(first usable address as int, how many): no network or broadcast address."""
    base = int(net.network_address)
    if net.version == 4 and net.prefixlen <= 30:
        return base + 1, net.num_addresses - 2
    if net.version == 6 and net.prefixlen <= 126:
        return base + 1, net.num_addresses - 1  # skip the subnet-router anycast address
    return base, net.num_addresses


def _slot(name: str, attempt: int, count: int) -> int:
    key = name if attempt == 0 else f"{name}#{attempt}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big") % count


def allocate(
    names: Iterable[str],
    cidr: str | IPNetwork = DEFAULT_VIP_CIDR,
    pinned: Mapping[str, IPAddress] | None = None,
) -> dict[str, IPAddress]:
    """VIPs for `names`. `pinned` names keep their given VIP (and no other name gets it)."""
    net = parse_cidr(cidr)
    first, count = _usable(net)
    pinned = dict(pinned or {})
    taken = {int(a) for a in pinned.values() if a.version == net.version}
    wanted = sorted(set(names) - set(pinned))
    free = count - sum(1 for a in taken if first <= a < first + count)
    if len(wanted) > free:
        raise ValidationError("--vip-cidr", f"{net} has {free} free addresses for "
                              f"{len(wanted)} services: use a larger CIDR")
    out: dict[str, IPAddress] = dict(pinned)
    cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
    for name in wanted:
        attempt = 0
        while True:
            addr = first + _slot(name, attempt, count)
            if addr not in taken:
                break
            attempt += 1
            if attempt > 64:  # a nearly full CIDR: take the next free address after the slot
                addr = first + _slot(name, 0, count)
                while addr in taken:
                    addr = first + (addr - first + 1) % count
                break
        taken.add(addr)
        out[name] = cls(addr)
    return out
