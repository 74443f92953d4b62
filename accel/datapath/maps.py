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

from accel.model import IPAddress, IPNetwork, Service, ServiceTable, TableDelta, mapped

log = logging.getLogger(__name__)


_V4_MAPPED = bytes(10) + b"\xff\xff"


def set_addr16(target: ctypes.Structure, addr: IPAddress) -> None:
    """Write an address into a struct addr16 (v4-mapped, network byte order)."""
    raw = _V4_MAPPED + addr.packed if addr.version == 4 else addr.packed
    ctypes.memmove(ctypes.addressof(target), raw, 16)


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


Prefix = tuple[ipaddress.IPv6Address, int]


def service_addresses(svc: Service) -> frozenset[ipaddress.IPv6Address]:
    """A service's endpoint addresses as accel_mesh_nets keys them; computed once per Service."""
    return svc.derived("mesh_addresses",
                       lambda s: frozenset(mapped(ep.address) for ep in s.endpoints))


def mesh_prefixes(table: ServiceTable) -> set[Prefix]:
    """Every endpoint as a host prefix, plus the configured mesh CIDRs."""
    out = {(a, 128) for s in table.services for a in service_addresses(s)}
    out.update(mapped_prefix(n) for n in table.mesh_cidrs)
    return out


class MeshNetsWriter:
    """accel_mesh_nets: which addresses make a socket a mesh socket.

    An endpoint address stays while any service uses it, so the writer counts services per
    address (`refs`) for the table it last applied; the next table, derived from that one,
    costs only its changed services (table.delta). Without such a table (the first apply,
    or after a failed one) it recounts everything and reconciles with what the kernel holds.
    """

    def __init__(self, table) -> None:  # a bcc LpmTrie
        self.table = table
        self.current: set[Prefix] = set(self._read())  # what the map holds
        self.refs: dict[ipaddress.IPv6Address, int] = {}  # endpoint address -> services
        self.cidrs: set[Prefix] = set()
        self.applied: ServiceTable | None = None

    def _key(self, addr: ipaddress.IPv6Address, plen: int):
        k = self.table.Key()
        k.prefixlen = plen
        set_addr16(k.addr, addr)
        return k

    def _read(self) -> Iterable[Prefix]:
        for k in self.table.keys():
            raw = ctypes.string_at(ctypes.addressof(k.addr), 16)
            yield ipaddress.IPv6Address(raw), int(k.prefixlen)

    def _wanted(self, p: Prefix) -> bool:
        return (p[1] == 128 and p[0] in self.refs) or p in self.cidrs

    def count_after(self, table: ServiceTable) -> int:
        """Distinct endpoint addresses plus mesh CIDRs once `table` is applied (capacity)."""
        if self.applied is None:
            return len({a for s in table.services for a in service_addresses(s)}) + \
                len(table.mesh_cidrs)
        n = len(self.refs)
        for addr, change in _ref_changes(table.delta(self.applied)).items():
            before = self.refs.get(addr, 0)
            n += (before + change > 0) - (before > 0)
        return n + len(table.mesh_cidrs)

    def apply(self, table: ServiceTable) -> WriteReport:
        old_cidrs = self.cidrs
        if self.applied is None or table.mesh_cidrs != self.applied.mesh_cidrs:
            self.cidrs = {mapped_prefix(n) for n in table.mesh_cidrs}
        if self.applied is None:
            self.refs = {}
            for s in table.services:
                for a in service_addresses(s):
                    self.refs[a] = self.refs.get(a, 0) + 1
            wanted = {(a, 128) for a in self.refs} | self.cidrs
            to_add, to_remove = wanted - self.current, self.current - wanted
        else:
            touched = set()
            for addr, change in _ref_changes(table.delta(self.applied)).items():
                n = self.refs.get(addr, 0) + change
                if n > 0:
                    self.refs[addr] = n
                else:
                    self.refs.pop(addr, None)
                touched.add((addr, 128))
            touched |= old_cidrs ^ self.cidrs
            to_add = {p for p in touched if p not in self.current and self._wanted(p)}
            to_remove = {p for p in touched if p in self.current and not self._wanted(p)}
        report = WriteReport()
        # Add before remove: an address moving between prefixes is never unknown.
        for addr, plen in to_add:
            try:
                self.table[self._key(addr, plen)] = self.table.Leaf(1)
                self.current.add((addr, plen))
                report.added += 1
            except Exception as e:
                report.failed += 1
                report.errors.append(f"{addr}/{plen}: {e}")
        for addr, plen in to_remove:
            try:
                del self.table[self._key(addr, plen)]
            except KeyError:
                pass
            self.current.discard((addr, plen))
            report.removed += 1
        # A prefix the map refused is still wanted: only a full reconcile will retry it.
        self.applied = None if report.failed else table
        if report.failed:
            log.error("accel_mesh_nets: %d prefixes not written (map full?): traffic to them "
                      "stays on the kernel path", report.failed)
        return report


def _ref_changes(delta: TableDelta) -> dict[ipaddress.IPv6Address, int]:
    """Per endpoint address, how many more (or fewer) services use it after `delta`."""
    out: dict[ipaddress.IPv6Address, int] = {}
    for s in delta.added:
        for a in service_addresses(s):
            out[a] = out.get(a, 0) + 1
    for s in delta.removed:
        for a in service_addresses(s):
            out[a] = out.get(a, 0) - 1
    return out
