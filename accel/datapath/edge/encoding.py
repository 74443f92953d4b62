"""How the edge programs see addresses, ports and endpoints: accel/bpf/lib/edge.h's encodings and
hashes, mirrored so that Python places VIPs and predicts ring slots as XDP will."""

from __future__ import annotations

import socket

from accel.kernel import addr as addr16
from accel.model import IPAddress, mapped

PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


def ep_name(addr: IPAddress, port: int) -> str:
    """An endpoint's name in the Maglev ring: its permutation derives from it."""
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


put_addr = addr16.put  # the one address encoding (accel/kernel/addr.py)
get_addr = addr16.get


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _words(addr: IPAddress) -> tuple[int, int, int, int]:
    """An address16 as the datapath loads it: four native-order u32 of network bytes."""
    packed = mapped(addr).packed
    return tuple(int.from_bytes(packed[i : i + 4], "little") for i in (0, 4, 8, 12))


def _raw16(port: int) -> int:
    """A port as the datapath loads it from the packet (network bytes, native u16)."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def vip_hash(key: tuple[IPAddress, int, str], slots: int) -> int:
    """edge_vip_hash() of edge.h: the home slot of a VIP."""
    w = _words(key[0])
    x = w[0] ^ w[1] ^ w[2] ^ w[3]
    return _mix32(x ^ (_raw16(key[1]) << 8) ^ PROTO_NUMBERS[key[2]]) & (slots - 1)


def flow_slot(src: IPAddress, sport: int, dport: int, size: int) -> int:
    """The ring slot a client flow hashes to (edge_flow_hash() scaled onto the ring)."""
    w = _words(src)
    ports = (_raw16(sport) << 16) | _raw16(dport)
    return (_mix32(_mix32(w[3] ^ ports) ^ (w[0] ^ w[1] ^ w[2])) * size) >> 32
