"""ServiceTable -> BPF maps, written as diffs.

Key and value layouts are the maps' own, read back from their BTF (accel/kernel/maps.py),
which the C structs in accel/bpf/lib/*.h defined: nothing here restates a layout.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from accel.datapath.batch import BatchMap, Layout, strerror
from accel.kernel import addr as addr16
from accel.model import IPAddress, IPNetwork, Service, ServiceTable, TableDelta, mapped

log = logging.getLogger(__name__)


# The one address encoding (accel/kernel/addr.py), under the names the writers use.
set_addr16 = addr16.put
get_addr16 = addr16.get


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


# (address as accel_mesh_nets keys it, v4-mapped, as a 128-bit int; prefix length). Ints, not
# IPv6Address objects: a full apply hashes and compares a few hundred thousand of them.
Prefix = tuple[int, int]
_V4_MAPPED_INT = 0xFFFF00000000


def addr_int(addr: IPAddress) -> int:
    """An address as accel_mesh_nets keys it (v4-mapped v6), as an int."""
    return int(addr) | _V4_MAPPED_INT if addr.version == 4 else int(addr)


def _prefix(net: IPNetwork) -> Prefix:
    addr, plen = mapped_prefix(net)
    return int(addr), plen


def service_addresses(svc: Service) -> tuple[int, ...]:
    """A service's endpoint addresses as accel_mesh_nets keys them, each once; computed once
    per Service (a tuple: a frozenset of ten ints costs three times the memory, and this
    is kept for every service)."""
    return svc.derived("mesh_addresses",
                       lambda s: tuple(dict.fromkeys([addr_int(ep.address)
                                                      for ep in s.endpoints])))


def mesh_prefixes(table: ServiceTable) -> set[tuple[ipaddress.IPv6Address, int]]:
    """Every endpoint as a host prefix, plus the configured mesh CIDRs."""
    out = {(a, 128) for s in table.services for a in service_addresses(s)}
    out.update(_prefix(n) for n in table.mesh_cidrs)
    return {(ipaddress.IPv6Address(a), p) for a, p in out}


class MeshNetsWriter:
    """accel_mesh_nets: which addresses make a socket a mesh socket.

    An endpoint address stays while any service uses it, so the writer counts services per
    address (`refs`) for the table it last applied; the next table, derived from that one,
    costs only its changed services (table.delta). Without such a table (the first apply,
    or after a failed one) it recounts everything and reconciles with what the kernel holds.
    """

    def __init__(self, table, batch: bool = True) -> None:  # a bcc LpmTrie
        self.table = table
        # LPM tries have batch ops only on newer kernels: BatchMap finds out, and falls back.
        self._batch = BatchMap(table, batch)
        self._key_layout = Layout(table.Key, "prefixlen", "addr")
        self._one = Layout(table.Leaf, "value").pack(1)
        self.current: set[Prefix] = set(self._read())  # what the map holds
        self.refs: dict[int, int] = {}  # endpoint address -> services using it
        self.cidrs: set[Prefix] = set()
        self.applied: ServiceTable | None = None

    def prefixes(self) -> list[tuple[ipaddress.IPv6Address, int]]:
        """What the map holds, as addresses."""
        return [(ipaddress.IPv6Address(a), p) for a, p in self.current]

    def _pack(self, prefixes: Iterable[Prefix]) -> bytes:
        pack = self._key_layout.pack
        return b"".join([pack(plen, addr.to_bytes(16, "big")) for addr, plen in prefixes])

    def _read(self) -> Iterable[Prefix]:
        for k in self.table.keys():
            raw = ctypes.string_at(ctypes.addressof(k.addr), 16)
            yield int.from_bytes(raw, "big"), int(k.prefixlen)

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
            self.cidrs = {_prefix(n) for n in table.mesh_cidrs}
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
        adds = list(to_add)
        refused = self._batch.update_each(self._pack(adds), self._one * len(adds))
        for i, err in refused:
            addr, plen = adds[i]
            report.failed += 1
            report.errors.append(f"{addr}/{plen}: {strerror(err)}")
        self.current.update(adds)
        self.current.difference_update(adds[i] for i, _ in refused)
        report.added = len(adds) - len(refused)
        self._batch.delete_each(self._pack(to_remove))
        self.current.difference_update(to_remove)
        report.removed = len(to_remove)
        # A prefix the map refused is still wanted: only a full reconcile will retry it.
        self.applied = None if report.failed else table
        if report.failed:
            log.error("accel_mesh_nets: %d prefixes not written (map full?): traffic to them "
                      "stays on the kernel path", report.failed)
        return report


def _ref_changes(delta: TableDelta) -> dict[int, int]:
    """Per endpoint address, how many more (or fewer) services use it after `delta`. A service
    replaced by one with the same addresses (a table rebuilt, not derived) changes nothing."""
    before = {s.name: s for s in delta.removed}
    same = set()
    for s in delta.added:
        old = before.get(s.name)
        if old is not None and service_addresses(old) == service_addresses(s):
            same.add(s.name)
    out: dict[int, int] = {}
    for s in delta.added:
        if s.name not in same:
            for a in service_addresses(s):
                out[a] = out.get(a, 0) + 1
    for s in delta.removed:
        if s.name not in same:
            for a in service_addresses(s):
                out[a] = out.get(a, 0) - 1
    return out
