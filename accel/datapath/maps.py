"""ServiceTable -> BPF maps, written as diffs.

Key and value layouts come from bcc's table classes (table.Key / table.Leaf), built
from the C structs in bpf/lib/*.h: nothing here restates a layout.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from accel.model import IPAddress, IPNetwork, ServiceTable, mapped

log = logging.getLogger(__name__)


def set_addr16(target: ctypes.Structure, addr: IPAddress) -> None:
    """Write an address into a struct addr16 (v4-mapped, network byte order)."""
    ctypes.memmove(ctypes.addressof(target), mapped(addr).packed, 16)


def get_addr16(source: ctypes.Structure) -> IPAddress:
    raw = ctypes.string_at(ctypes.addressof(source), 16)
    addr = ipaddress.IPv6Address(raw)
    return addr.ipv4_mapped or addr


def mapped_prefix(net: IPNetwork) -> tuple[ipaddress.IPv6Address, int]:
    if net.version == 4:
        return mapped(net.network_address), 96 + net.prefixlen
    return net.network_address, net.prefixlen


@dataclass
class MapFullError(RuntimeError):
    map_name: str
    wanted: int
    written: int

    def __str__(self) -> str:
        return (f"map {self.map_name} is full: {self.written} of {self.wanted} entries written; "
                "raise its capacity (--capacity) or shrink the mesh")


@dataclass
class WriteReport:
    added: int = 0
    removed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def mesh_prefixes(table: ServiceTable) -> set[tuple[ipaddress.IPv6Address, int]]:
    """Every endpoint as a host prefix, plus the configured mesh CIDRs."""
    out = {(mapped(a), 128) for a in table.endpoint_addresses()}
    out.update(mapped_prefix(n) for n in table.mesh_cidrs)
    return out


class MeshNetsWriter:
    """accel_mesh_nets: which addresses make a socket a mesh socket."""

    def __init__(self, table) -> None:  # a bcc LpmTrie
        self.table = table
        self.current: set[tuple[ipaddress.IPv6Address, int]] = set(self._read())

    def _key(self, addr: ipaddress.IPv6Address, plen: int):
        k = self.table.Key()
        k.prefixlen = plen
        set_addr16(k.addr, addr)
        return k

    def _read(self) -> Iterable[tuple[ipaddress.IPv6Address, int]]:
        for k in self.table.keys():
            raw = ctypes.string_at(ctypes.addressof(k.addr), 16)
            yield ipaddress.IPv6Address(raw), int(k.prefixlen)

    def apply(self, table: ServiceTable) -> WriteReport:
        wanted = mesh_prefixes(table)
        report = WriteReport()
        # Add before remove: an address moving between prefixes is never unknown.
        for addr, plen in sorted(wanted - self.current):
            try:
                self.table[self._key(addr, plen)] = self.table.Leaf(1)
                self.current.add((addr, plen))
                report.added += 1
            except Exception as e:
                report.failed += 1
                report.errors.append(f"{addr}/{plen}: {e}")
        for addr, plen in sorted(self.current - wanted):
            try:
                del self.table[self._key(addr, plen)]
            except KeyError:
                pass
            self.current.discard((addr, plen))
            report.removed += 1
        if report.failed:
            log.error("accel_mesh_nets: %d prefixes not written (map full?): traffic to them "
                      "stays on the kernel path", report.failed)
        return report
