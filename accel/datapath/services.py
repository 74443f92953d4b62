"""ServiceTable -> accel_services / accel_slots, diffed and make-before-break.

For each changed service: write a fresh run of slots, flip the service entry to it,
then free the old run. A connect() therefore sees either the old or the new endpoint set,
never a half-written one. Unchanged services are not touched, nor even looked at when the
table derives from the last one applied (ServiceTable.derive / delta).

Changed services go in groups, each a few bpf(2) batch calls (accel/datapath/batch.py):
every new run of the group, then the group's flips, then its old runs freed. The order per
service is the same as one at a time; a group that the kernel refuses part-way keeps what
it completed (whole runs, flipped) and hands the rest to the one-at-a-time path, so the maps
and the report end as they would have without batches.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import heapq
import logging
import math
import socket
from dataclasses import dataclass, field

from accel.datapath.batch import BatchMap, Layout, addr16, strerror
from accel.datapath.maps import MapFullError, WriteReport, get_addr16, set_addr16
from accel.kernel.maps import Map
from accel.model import Endpoint, IPAddress, Service, ServiceTable

log = logging.getLogger(__name__)

MAX_SLOTS_PER_SERVICE = 1024
# Slots written per batch group: the most a full apply holds beyond its final size at once.
GROUP_SLOTS = 16384
PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO.items()}

SvcKey = tuple[IPAddress, int, str]
Slot = tuple[IPAddress, int]


def weighted_slots(endpoints: tuple[Endpoint, ...]) -> list[Slot]:
    """Each usable endpoint gets slots in proportion to its weight.

    Exact when the reduced weights sum to at most MAX_SLOTS_PER_SERVICE; otherwise
    largest-remainder rounding with at least one slot per endpoint.
    """
    usable = sorted([ep for ep in endpoints if ep.healthy], key=_endpoint_order)
    if not usable:
        return []
    g = math.gcd(*[ep.weight for ep in usable])
    weights = [ep.weight // g for ep in usable]
    total = sum(weights)
    if total > MAX_SLOTS_PER_SERVICE:
        budget = max(MAX_SLOTS_PER_SERVICE, len(usable))
        exact = [w * budget / total for w in weights]
        counts = [max(1, int(x)) for x in exact]
        order = sorted(range(len(usable)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
        for i in order[: max(0, budget - sum(counts))]:
            counts[i] += 1
        weights = counts
    out: list[Slot] = []
    for ep, n in zip(usable, weights, strict=True):
        out.extend([(ep.address, ep.port)] * n)
    return out


def _endpoint_order(ep: Endpoint) -> tuple[int, int, int, int]:
    # Endpoint's own order (address, port, weight) for one address family, as ints: a full
    # apply sorts 100,000 endpoints, and comparing ipaddress objects is what took the time.
    return ep.address.version, int(ep.address), ep.port, ep.weight


SVC_F_REDIRECT = 1  # accel/bpf/lib/lb.h


def service_flags(svc: Service) -> int:
    return SVC_F_REDIRECT if svc.fastpath == "redirect" else 0


def service_slots(svc: Service) -> tuple[Slot, ...]:
    """weighted_slots of a service, computed once per Service object."""
    return svc.derived("slots", lambda s: tuple(weighted_slots(s.endpoints)))


@dataclass
class Written:
    slots: tuple[Slot, ...]
    slots_id: int
    index: int
    name: str = ""
    svc: Service | None = None  # the object written (None: adopted from a previous agent)
    flags: int = 0  # svc_val.flags

    def same(self, run: tuple[Slot, ...], svc: Service) -> bool:
        return self.slots == run and self.flags == service_flags(svc)


@dataclass
class _Plan:
    """A service of a batch group: its new run, where it goes, and what it replaces."""

    svc: Service
    run: tuple[Slot, ...]
    old: Written | None
    index: int
    slots_id: int


@dataclass
class ServiceWriter:
    services: Map  # accel_services
    slots: Map  # accel_slots
    stats: Map  # accel_svc_stats (per-CPU)
    capacity: int
    current: dict[SvcKey, Written] = field(default_factory=dict)
    batch: bool = True  # False: one bcc call per entry, as before batches (and for comparison)

    def __post_init__(self) -> None:
        self._next_id = 1
        self._slots_b = BatchMap(self.slots, self.batch)
        self._services_b = BatchMap(self.services, self.batch)
        self._stats_b = BatchMap(self.stats, self.batch)
        self._slot_key = Layout(self.slots.Key, "slots_id", "slot")
        self._slot_val = Layout(self.slots.Leaf, "addr", "port")
        self._svc_key = Layout(self.services.Key, "vip", "port", "proto")
        self._svc_val = Layout(self.services.Leaf, "slots_id", "nslots", "index", "flags")
        self._stats_key = Layout(self.stats.Key, "value")
        self.applied: ServiceTable | None = None  # the table current holds, if wholly written
        self._adopt()
        # Free service indexes, lowest first (stats slots); the never-used ones from _high up.
        used = {w.index for w in self.current.values()}
        self._high = max(used, default=-1) + 1
        self._free = [i for i in range(self._high) if i not in used]
        heapq.heapify(self._free)
        self.slots_used = sum(len(w.slots) for w in self.current.values())

    # The previous agent's services (restart with pinned maps) become our starting state.
    def _adopt(self) -> None:
        for k, v in self.services.items():
            key: SvcKey = (get_addr16(k.vip), int(k.port), PROTO_NAME.get(int(k.proto), "TCP"))
            run = []
            for i in range(int(v.nslots)):
                sk = self.slots.Key(v.slots_id, i)
                try:
                    be = self.slots[sk]
                except KeyError:
                    break
                run.append((get_addr16(be.addr), int(be.port)))
            self.current[key] = Written(tuple(run), int(v.slots_id), int(v.index),
                                        flags=int(v.flags))
            self._next_id = max(self._next_id, int(v.slots_id) + 1)
        if self.current:
            log.info("adopted %d services from the pinned maps", len(self.current))

    def _free_index(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._high < self.capacity:
            self._high += 1
            return self._high - 1
        raise MapFullError("accel_services", len(self.current) + 1, len(self.current))

    def _svc_key_struct(self, key: SvcKey):
        k = self.services.Key()
        set_addr16(k.vip, key[0])
        k.port = key[1]
        k.proto = PROTO[key[2]]
        return k

    def _write_run(self, slots_id: int, run: tuple[Slot, ...]) -> None:
        keys, values = [], []
        for i, (addr, port) in enumerate(run):
            keys.append(self.slots.Key(slots_id, i))
            v = self.slots.Leaf()
            set_addr16(v.addr, addr)
            v.port = port
            values.append(v)
        try:
            for k, v in zip(keys, values, strict=True):
                self.slots[k] = v
        except Exception as e:
            self._delete_run(slots_id, len(run))
            if _is_full(e):
                raise MapFullError("accel_slots", len(run), 0) from None
            raise

    def _delete_run(self, slots_id: int, n: int) -> None:
        for i in range(n):
            try:
                del self.slots[self.slots.Key(slots_id, i)]
            except KeyError:
                pass

    def _put(self, svc: Service, run: tuple[Slot, ...]) -> None:
        key = svc.key
        old = self.current.get(key)
        if old and old.same(run, svc):
            old.name, old.svc = svc.name, svc
            return
        index = old.index if old else self._free_index()
        slots_id = self._next_id
        self._next_id += 1
        try:
            if run:
                self._write_run(slots_id, run)
            v = self.services.Leaf()
            v.slots_id, v.nslots, v.index, v.flags = slots_id, len(run), index, service_flags(svc)
            try:
                self.services[self._svc_key_struct(key)] = v  # the flip
            except Exception as e:
                self._delete_run(slots_id, len(run))
                if _is_full(e):
                    raise MapFullError("accel_services", 1, 0) from None
                raise
        except BaseException:
            if not old:
                heapq.heappush(self._free, index)  # not taken after all
            raise
        if old:
            self._delete_run(old.slots_id, len(old.slots))
            self.slots_used -= len(old.slots)
        else:
            self._reset_stats(index)
        self.current[key] = Written(run, slots_id, index, svc.name, svc, service_flags(svc))
        self.slots_used += len(run)

    def _remove(self, key: SvcKey) -> None:
        old = self.current.pop(key)
        try:
            del self.services[self._svc_key_struct(key)]
        except KeyError:
            pass
        self._delete_run(old.slots_id, len(old.slots))
        heapq.heappush(self._free, old.index)
        self.slots_used -= len(old.slots)

    def _reset_stats(self, index: int) -> None:
        try:
            self.stats[ctypes.c_uint32(index)] = self.stats.Leaf()
        except Exception:  # per-CPU leaf shapes vary by bcc version: stats merely restart
            pass

    # ---- the batch path ------------------------------------------------------------------

    def _put_many(self, svcs: list[Service], report: WriteReport) -> None:
        """_put for each service, in groups of batch calls; what a group leaves undone (the
        kernel refused part of it) goes through _put one by one, in order, before the next
        group, so everything happens in the order, and with the outcome, of _put alone."""
        i = 0
        while i < len(svcs):
            plans, i, stopped = self._plan(svcs, i)
            undone = self._write_group(plans, report)
            if stopped is not None:  # no index left for it: _put reports it
                undone.append(stopped)
                i += 1
            for svc in undone:
                self._put_reported(svc, report)

    def _plan(self, svcs: list[Service], i: int) -> tuple[list[_Plan], int, Service | None]:
        """The next group from svcs[i:]: (plans, where the group ends, a service that stopped
        it for want of an index)."""
        plans: list[_Plan] = []
        n = 0
        while i < len(svcs) and n < GROUP_SLOTS:
            svc = svcs[i]
            run = service_slots(svc)
            old = self.current.get(svc.key)
            if old and old.same(run, svc):
                old.name, old.svc = svc.name, svc
            else:
                if old:
                    index = old.index
                elif self._free or self._high < self.capacity:
                    index = self._free_index()
                else:
                    return plans, i, svc
                plans.append(_Plan(svc, run, old, index, self._next_id))
                self._next_id += 1
                n += len(run)
            i += 1
        return plans, i, None

    def _run_keys(self, runs) -> bytes:
        pack = self._slot_key.pack
        return b"".join([pack(sid, j) for sid, run in runs for j in range(len(run))])

    def _run_values(self, run: tuple[Slot, ...]) -> bytes:
        # weighted_slots repeats one (address, port) object per weight: pack it once.
        pack, out, last, value = self._slot_val.pack, [], None, b""
        for slot in run:
            if slot is not last:
                last, value = slot, pack(addr16(slot[0]), slot[1])
            out.append(value)
        return b"".join(out)

    def _write_group(self, plans: list[_Plan], report: WriteReport) -> list[Service]:
        """Write, flip and free one group; returns the services left undone, in order."""
        if not plans:
            return []
        ks = self._slots_b.key_size
        keys = self._run_keys((p.slots_id, p.run) for p in plans)
        values = b"".join([self._run_values(p.run) for p in plans])
        ends, end = [], 0
        for p in plans:
            end += len(p.run)
            ends.append(end)
        written, err = self._slots_b.update(keys, values)
        done = len(plans)
        if err:
            done = bisect.bisect_right(ends, written)  # plans whose whole run went in
            start = ends[done - 1] if done else 0
            self._slots_b.delete_each(keys[start * ks: written * ks])  # the cut run
        # The flips, only now that every run they point at is whole.
        flips = self._svc_key.pack_all((addr16(p.svc.key[0]), p.svc.key[1], PROTO[p.svc.key[2]])
                                       for p in plans[:done])
        svals = self._svc_val.pack_all((p.slots_id, len(p.run), p.index, service_flags(p.svc))
                                       for p in plans[:done])
        flipped, flip_err = self._services_b.update(flips, svals)
        err = err or flip_err
        if flipped < done:  # written, never pointed at: free again
            start = ends[flipped - 1] if flipped else 0
            self._slots_b.delete_each(keys[start * ks: ends[done - 1] * ks])
        live = plans[:flipped]
        # Old runs only once nothing points at them.
        self._slots_b.delete_each(self._run_keys((p.old.slots_id, p.old.slots)
                                                 for p in live if p.old))
        fresh = [p.index for p in live if not p.old]
        report.added += len(fresh)
        if fresh:
            self._stats_b.update(self._stats_key.pack_all((i,) for i in fresh),
                                 bytes(self._stats_b.value_size * len(fresh)))
        for p in live:
            self.current[p.svc.key] = Written(p.run, p.slots_id, p.index, p.svc.name, p.svc,
                                              service_flags(p.svc))
            self.slots_used += len(p.run) - (len(p.old.slots) if p.old else 0)
        for p in plans[flipped:]:
            if not p.old:
                heapq.heappush(self._free, p.index)  # not taken after all
        if flipped < len(plans):
            log.info("batch write stopped after %d of %d services (%s): the rest one by one",
                     flipped, len(plans), strerror(err))
        return [p.svc for p in plans[flipped:]]

    def _put_reported(self, svc: Service, report: WriteReport) -> None:
        try:
            existed = svc.key in self.current
            self._put(svc, service_slots(svc))
            report.added += 0 if existed else 1
        except MapFullError as e:
            report.failed += 1
            report.errors.append(f"service {svc.name}: {e}")

    def _remove_many(self, keys: list[SvcKey]) -> None:
        """_remove for each: every service entry, then the runs they pointed at."""
        olds = [self.current.pop(k) for k in keys]
        self._services_b.delete_each(self._svc_key.pack_all(
            (addr16(k[0]), k[1], PROTO[k[2]]) for k in keys))
        self._slots_b.delete_each(self._run_keys((w.slots_id, w.slots) for w in olds))
        for w in olds:
            heapq.heappush(self._free, w.index)
            self.slots_used -= len(w.slots)

    def slots_after(self, table: ServiceTable) -> int:
        """Slots over all services once `table` is applied (capacity)."""
        if self.applied is None:
            return sum(len(service_slots(s)) for s in table.services)
        d = table.delta(self.applied)
        return self.slots_used + sum(len(service_slots(s)) for s in d.added) - \
            sum(len(service_slots(s)) for s in d.removed)

    def apply(self, table: ServiceTable) -> WriteReport:
        report = WriteReport()
        if self.applied is None:
            # Every service, but one written as this very object is skipped at a glance.
            puts = [s for s in table.services
                    if (w := self.current.get(s.key)) is None or w.svc is not s]
            wanted = {s.key for s in table.services}
            gone = [k for k in self.current if k not in wanted]
        else:
            d = table.delta(self.applied)
            puts = list(d.added)
            kept = {s.key for s in d.added}
            gone = [s.key for s in d.removed if s.key not in kept and s.key in self.current]
        # New and changed first, removals last: make before break across services too.
        if self.batch:
            self._put_many(puts, report)
            self._remove_many(gone)
        else:
            for svc in puts:
                self._put_reported(svc, report)
            for key in gone:
                self._remove(key)
        report.removed += len(gone)
        self.applied = None if report.failed else table
        if report.failed:
            log.error("%d services not written: %s", report.failed, "; ".join(report.errors[:3]))
        return report

    def per_service(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for w in self.current.values():
            try:
                cpus = self.stats[ctypes.c_uint32(w.index)]
            except KeyError:
                continue
            out[w.name or str(w.index)] = {
                "connects": int(sum(c.connects for c in cpus)),
                "no_backend": int(sum(c.no_backend for c in cpus)),
            }
        return out


def _is_full(e: Exception) -> bool:
    """The kernel's "no room" answers to a map update: E2BIG (a full hash or array), ENOSPC
    (a full LPM trie), ENOMEM (no memory for an unpreallocated entry)."""
    return isinstance(e, OSError) and e.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)
