"""VIP placement in edge_vips: an open-addressed array the XDP program probes from a VIP's
hash (vip_hash) for at most VIP_PROBES slots, stopping at a never-used one. Python keeps the
same picture (`keys`, `live`) to place new VIPs where the program will find them."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from accel.datapath.edge.encoding import PROTO_NAMES, PROTO_NUMBERS, get_addr, put_addr, vip_hash
from accel.model import IPAddress

VIP_EMPTY, VIP_LIVE, VIP_GONE = 0, 1, 2
VIP_PROBES = 4

VipKey = tuple[IPAddress, int, str]


@dataclass
class Vip:
    """What the edge serves for one VIP: its stats id, live ring and backends."""

    key: VipKey
    name: str
    id: int
    ring: int
    backends: dict = field(default_factory=dict)  # (address, port) -> backends.Backend
    ring_sig: tuple = ()
    owners: list[str | None] | None = None  # endpoint per ring slot, as last written
    dirty: bytearray | None = None  # slots that changed owner (see EDGE_CELL_DIRTY)
    # connections/s and burst in edge_limits[id]; None: not written yet (a reused or adopted
    # id may hold another VIP's)
    limit: tuple[float, int] | None = None


class VipSlots:
    """edge_vips, slot by slot; `table(name)` gives the edge program's maps."""

    def __init__(self, table: Callable[[str], Any], max_vips: int):
        self.table = table
        self.size = max(64, 1 << (8 * max_vips - 1).bit_length())
        self.keys: list = [None] * self.size  # key per edge_vips slot, None = empty
        self.live: list[bool] = [False] * self.size

    def find(self, key: VipKey, insert: bool) -> int:
        """The edge_vips slot holding `key`, or (insert) the one it would go to; -1 if none."""
        home = vip_hash(key, self.size)
        free = -1
        for i in range(VIP_PROBES):
            idx = (home + i) & (self.size - 1)
            if self.live[idx]:
                if self.keys[idx] == key:
                    return idx
            elif free < 0:
                free = idx
            if self.keys[idx] is None:
                break  # lookups stop at a never-used slot: so does the search
        return free if insert else -1

    def unplaceable(self, current: Collection[VipKey], wanted: Collection[VipKey]) -> VipKey | None:
        """Simulated on a copy: the first new VIP of `wanted` with no slot within VIP_PROBES
        of its hash once the VIPs of `current` not wanted are gone; None if all fit."""
        keys, live = list(self.keys), list(self.live)
        for key in current:
            if key not in wanted:
                live[self.find(key, insert=False)] = False
        for key in wanted:
            if key in current:
                continue
            home = vip_hash(key, self.size)
            for i in range(VIP_PROBES):
                idx = (home + i) & (self.size - 1)
                if not live[idx]:
                    keys[idx], live[idx] = key, True
                    break
            else:
                return key
        return None

    def write(self, idx: int, key: VipKey, vid: int, ring: int, state: int) -> None:
        t = self.table("edge_vips")
        v = t.Leaf()
        put_addr(v.key.addr, key[0])
        v.key.port = socket.htons(key[1])
        v.key.proto = PROTO_NUMBERS[key[2]]
        v.id = vid
        v.ring = ring
        if state == VIP_LIVE and not self.live[idx]:
            # A new slot: the data lands (not yet live) before the state says live, so
            # a lookup that sees it live sees its ring too.
            v.state = VIP_GONE
            t[ctypes.c_uint32(idx)] = v
        v.state = state
        t[ctypes.c_uint32(idx)] = v
        self.keys[idx] = key
        self.live[idx] = state == VIP_LIVE

    def publish(self, key: VipKey, vid: int, ring: int) -> None:
        """Point the VIP at `ring` (placing it first if new): the make-before-break flip."""
        self.write(self.find(key, insert=True), key, vid, ring, VIP_LIVE)

    def delete(self, key: VipKey) -> None:
        idx = self.find(key, insert=False)
        if idx >= 0:
            t = self.table("edge_vips")
            v = t[ctypes.c_uint32(idx)]
            v.state = VIP_GONE
            t[ctypes.c_uint32(idx)] = v
            self.live[idx] = False

    def adopt(self) -> dict[VipKey, tuple[int, int]]:
        """Take over the slots a previous agent filled; returns its live VIPs: (id, ring)."""
        legacy = {}
        for k, v in self.table("edge_vips").items():
            if v.state == VIP_EMPTY:
                continue
            key = _key_from(v.key)
            self.keys[k.value] = key
            if v.state == VIP_LIVE:
                self.live[k.value] = True
                legacy[key] = (v.id, v.ring)
        return legacy


def _key_from(k) -> VipKey:
    return (get_addr(k.addr), socket.ntohs(k.port), PROTO_NAMES.get(k.proto, "?"))
