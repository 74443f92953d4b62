"""Maglev rings in edge_rings: one ring slot per VIP plus a spare, each written whole before
a VIP entry points at it, and the dirty bits that send a ring slot whose owner changed
through the flow table (EDGE_CELL_DIRTY in accel/bpf/lib/edge.h)."""

from __future__ import annotations

import ctypes
import operator
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from accel import maglev
from accel.datapath.edge.backends import BE_VALID
from accel.datapath.edge.encoding import PROTO_NAMES, ep_name, flow_slot, get_addr
from accel.datapath.edge.vips import Vip, VipKey


class Rings:
    """Ring slots (`free`) and their contents; `table(name)` gives the program's maps."""

    def __init__(self, table: Callable[[str], Any], maglev_size: int, max_vips: int):
        self.table = table
        self.maglev_size = maglev_size
        self.rows = -(-maglev_size // 16)
        self.free = deque(range(max_vips + 1))

    def write(self, slot: int, members: list[tuple[str, int, int]], vip: Vip) -> None:
        """Write a ring for `vip` into ring slot `slot`, before any VIP entry points at it.

        members: (endpoint name, weight, backend id). A cell is dirty when its slot
        was dirty or its owner changed: flows there must consult the flow table.
        """
        ids = {name: bid for name, _, bid in members}
        names = sorted(ids)
        table = maglev.build([(n, w) for n, w, _ in members], self.maglev_size)
        owners = [names[i] if i >= 0 else None for i in table]
        if vip.owners is None:
            dirty = bytearray(self.maglev_size)
        else:
            changed = map(operator.ne, vip.owners, owners)
            dirty = bytearray(map(operator.or_, vip.dirty, changed))
        lut = [ids[n] for n in names] + [0]  # index -1 (no backend) -> id 0
        cells = [lut[i] | (d << 31) for i, d in zip(table, dirty, strict=True)]
        self.put(slot, cells)
        vip.owners = owners
        vip.dirty = dirty

    def put(self, slot: int, cells: list[int]) -> None:
        rings = self.table("edge_rings")
        rows = self.rows
        keys = (ctypes.c_uint32 * rows)(*range(slot * rows, (slot + 1) * rows))
        leaves = (rings.Leaf * rows)()
        raw = (ctypes.c_uint32 * (rows * 16)).from_buffer(leaves)
        raw[: len(cells)] = cells
        try:
            rings.items_update_batch(keys, leaves)
        except Exception:  # kernels without batch ops on arrays
            for i in range(rows):
                rings[keys[i]] = leaves[i]

    def read_owners(self, slot: int) -> list[str | None]:
        """Endpoint per slot of a ring another agent wrote (adoption)."""
        rings = self.table("edge_rings")
        backends = self.table("edge_backends")
        rows = self.rows
        keys = (ctypes.c_uint32 * rows)(*range(slot * rows, (slot + 1) * rows))
        names: dict[int, str | None] = {0: None}
        out: list[str | None] = []
        for k in keys:
            for cell in rings[ctypes.c_uint32(k)].b:
                bid = cell & 0x7FFFFFFF
                if bid not in names:
                    be = backends[ctypes.c_uint32(bid)]
                    ep = ep_name(get_addr(be.addr), socket.ntohs(be.port))
                    names[bid] = ep if be.flags & BE_VALID else None
                out.append(names[bid])
        return out[: self.maglev_size]

    def compact(self, vips: dict[VipKey, Vip],
                publish: Callable[[VipKey, int, int], None]) -> int:
        """Clear the dirty bits no recorded flow needs; returns how many slots came clean.

        A dirty slot sends TCP through the flow table. It can go clean once every
        recorded flow on it uses the slot's current backend (or a backend that is
        gone, whose flows pick again anyway). Each VIP cleaned gets a new ring, written
        before publish(key, vip id, ring) flips the VIP to it.
        """
        by_key = {k: v for k, v in vips.items() if v.dirty is not None and any(v.dirty)}
        if not by_key:
            return 0
        need: dict[tuple, set[int]] = {k: set() for k in by_key}
        live = {
            (k, b.id): (b.gen, ep_name(b.addr, b.port))
            for k, v in by_key.items() for b in v.backends.values()
        }
        for fk, cv in self._flows():
            key = (get_addr(fk.dst), socket.ntohs(fk.dport), PROTO_NAMES.get(fk.proto, ""))
            vip = by_key.get(key)
            if vip is None:
                continue
            slot = flow_slot(get_addr(fk.src), socket.ntohs(fk.sport), key[1],
                             self.maglev_size)
            if not vip.dirty[slot]:
                continue
            gen_name = live.get((key, cv.backend))
            if gen_name is None or gen_name[0] != cv.gen:
                continue  # its backend is gone: it picks again whatever the bit says
            if gen_name[1] != vip.owners[slot]:
                need[key].add(slot)
        cleaned = 0
        for key, vip in by_key.items():
            dirty = bytearray(self.maglev_size)
            for slot in need[key]:
                dirty[slot] = 1
            gained = sum(vip.dirty) - len(need[key])
            if gained <= 0:
                continue
            ids = {ep_name(b.addr, b.port): b.id for b in vip.backends.values()}
            cells = [(ids[o] if o is not None else 0) | (d << 31)
                     for o, d in zip(vip.owners, dirty, strict=True)]
            new_ring = self.free.popleft()
            self.put(new_ring, cells)
            publish(key, vip.id, new_ring)
            self.free.append(vip.ring)
            vip.ring = new_ring
            vip.dirty = dirty
            cleaned += gained
        return cleaned

    def _flows(self):
        t = self.table("edge_conns")
        try:
            yield from t.items_lookup_batch()
        except Exception:  # kernels without batch ops
            yield from t.items()
