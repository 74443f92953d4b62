"""The one address encoding every map uses (struct addr16 in accel/bpf/lib/common.h): 16
bytes in network order, IPv4 as v4-mapped IPv6 (::ffff:a.b.c.d), so an AF_INET and an
AF_INET6 socket dialing the same IPv4 address produce the same key."""

from __future__ import annotations

import ctypes
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_V4_MAPPED = 0xFFFF << 32


def pack(addr: IPAddress) -> bytes:
    """The 16 bytes of an address (by arithmetic: a string round trip costs seconds at
    100,000 endpoints)."""
    n = int(addr)
    return (n | _V4_MAPPED if addr.version == 4 else n).to_bytes(16, "big")


def unpack(raw: bytes) -> IPAddress:
    a = ipaddress.IPv6Address(raw)
    return a.ipv4_mapped or a


def put(target: ctypes.Structure | ctypes.Array, addr: IPAddress) -> None:
    """Write an address into a struct addr16 (or any 16-byte field) in place."""
    ctypes.memmove(ctypes.addressof(target), pack(addr), 16)


def get(source: ctypes.Structure | ctypes.Array) -> IPAddress:
    return unpack(ctypes.string_at(ctypes.addressof(source), 16))
