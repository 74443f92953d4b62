"""The XDP edge balancer: runs accel/bpf/edge_xdp.c and edge_tc.c and keeps their maps.

How a backend is reached. The programs never look up routes: for each endpoint
this class asks the kernel (pyroute2: `route get`, then the neighbour table)
for the interface and next-hop MAC, and writes them into the backend's map
entry with a devmap slot for that interface. XDP then rewrites the MACs and
redirects the frame straight to that interface. An endpoint whose neighbour is
not known yet (after a probe and a short wait), or that is local to this host,
is still balanced but in route mode: XDP rewrites the address and passes the
packet to the kernel, which routes it and resolves the neighbour itself;
`refresh()` (the agent calls it periodically) moves it to redirect mode once
the neighbour is known, and follows MAC changes. A redirect target must take frames
from a native XDP program, as the kernel states in its xdp-features: a veth does only
while its peer runs a native XDP program or GRO, which container runtimes leave off. A
backend behind such a veth is routed instead (`edge_fwd_fallback` counts its packets);
the pod's interface is never changed. `status()` says per backend which path and why.

Changes are make-before-break: new backends are written first, then the new
ring into a spare ring slot, then the VIP entry flips to it, and only then are
removed backends invalidated. Endpoints marked unhealthy leave the ring but
their established flows stay (draining); removed endpoints lose their flows,
which pick again from the ring.

The fast path. Every new flow (SYN, UDP, or a flow the table does not know) is
recorded in edge_conns, but a TCP segment on a ring slot whose owner never
changed takes the ring's answer without that lookup: no flow there ever went
elsewhere. Slots that changed owner are marked dirty and consult the table;
`compact()` (call it periodically, with `refresh()`) clears the bits no
recorded flow needs any more.

Limits: replies are given the VIP back on the edge interface's egress, so they
must leave through it (the route back to the client), and so must ICMP errors
about a balanced flow, which edge_tc translates the same way (the quoted packet,
and the source when the backend sent it): path-MTU discovery works through the
edge. A redirected packet is forwarded as routing would (TTL / hop limit one
less); one that expires here, or is bigger than the backend interface's MTU, is
handed to the kernel after the rewrite, so the kernel answers it. IP fragments,
IPv6 extension headers and NAT46 are left to the kernel. Call every method from
one thread (the agent's lock).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from collections import deque
from pathlib import Path

from accel import maglev
from accel.datapath.edge import programs
from accel.datapath.edge.attach import (
    TC_EGRESS,
    TC_HANDLE,
    TC_PRIO,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    Attachment,
    detach_from,
)
from accel.datapath.edge.backends import BE_FALLBACK, BE_PEER, BE_REDIRECT, BE_VALID, Backends
from accel.datapath.edge.counters import VIP_STAT_FIELDS, counter_names, read_counters
from accel.datapath.edge.encoding import PROTO_NAMES, PROTO_NUMBERS, ep_name, flow_slot, vip_hash
from accel.datapath.edge.errors import EdgeCapacityError, EdgeError
from accel.datapath.edge.guard import EdgeGuard, deny_prefilter
from accel.datapath.edge.neighbours import NeighbourResolver, NextHop, Resolver, Routed
from accel.datapath.edge.programs import BPF_DIR, EDGE_H, PIN_MAPS
from accel.datapath.edge.rings import Rings
from accel.datapath.edge.vips import VIP_EMPTY, VIP_GONE, VIP_LIVE, VIP_PROBES, Vip, VipSlots
from accel.datapath.qos import KernelLimit
from accel.kernel.attach import Program
from accel.kernel.maps import Map
from accel.model import Guard, IPAddress, Service, ServiceTable

__all__ = [
    "BE_FALLBACK", "BE_PEER", "BE_REDIRECT", "BE_VALID", "BPF_DIR", "EDGE_H", "PIN_MAPS",
    "PROTO_NAMES", "PROTO_NUMBERS", "TC_EGRESS", "TC_HANDLE", "TC_PRIO", "VIP_EMPTY", "VIP_GONE",
    "VIP_LIVE",
    "VIP_PROBES", "VIP_STAT_FIELDS", "XDP_FLAGS_DRV_MODE", "XDP_FLAGS_SKB_MODE",
    "EdgeCapacityError", "EdgeDatapath", "EdgeError", "NeighbourResolver", "NextHop",
    "Resolver", "Routed", "counter_names", "deny_prefilter", "detach_from", "flow_slot",
    "open_pinned", "read_counters", "vip_hash",
]

log = logging.getLogger(__name__)


class EdgeDatapath:
    """The edge balancer on one interface: `load`, `attach`, `apply`, `set_guard`, `counters`.

    `iface` may be None to load the programs without attaching them (benchmarks,
    BPF_PROG_TEST_RUN tests). All maps are pinned under `pin_dir`.

    The parts, each in a module of its own: VIP placement (vips), backends and the devmap
    (backends), Maglev rings and their dirty bits (rings), the guard (guard), next hops
    (neighbours), attaching (attach), compiling and pins (programs), counters (counters).
    This class holds what ties them: the VIPs served, applying a table, adoption.
    """

    def __init__(
        self,
        iface: str | None,
        pin_dir: str | os.PathLike,
        maglev_size: int = maglev.DEFAULT_SIZE,
        *,
        max_vips: int = 64,
        max_backends: int = 4096,
        conn_max: int = 262144,
        tx_max: int = 256,
        resolver: Resolver | None = None,
    ):
        maglev.check_size(maglev_size)
        if not 1 <= max_vips <= 4096:
            raise EdgeError(f"max_vips {max_vips} is out of range 1-4096")
        self.iface = iface
        self.pin_dir = Path(pin_dir)
        self.maglev_size = maglev_size
        self.max_vips = max_vips
        self.max_backends = max_backends
        self.conn_max = conn_max
        self.tx_max = tx_max
        self.resolver: Resolver = resolver or NeighbourResolver()
        self._progs: dict[str, Program] = {}
        self._maps: dict[str, Map] = {}
        self._loaded = False
        self._made_pin_dir = False
        self._attachment = Attachment(iface)
        self._vips: dict[tuple[IPAddress, int, str], Vip] = {}
        self._guard = EdgeGuard(self.table)
        self._slots = VipSlots(self.table, max_vips)
        self.vip_slots = self._slots.size
        self._free_vip_ids = deque(range(max_vips))
        self._rings = Rings(self.table, maglev_size, max_vips)
        self._backends = Backends(self.table, max_backends, tx_max)
        self._legacy: dict | None = None
        self._readonly = False

    @property
    def mode(self) -> str | None:
        """"native" | "generic" (XDP) | "tc" once attached."""
        return self._attachment.mode

    # ---- loading -------------------------------------------------------------------------

    @property
    def ring_rows(self) -> int:
        return self._rings.rows

    def defines(self) -> dict[str, int | str]:
        return {
            "EDGE_RING_SIZE": self.maglev_size,
            "EDGE_MAX_VIPS": self.max_vips,
            "EDGE_VIP_SLOTS": self.vip_slots,
            "EDGE_MAX_BACKENDS": self.max_backends,
            "EDGE_CONN_MAX": self.conn_max,
            "EDGE_TX_MAX": self.tx_max,
        }

    def _expected_sizes(self) -> dict[str, int]:
        return {
            "edge_vips": self.vip_slots,
            "edge_rings": (self.max_vips + 1) * self.ring_rows,
            "edge_backends": self.max_backends,
            "edge_conns": self.conn_max,
            "edge_revs": self.conn_max,
            "edge_vip_stats": self.max_vips,
            "edge_counters": len(counter_names()),
            "edge_tx": self.tx_max,
        }

    def load(self, readonly: bool = False) -> None:
        """Both programs loaded (the loader compiles them, or reuses their pins); maps are
        created or adopted from the pins.

        `readonly` (a stats reader): only the pinned maps are opened; nothing is compiled,
        adopted or written.
        """
        if self._loaded:
            return
        self._readonly = readonly
        if not readonly:
            if not self.pin_dir.exists():
                self.pin_dir.mkdir(parents=True)
                self._made_pin_dir = True
            programs.drop_stale_pins(self.pin_dir, self._expected_sizes())
            try:
                loaded = self._load_programs()
            except EdgeError:
                if self._made_pin_dir:  # a failed first load leaves nothing behind
                    programs.unpin(self.pin_dir)
                    shutil.rmtree(self.pin_dir, ignore_errors=True)
                    self._made_pin_dir = False
                raise
            self._progs = {fn: Program(path) for fn, path in loaded.programs.items()}
        self._loaded = True
        if not readonly:
            self._adopt()

    def _load_programs(self):
        try:
            return programs.load(self.pin_dir, self.defines())
        except EdgeError as e:
            # bcc opens a pinned map whatever its layout: maps an older build pinned
            # (--keep, then an upgrade) fail the verifier. Start them afresh, once.
            if self._made_pin_dir or not any((self.pin_dir / m).exists() for m in PIN_MAPS):
                raise
            log.warning("edge: programs do not load over the pinned maps (%s): an older "
                        "build's? recreating them; the connection table starts empty", e)
            programs.unpin(self.pin_dir)
            return programs.load(self.pin_dir, self.defines())

    @property
    def xdp_fd(self) -> int:
        self.load()
        return self._progs["edge_xdp"].fd

    @property
    def tc_fd(self) -> int:
        self.load()
        return self._progs["edge_tc"].fd

    def prog_fd(self, function: str) -> int:
        """fd of one of the edge's programs, by function name."""
        self.load()
        return self._progs[function].fd

    def table(self, name: str) -> Map:
        """One of the edge's pinned maps, opened once."""
        self.load(self._readonly)
        if name not in self._maps:
            self._maps[name] = Map.open(self.pin_dir / name)
        return self._maps[name]

    def _adopt(self) -> None:
        """A restarted agent finds the previous one's VIPs still serving traffic.

        Their ring slots, stats ids and backend ids stay reserved until the first
        apply() has replaced them VIP by VIP, so nothing serving is overwritten.
        The guard stays as it was until set_guard().
        """
        self._guard.adopt()
        legacy_vips = self._slots.adopt()
        legacy_backends = self._backends.legacy_ids()
        if not legacy_vips and not legacy_backends:
            return
        self._legacy = {"vips": legacy_vips, "backends": legacy_backends}
        used_ids = {i for i, _ in legacy_vips.values()}
        used_rings = {r for _, r in legacy_vips.values()}
        self._free_vip_ids = deque(i for i in self._free_vip_ids if i not in used_ids)
        self._rings.free = deque(r for r in self._rings.free if r not in used_rings)
        self._backends.reserve(legacy_backends)
        log.info("edge: adopted %d VIPs from the pins", len(legacy_vips))

    # ---- attaching -----------------------------------------------------------------------

    def attach(self, mode: str = "auto") -> str:
        """The balancer on the edge interface: XDP (native, else generic) with its tc
        follow-up on ingress, or at tc ingress ("tc": what `auto` picks for a veth); the
        reply program on its egress.

        Returns the hook in use: "native", "generic" or "tc".
        """
        if not self.iface:
            raise EdgeError("no edge interface given")
        if mode not in ("auto", "native", "generic", "tc"):
            raise EdgeError(f"edge mode {mode!r} is not one of auto, native, generic, tc")
        self.load()
        fds = {name: self.prog_fd(name) for name in ("edge_tc", "edge_ingress",
                                                     "edge_tc_balance")}
        got = self._attachment.attach(self.xdp_fd, fds, mode)
        self.table("edge_uplink")[ctypes.c_uint32(0)] = ctypes.c_uint32(
            self._attachment.ifindex or 0)
        if isinstance(self.resolver, NeighbourResolver):
            # How a backend is reached depends on the hook (NeighbourResolver). The next
            # refresh() re-judges backends resolved before.
            self.resolver.hook = got
        self._sync_replies()
        return got

    def detach(self) -> None:
        """Remove the XDP program and our tc filters (and clsact qdiscs we made)."""
        if self._loaded and not self._readonly and self._attachment.mode is not None:
            self.table("edge_uplink")[ctypes.c_uint32(0)] = ctypes.c_uint32(0)
        self._attachment.detach()

    def _sync_replies(self) -> None:
        """edge_reply on every interface the edge enters directly (see edge_tc.c)."""
        if self._attachment.mode is None:
            return  # not attached (tests, benchmarks): nothing runs on interfaces
        wanted = {b.hop.ifindex for v in self._vips.values() for b in v.backends.values()
                  if b.hop is not None}
        self._attachment.sync_replies(wanted, self.prog_fd("edge_reply"))

    def close(self, unpin: bool = True) -> None:
        """Detach and, unless told otherwise, remove every pin this datapath made."""
        self.detach()
        for obj in (*self._maps.values(), *self._progs.values()):
            obj.close()
        self._maps.clear()
        self._progs.clear()
        self._loaded = False
        if unpin and not self._readonly:
            programs.unpin(self.pin_dir)
            try:
                self.pin_dir.rmdir()  # only when nothing else is pinned there
            except OSError:
                pass

    def __enter__(self) -> EdgeDatapath:
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- service table -------------------------------------------------------------------

    @staticmethod
    def edge_services(table: ServiceTable) -> dict[tuple[IPAddress, int, str], Service]:
        return {s.key: s for s in table.services if s.edge}

    def _endpoints(self, svc: Service) -> list:
        """Endpoints XDP can serve: same family as the VIP (no NAT46 in the datapath)."""
        out = []
        for ep in svc.endpoints:
            if ep.address.version != svc.vip.version:
                log.warning(
                    "edge: %s: endpoint %s skipped (IPv%d VIP, IPv%d endpoint)",
                    svc.name, ep, svc.vip.version, ep.address.version,
                )
                continue
            out.append(ep)
        return out

    def check_capacity(self, table: ServiceTable) -> None:
        """Raise EdgeCapacityError when `table` cannot fit; changes nothing."""
        wanted = self.edge_services(table)
        if len(wanted) > self.max_vips:
            raise EdgeCapacityError(
                f"{len(wanted)} edge services, the edge holds {self.max_vips} (raise max_vips)"
            )
        # Every new VIP needs a slot within VIP_PROBES of its hash.
        key = self._slots.unplaceable(self._vips, wanted)
        if key is not None:
            raise EdgeCapacityError(
                f"no edge_vips slot for {key[0]}:{key[1]}/{key[2]} (raise max_vips)"
            )
        # New backends are written before the ones they replace are retired.
        new = 0
        for key, svc in wanted.items():
            cur = self._vips.get(key)
            new += sum(
                1 for ep in self._endpoints(svc)
                if cur is None or (ep.address, ep.port) not in cur.backends
            )
        freed = sum(len(v.backends) for k, v in self._vips.items() if k not in wanted)
        free = len(self._backends.free)
        if new > free + freed:
            raise EdgeCapacityError(
                f"{new} new edge endpoints, {free + freed} backend slots "
                f"free of {self.max_backends - 1} (raise max_backends)"
            )

    def apply(self, table: ServiceTable) -> dict[str, list[str]]:
        """Make the edge serve exactly the `edge: true` services of `table`.

        Only VIPs whose backends or weights changed are rewritten. Returns the
        service names by outcome: added, changed, removed, unchanged.
        """
        self.load()
        self.check_capacity(table)
        wanted = self.edge_services(table)
        result: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "unchanged": []}

        need_hop = set()
        for key, svc in wanted.items():
            cur = self._vips.get(key)
            for ep in self._endpoints(svc):
                if cur is None or (ep.address, ep.port) not in cur.backends:
                    need_hop.add(ep.address)
        hops = self.resolver(sorted(need_hop, key=lambda a: (a.version, a))) if need_hop else {}

        for key in [k for k in self._vips if k not in wanted]:
            result["removed"].append(self._vips[key].name)
            self._remove_vip(key)
        legacy_vips = self._legacy["vips"] if self._legacy else {}
        for key in [k for k in legacy_vips if k not in wanted]:
            self._slots.delete(key)
            vid, ring = legacy_vips.pop(key)
            self._rings.free.append(ring)
            self._free_vip_ids.append(vid)
        for key, svc in sorted(wanted.items(), key=lambda kv: kv[1].name):
            outcome = self._apply_vip(key, svc, hops, legacy_vips.get(key))
            result[outcome].append(svc.name)
        if self._legacy:
            self._release_legacy()
        self._sync_replies()
        return result

    def _apply_vip(self, key, svc: Service, hops, legacy: tuple[int, int] | None) -> str:
        cur = self._vips.get(key)
        outcome = "changed"
        if cur is None:
            outcome = "added"
            vid = legacy[0] if legacy else self._free_vip_ids.popleft()
            cur = Vip(key=key, name=svc.name, id=vid, ring=legacy[1] if legacy else -1)
            if not legacy:
                self._zero_stats(vid)
            self._vips[key] = cur
        cur.name = svc.name
        self._set_limit(cur, svc)
        eps = self._endpoints(svc)
        want = {(ep.address, ep.port): ep for ep in eps}

        # 1. Backends first: a ring never names an id that is not written yet.
        for bkey, ep in want.items():
            if bkey not in cur.backends:
                cur.backends[bkey] = self._backends.new(ep.address, ep.port,
                                                        hops.get(ep.address))
        members = sorted(
            (ep_name(ep.address, ep.port), ep.weight, cur.backends[(ep.address, ep.port)].id)
            for ep in eps
            if ep.healthy
        )
        sig = tuple(members)
        gone = [b for bkey, b in cur.backends.items() if bkey not in want]
        if sig == cur.ring_sig and not gone and outcome == "changed":
            return "unchanged"

        # 2. New ring into a spare slot, 3. flip the VIP to it, 4. retire the old.
        if sig != cur.ring_sig or cur.ring < 0 or legacy:
            new_ring = self._rings.free.popleft()
            if legacy and cur.owners is None:
                cur.owners = self._rings.read_owners(legacy[1])
                cur.dirty = bytearray(self.maglev_size)  # unknown history: the owners decide
            self._rings.write(new_ring, members, cur)
            self._slots.publish(key, cur.id, new_ring)
            old, cur.ring = cur.ring, new_ring
            if old >= 0:
                self._rings.free.append(old)
            cur.ring_sig = sig
        for b in gone:
            del cur.backends[(b.addr, b.port)]
            self._backends.drop(b)
        return outcome

    def _set_limit(self, cur: Vip, svc: Service) -> None:
        """The service's connection limit for SYNs from outside (edge_limits): written only
        when it changes, as a write refills the bucket."""
        want = (svc.limits.connections, svc.limits.burst) if svc.limits.connections else (0.0, 0)
        if want == cur.limit:
            return
        t = self.table("edge_limits")
        v = t.Leaf()
        kl = KernelLimit.of(svc.limits)  # the same bucket as connect()'s (lib/gcra.h)
        v.interval_ns, v.tolerance_ns = kl.conn_interval_ns, kl.conn_tolerance_ns
        t[ctypes.c_uint32(cur.id)] = v
        cur.limit = want

    def _remove_vip(self, key) -> None:
        cur = self._vips.pop(key)
        if cur.limit and cur.limit[0]:
            self.table("edge_limits")[ctypes.c_uint32(cur.id)] = self.table("edge_limits").Leaf()
        self._slots.delete(key)
        for b in cur.backends.values():
            self._backends.drop(b)
        if cur.ring >= 0:
            self._rings.free.append(cur.ring)
        self._free_vip_ids.append(cur.id)

    def _release_legacy(self) -> None:
        """After the first apply: the previous agent's leftovers are no longer referenced."""
        legacy = self._legacy
        self._legacy = None
        self._backends.release(legacy["backends"])

    def _zero_stats(self, vid: int) -> None:
        t = self.table("edge_vip_stats")
        t[ctypes.c_uint32(vid)] = t.Leaf()  # bcc fills every CPU with the one value

    def compact(self) -> int:
        """Clear the dirty bits no recorded flow needs; returns how many slots came clean.

        A dirty slot sends TCP through the flow table. It can go clean once every
        recorded flow on it uses the slot's current backend (or a backend that is
        gone, whose flows pick again anyway). Call it now and then from the thread
        that calls apply(): each changed VIP gets a new ring, written before it flips.
        """
        self.load()
        return self._rings.compact(self._vips, self._slots.publish)

    def refresh(self) -> int:
        """Re-resolve every backend's next hop; returns how many changed.

        Moves route-mode backends to redirect once their neighbour is known and
        follows MAC or interface changes. Established flows keep their backend.
        """
        self.load()
        backends = [b for v in self._vips.values() for b in v.backends.values()]
        if not backends:
            return 0
        hops = self.resolver(sorted({b.addr for b in backends}, key=lambda a: (a.version, a)))
        changed = 0
        for b in backends:
            hop = hops.get(b.addr)
            if hop != (b.hop or b.routed):
                self._backends.set_hop(b, hop)
                changed += 1
        self._sync_replies()
        return changed

    # ---- guard ---------------------------------------------------------------------------

    def set_guard(self, guard: Guard) -> None:
        """Deny list and SYN budget. New denies go in before the old ones go out."""
        self.load()
        self._guard.set(guard)

    # ---- counters ------------------------------------------------------------------------

    def counters(self) -> dict:
        """{"global": {counter: n}, "vips": [{service, vip, port, protocol, packets, ...}]}."""
        self.load()
        return read_counters(self.table, {k: v.name for k, v in self._vips.items()})

    def status(self) -> dict:
        """What the edge serves and how each backend is reached (for `accel status`)."""
        guard = self._guard.guard
        return {
            "iface": self.iface,
            "mode": self.mode,
            "maglev_size": self.maglev_size,
            "guard": {"deny": sorted(str(n) for n in self._guard.deny),
                      "syn_rate": guard.syn_rate, "syn_burst": guard.syn_burst},
            "vips": [
                {
                    "service": v.name, "vip": str(v.key[0]), "port": v.key[1],
                    "protocol": v.key[2],
                    "dirty_slots": sum(v.dirty) if v.dirty else 0,
                    "connection_limit": ({"connections": v.limit[0], "burst": v.limit[1]}
                                         if v.limit and v.limit[0] else None),
                    "backends": [
                        {"address": str(b.addr), "port": b.port, "via": b.via}
                        for b in v.backends.values()
                    ],
                }
                for v in sorted(self._vips.values(), key=lambda v: v.name)
            ],
        }

    def vip_ids(self) -> dict[str, int]:
        return {v.name: v.id for v in self._vips.values()}


def open_pinned(pin_dir: str | os.PathLike) -> EdgeDatapath | None:
    """The edge maps an agent pinned under pin_dir, loaded for reading (no attach).

    None when no edge was ever set up there: nothing is created.
    """
    pin_dir = Path(pin_dir)
    sizes = programs.pinned_sizes(pin_dir)
    if sizes is None:
        return None
    dp = EdgeDatapath(None, pin_dir, sizes.pop("maglev_size"), **sizes)
    dp.load(readonly=True)
    return dp
