"""Backends in edge_backends (id -> address, port, generation, how to reach it) and the
devmap slots (edge_tx) of the interfaces they are redirected to, shared and refcounted."""

from __future__ import annotations

import ctypes
import logging
import secrets
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accel.datapath.edge.encoding import put_addr
from accel.datapath.edge.errors import EdgeCapacityError
from accel.datapath.edge.neighbours import NextHop, Routed
from accel.model import IPAddress

log = logging.getLogger(__package__)

BE_VALID = 1
BE_REDIRECT = 2
BE_FALLBACK = 4  # routed because the redirect target would drop the frames
BE_PEER = 8  # into a pod's veth from tc ingress (bpf_redirect_peer)


@dataclass
class Backend:
    id: int
    gen: int
    addr: IPAddress
    port: int
    hop: NextHop | None
    tx: int  # devmap slot, 0 when not redirected by XDP
    routed: Routed | None = None  # why the kernel routes it (hop is None)

    @property
    def via(self) -> str:
        """How XDP reaches it, and why (accel status)."""
        if self.hop is not None:
            how = "tc redirect_peer" if self.hop.peer else "redirect"
            return f"{how} ifindex {self.hop.ifindex}" + (f": {self.hop.why}"
                                                          if self.hop.why else "")
        why = self.routed.reason if self.routed else "no next hop known"
        return f"kernel route: {why}"


class Backends:
    """Backend ids and generations, and the devmap; `table(name)` gives the program's maps."""

    def __init__(self, table: Callable[[str], Any], max_backends: int, tx_max: int):
        self.table = table
        self.tx_max = tx_max
        self.free = deque(range(1, max_backends))  # 0 means "no backend"
        self._gen = secrets.randbits(31) + 1  # never matches a previous agent's flows
        self._tx_slots: dict[int, int] = {}  # ifindex -> devmap slot
        self._tx_refs: dict[int, int] = {}
        self._free_tx = deque(range(tx_max))
        self._legacy_tx: set[int] = set()  # interfaces the previous agent's backends hold
        self._ports: set[int] = set()  # network-order ports marked in edge_rports

    def _next_gen(self) -> int:
        self._gen = (self._gen % 0xFFFFFFFF) + 1
        return self._gen

    def new(self, addr: IPAddress, port: int, hop: NextHop | Routed | None) -> Backend:
        b = Backend(self.free.popleft(), self._next_gen(), addr, port, None, 0)
        self.set_hop(b, hop)
        return b

    def set_hop(self, b: Backend, hop: NextHop | Routed | None) -> None:
        old_if = b.hop.ifindex if b.hop and not b.hop.peer else None
        b.routed = None
        if isinstance(hop, Routed):
            b.routed, hop = hop, None
        elif hop is not None and not hop.peer:  # the devmap is for XDP's redirects only
            try:
                b.tx = self._tx_acquire(hop.ifindex)
            except EdgeCapacityError as e:
                log.warning("edge: %s: route mode", e)
                b.routed, hop = Routed(str(e)), None
        b.hop = hop
        self._write(b)
        if old_if is not None:
            self._tx_release(old_if)

    def _mark_port(self, port_be: int) -> None:
        """A backend serves on this port: replies from it are looked up (edge_rports). Set
        before the backend can be picked, never cleared: a flow may outlive its backend."""
        if port_be in self._ports:
            return
        t = self.table("edge_rports")
        word = ctypes.c_uint32(port_be >> 6)
        t[word] = ctypes.c_uint64(t[word].value | (1 << (port_be & 63)))
        self._ports.add(port_be)

    def _write(self, b: Backend) -> None:
        t = self.table("edge_backends")
        v = t.Leaf()
        put_addr(v.addr, b.addr)
        v.port = socket.htons(b.port)
        self._mark_port(v.port)
        v.gen = b.gen
        v.flags = BE_VALID
        if b.hop is not None:
            v.ifindex = b.hop.ifindex
            if b.hop.peer:
                v.flags |= BE_PEER
            else:
                v.flags |= BE_REDIRECT
                v.tx = b.tx
            ctypes.memmove(ctypes.addressof(v.macs), b.hop.dmac + b.hop.smac, 12)
            v.mtu = b.hop.mtu
        elif b.routed is not None and b.routed.fallback:
            v.flags |= BE_FALLBACK
        t[ctypes.c_uint32(b.id)] = v

    def drop(self, b: Backend) -> None:
        t = self.table("edge_backends")
        t[ctypes.c_uint32(b.id)] = t.Leaf()  # not VALID: its flows pick again
        self.free.append(b.id)
        if b.hop is not None and not b.hop.peer:
            self._tx_release(b.hop.ifindex)

    def _tx_acquire(self, ifindex: int) -> int:
        slot = self._tx_slots.get(ifindex)
        if slot is None:
            if not self._free_tx:
                raise EdgeCapacityError(f"devmap full ({self.tx_max} interfaces)")
            slot = self._free_tx.popleft()
            tx = self.table("edge_tx")
            tx[ctypes.c_uint32(slot)] = ctypes.c_int(ifindex)
            self._tx_slots[ifindex] = slot
            self._tx_refs[ifindex] = 0
        self._tx_refs[ifindex] += 1
        return slot

    def _tx_release(self, ifindex: int) -> None:
        self._tx_refs[ifindex] -= 1
        if self._tx_refs[ifindex] <= 0:
            slot = self._tx_slots.pop(ifindex)
            del self._tx_refs[ifindex]
            try:
                del self.table("edge_tx")[ctypes.c_uint32(slot)]
            except KeyError:
                pass
            self._free_tx.append(slot)

    # ---- a previous agent's backends (adoption) -------------------------------------------

    def legacy_ids(self) -> list[int]:
        """Ids of the valid backends a previous agent left in the map."""
        return [k.value for k, v in self.table("edge_backends").items() if v.flags & BE_VALID]

    def reserve(self, legacy: list[int]) -> None:
        """Keep the previous agent's backends and devmap slots until release()."""
        used = set(legacy)
        self.free = deque(b for b in self.free if b not in used)
        # Their replies keep being given the VIP back (pins of a build without the port
        # bitmap have it empty).
        bt = self.table("edge_backends")
        for bid in legacy:
            self._mark_port(bt[ctypes.c_uint32(bid)].port)
        for k, v in self.table("edge_tx").items():
            if v.value:
                self._tx_slots[v.value] = k.value
                self._tx_refs[v.value] = 1  # held by the legacy backends until released
                self._legacy_tx.add(v.value)
                if k.value in self._free_tx:
                    self._free_tx.remove(k.value)

    def release(self, legacy: list[int]) -> None:
        """After the first apply: the previous agent's backends are no longer referenced."""
        bt = self.table("edge_backends")
        for bid in legacy:
            bt[ctypes.c_uint32(bid)] = bt.Leaf()
            self.free.append(bid)
        # Only the references reserve() took: an interface first used since then holds
        # exactly one per backend of ours, and none of them is going.
        for ifindex in self._legacy_tx:
            self._tx_release(ifindex)
        self._legacy_tx = set()
