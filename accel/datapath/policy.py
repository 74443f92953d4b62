"""L4 authorization in the kernel: a Verdicts (accel/policy/verdicts.py) written into the
maps of accel/bpf/lib/policy.h, enforced at connect() (connect.c), on a SYN into a policed
local pod (policy_tc.c, answered with a reset) and, after every update, on established
connections (policy_iter.c, a socket iterator that resets those now denied).

Fail closed, with no mixed state: every map holds two versions of the table ("slots", the
slot in each key). apply() writes the slot not in use -- diffed against what that slot held,
the table before last -- then flips accel_policy_config.live in one write, so each
connection is decided by the whole old table or the whole new one: identities renumbered by
the compiler, a rule removed before its destination's default changed, an address moving
between workloads can never combine into an allow that neither table gives. Only then are
established connections walked. A table that does not fit is refused before anything is
written (the live slot, the last good table, stays).

Counters are per policy name (allowed, denied, dry-run denied, closed by update), in a
per-CPU array whose index the writer gives each name and keeps while the name exists; index
0 counts decisions no policy made (a destination's default).

Where each connection is decided:
- a client in the agent's cgroup, at connect(), with its namespace's identity (the agent
  learns each local pod namespace's cookie with SO_NETNS_COOKIE from a socket made inside
  it: accel/kernel/netns.py); denied: EPERM at once. A bound socket of an unknown namespace
  is decided by its address; an unbound one at its SYN when the destination pod is guarded
  (counted: policy_connect_deferred), else as from an unknown source (fail closed);
- any client (another host, a namespace outside the cgroup), at its SYN on the policed
  pod's own interface: denied, a reset back. Only SYNs are looked at: a later packet of a
  connection never admitted finds no socket in the pod, whose TCP resets it anyway;
- established connections, after each apply(): a socket walk per known namespace (about
  2 ms each here: the walk covers the kernel's TCP hash, shared by all namespaces).
A source's identity is its address (the controller's, never the packet's claim alone): as
strong as the pod network's anti-spoofing, so keep pod routing's source check on.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from accel.config import CapacityError
from accel.datapath.batch import BatchMap, Layout, strerror
from accel.kernel import addr as addr16
from accel.kernel import attach, loader, netns, sockiter
from accel.kernel.maps import Map
from accel.policy.verdicts import Decision, Verdicts

if TYPE_CHECKING:
    from accel.datapath.datapath import Capacities, Datapath
    from accel.datapath.podroute import PodRouter, Unavailable

log = logging.getLogger(__name__)

TC_PROGRAM = loader.Program("policy_tc.c", "accel_policy_tc", "sched_cls")
ITER_PROGRAM = loader.Program("policy_iter.c", "accel_policy_iter", "iter_tcp")
TC_PRIO = 0xAC1E  # our filter on the pod side's ingress (pod routing's is 0xAC1D)
TC_HANDLE = 0xAC1E
ADDR_LOCAL = 1  # POLICY_ADDR_LOCAL
ADDR_GUARDED = 2  # POLICY_ADDR_GUARDED
SLOTS = 2


def policy_unit(defines: Mapping[str, int | str]) -> loader.Unit:
    return loader.Unit("policy", (TC_PROGRAM, ITER_PROGRAM), dict(defines))


@dataclass(frozen=True)
class PolicyCounters:
    allowed: int = 0
    denied: int = 0
    dry_run_denied: int = 0
    closed_by_update: int = 0


@dataclass(frozen=True)
class MapUsage:
    used: int  # entries of the live table
    capacity: int  # per table


@dataclass(frozen=True)
class PolicyStatus:
    policies: dict[str, PolicyCounters]  # "namespace/name" -> its counters
    default: PolicyCounters  # decisions no policy made (a destination's default)
    maps: dict[str, MapUsage]
    guarded: list[str]  # pod interfaces answering denied SYNs ("netns:ifindex")
    unguarded: dict[str, str]  # policed pod interfaces that could not be guarded -> why
    namespaces: int  # local pod namespaces with an identity (decided at connect())


@dataclass(frozen=True)
class Applied:
    """What one apply() did and how long it took."""

    written: dict[str, tuple[int, int]]  # map -> (entries written, entries removed)
    enforced_s: float  # apply() called -> new connections decided by the new table
    cut_s: float  # apply() called -> established connections it denies reset
    walked: int  # network namespaces whose sockets were walked


@dataclass(frozen=True)
class PodSide:
    """A local pod's own end of its veth: where denied SYNs are answered."""

    netns: str  # path of the pod's namespace
    ifindex: int  # its interface, in that namespace


class _Table:
    """One policy map with its two slots, each diffed against what it holds."""

    def __init__(self, m: Map, capacity: int, key: tuple[str, ...], value: tuple[str, ...],
                 batch: bool):
        self.map = m
        self.capacity = capacity
        self.key = Layout(m.Key, *key)
        self.value = Layout(m.Leaf, *value)
        self._batch = BatchMap(m, batch)
        self.held: list[dict[bytes, bytes]] = [{} for _ in range(SLOTS)]
        for k, v in m.items_lookup_batch():
            slot = int(k.slot)
            if 0 <= slot < SLOTS:
                self.held[slot][bytes(k)] = bytes(v)

    def write(self, slot: int, wanted: dict[bytes, bytes]) -> tuple[int, int]:
        """Make `slot` hold exactly `wanted`; (written, removed). Raises on a refusal (the
        slot is then partly written: it is not live, and the next write diffs again)."""
        held = self.held[slot]
        changed = [(k, v) for k, v in wanted.items() if held.get(k) != v]
        gone = [k for k in held if k not in wanted]
        return self.put(slot, changed, gone)

    def put(self, slot: int, changed: list[tuple[bytes, bytes]],
            gone: Iterable[bytes]) -> tuple[int, int]:
        """Write `changed` and delete `gone` in `slot`; (written, removed)."""
        held = self.held[slot]
        gone = [k for k in gone if k in held]
        if changed:
            keys = b"".join(k for k, _ in changed)
            done, err = self._batch.update(keys, b"".join(v for _, v in changed))
            for k, v in changed[:done]:
                held[k] = v
            if err:
                raise OSError(err, f"{self.map.name}: {strerror(err)} after {done} of "
                              f"{len(changed)} entries")
        if gone:
            self._batch.delete_each(b"".join(gone))
            for k in gone:
                del held[k]
        return len(changed), len(gone)


def _decision(v: Layout, d: Decision, counter: int) -> bytes:  # small tables only
    return v.pack(int(d.verdict), counter)


def _cidr_prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return 32 + (96 + net.prefixlen if net.version == 4 else net.prefixlen)


class PolicyMaps:
    """The policy maps of one pin directory (the socket programs created them: connect.c
    includes lib/policy.h), the reset-answering tc program and the socket walk."""

    def __init__(self, pin_dir: str, capacities: Capacities, defines: Mapping[str, int | str],
                 batch: bool = True):
        self.pin_dir = pin_dir
        self.capacities = capacities
        loaded = loader.ensure(policy_unit(defines), pin_dir)
        self.tc_prog = attach.Program(loaded.programs[TC_PROGRAM.function])
        self.iter_prog = attach.Program(loaded.programs[ITER_PROGRAM.function])
        self._link = sockiter.IterLink(self.iter_prog.fd)

        def open_(name: str) -> Map:
            return Map.open(os.path.join(pin_dir, name))

        caps = capacities
        self.tables = {
            "addrs": _Table(open_("accel_policy_addrs"), caps.policy_addrs, ("addr", "slot"),
                            ("ident", "flags"), batch),
            "cidrs": _Table(open_("accel_policy_cidrs"), caps.policy_cidrs,
                            ("prefixlen", "slot", "addr"), ("value",), batch),
            "dsts": _Table(open_("accel_policy_dsts"), caps.policy_dsts, ("ident", "slot"),
                           ("verdict", "policy"), batch),
            "rules": _Table(open_("accel_policy_rules"), caps.policy_rules,
                            ("src", "dst", "port", "slot"), ("verdict", "policy"), batch),
            "netns": _Table(open_("accel_policy_netns"), caps.policy_netns, ("cookie", "slot"),
                            ("value",), batch),
        }
        self.stats = open_("accel_policy_stats")
        self.config = open_("accel_policy_config")
        self.max_policies = self.stats.max_entries - 1
        # Counter index per policy name. Indices found in the live table (an agent
        # restarted over kept maps) are not known by name: they are reallocated, and their
        # counts zeroed, as names come.
        self.counter_of: dict[str, int] = {}
        self._cookies: dict[tuple[str, int, int], int] = {}  # (path, dev, ino) -> cookie
        self.guarded: dict[PodSide, None] = {}
        self.unguarded: dict[str, str] = {}  # the last guard()'s failures
        self.namespaces: dict[str, int] = {}  # netns path -> identity, as last applied
        self.verdicts: Verdicts | None = None
        # Per slot: the rules it was written from, with the counter index of each policy.
        self._rules_src: list[tuple[Mapping, tuple[int, ...]] | None] = [None] * SLOTS

    # ---- the table ----------------------------------------------------------------------------

    def _config(self) -> ctypes.Structure:
        return self.config[ctypes.c_uint32(0)]

    @property
    def live(self) -> int:
        return int(self._config().live)

    def _counters_for(self, policies: tuple[str, ...]) -> list[int]:
        """Counter index of policy i+1, allocating for new names (zeroed) and freeing those
        of names gone."""
        keep = set(policies)
        for name in [n for n in self.counter_of if n not in keep]:
            del self.counter_of[name]
        used = set(self.counter_of.values())
        free = (i for i in range(1, self.max_policies + 1) if i not in used)
        out = []
        for name in policies:
            if name not in self.counter_of:
                i = next(free, None)
                if i is None:
                    raise CapacityError("policies", f"{len(policies)} policies exceed the "
                                        f"capacity of {self.max_policies} (--capacity "
                                        "policies=N)")
                self.stats[ctypes.c_uint32(i)] = self.stats.Leaf()
                self.counter_of[name] = i
            out.append(self.counter_of[name])
        return out

    def cookie(self, path: str) -> int:
        """The namespace's cookie (SO_NETNS_COOKIE from a socket made inside it), cached
        while the path names the same namespace file."""
        st = os.stat(path)
        key = (path, st.st_dev, st.st_ino)
        if key not in self._cookies:
            self._cookies[key] = netns.cookie(path)
        return self._cookies[key]

    def _wanted(self, v: Verdicts, netns_idents: Mapping[str, int],
                slot: int) -> dict[str, dict[bytes, bytes]]:
        t = self.tables
        counters = self._counters_for(tuple(v.policies))

        def idx(d: Decision) -> int:
            return counters[d.policy - 1] if d.policy else 0

        local = set(netns_idents.values())
        guarded = {netns_idents[s.netns] for s in self.guarded if s.netns in netns_idents}

        def flags(i: int) -> int:
            return (ADDR_LOCAL if i in local else 0) | (ADDR_GUARDED if i in guarded else 0)
        ak, av = t["addrs"].key, t["addrs"].value
        ck, cv = t["cidrs"].key, t["cidrs"].value
        dk, dv = t["dsts"].key, t["dsts"].value
        nk, nv = t["netns"].key, t["netns"].value
        out = {
            "addrs": {ak.pack(addr16.pack(a), slot): av.pack(i, flags(i))
                      for a, i in v.addr_ident.items()},
            "cidrs": {ck.pack(_cidr_prefix(n), slot, addr16.pack(n.network_address)): cv.pack(i)
                      for n, i in v.cidr_ident.items()},
            "dsts": {dk.pack(d, slot): _decision(dv, dec, idx(dec))
                     for d, dec in v.policed.items()},
            "netns": {nk.pack(self.cookie(path), slot): nv.pack(i)
                      for path, i in netns_idents.items()},
        }
        # Namespaces gone: their files' inodes may name another namespace later.
        self._cookies = {k: c for k, c in self._cookies.items() if k[0] in netns_idents}
        for name, wanted in [*out.items(), ("rules", v.rules)]:
            cap = t[name].capacity
            if len(wanted) > cap:
                raise CapacityError("policies", f"{len(wanted)} entries for accel_policy_"
                                    f"{name} exceed the capacity of {cap} (--capacity "
                                    f"policy_{name}=N)")
        return out

    def _write_rules(self, v: Verdicts, slot: int) -> tuple[int, int]:
        """The rules, the one table that grows with policies x workloads: diffed against
        the Verdicts this slot was last written from (C-speed key sets, Decision objects
        compared only where they differ), packed only where they changed. A full diff when
        that is unknown (the first apply, after a failure, a policy list that moved)."""
        t = self.tables["rules"]
        counters = tuple(self.counter_of[n] for n in v.policies)
        packed: dict[tuple[int, int], bytes] = {}

        def value(d: Decision) -> bytes:
            c = counters[d.policy - 1] if d.policy else 0
            b = packed.get((d.verdict, c))
            if b is None:
                b = packed[(d.verdict, c)] = t.value.pack(int(d.verdict), c)
            return b

        pack = t.key.pack
        src, self._rules_src[slot] = self._rules_src[slot], None
        if src is None or src[1] != counters:
            done = t.write(slot, {pack(s, d, p, slot): value(dec)
                                  for (s, d, p), dec in v.rules.items()})
        else:
            old, new = src[0], v.rules
            get = old.get
            # Decision's own __eq__ costs a Python call per rule: its fields compared inline.
            changed = [(k, d) for k, d in new.items()
                       if (o := get(k)) is not d and (o is None or o.verdict is not d.verdict
                                                       or o.policy != d.policy)]
            # Keys gone, found only when some are: new = kept + added, so none went when
            # len(old) == len(new) - added (saves a set difference over every rule).
            added = sum(1 for k, _ in changed if k not in old)
            gone = old.keys() - new.keys() if len(old) != len(new) - added else ()
            done = t.put(slot, [(pack(*k, slot), value(d)) for k, d in changed],
                         [pack(*k, slot) for k in gone])
        self._rules_src[slot] = (v.rules, counters)
        return done

    def apply(self, verdicts: Verdicts, netns_idents: Mapping[str, int],
              sides: Iterable[PodSide] | None = None) -> Applied:
        """Enforce `verdicts`. netns_idents: each local pod's network namespace (a path:
        /run/netns/X, /proc/PID/ns/net) -> its workload identity in `verdicts`; its
        connect()s are decided with it, and its sockets are walked after the update.
        sides: the policed pods' own interfaces (pod_namespaces() finds both), guarded
        before the table goes live, so a pod newly policed answers denied SYNs from its
        first one."""
        start = time.monotonic()
        if sides is not None:
            self.guard(sides)
        live = self.live
        target = 1 - live
        wanted = self._wanted(verdicts, netns_idents, target)
        written = {"rules": self._write_rules(verdicts, target)}
        written.update({name: self.tables[name].write(target, wanted[name])
                        for name in ("dsts", "cidrs", "addrs", "netns")})
        cfg = self._config()
        cfg.live = target
        self.config[ctypes.c_uint32(0)] = cfg
        enforced = time.monotonic() - start
        self.verdicts = verdicts
        self.namespaces = dict(netns_idents)
        walked = self.cut()
        return Applied(written, enforced, time.monotonic() - start, walked)

    def cut(self) -> int:
        """Reset every established TCP connection the live table denies, in each known pod
        namespace and our own. Returns how many namespaces were walked."""
        spaces: dict[str | None, int] = {None: 0}
        for side in self.guarded:
            spaces.setdefault(side.netns, 0)
        spaces.update(self.namespaces)
        walked = 0
        for path, ident in spaces.items():
            cfg = self._config()
            setattr(cfg, "pass", getattr(cfg, "pass") + 1)  # a keyword in Python
            cfg.ident = ident
            self.config[ctypes.c_uint32(0)] = cfg
            try:
                self._link.run_in(path)
                walked += 1
            except OSError as e:  # a pod gone meanwhile: nothing of it to cut
                log.debug("policy: walking %s: %s", path, e)
        return walked

    # ---- answering denied SYNs ------------------------------------------------------------

    def guard(self, sides: Iterable[PodSide]) -> dict[str, str]:
        """Attach the reset-answering program to exactly these pod interfaces (detached from
        those no longer listed). Returns the failures: "netns:ifindex" -> why."""
        want = dict.fromkeys(sides)
        failures = {}
        for side in [s for s in self.guarded if s not in want]:
            try:
                with _ipr(side.netns) as ipr:
                    attach.tc_detach(ipr, side.ifindex, attach.TC_INGRESS, TC_PRIO, TC_HANDLE)
            except Exception as e:  # the pod is gone, and its interface with it
                log.debug("policy: detach %s: %s", side, e)
            del self.guarded[side]
        for side in want:
            if side in self.guarded:
                continue
            try:
                with _ipr(side.netns) as ipr:
                    attach.tc_attach(ipr, side.ifindex, self.tc_prog.fd,
                                     f"accel_policy_tc#{self.tc_prog.id}", attach.TC_INGRESS,
                                     TC_PRIO, TC_HANDLE)
                self.guarded[side] = None
            except Exception as e:
                failures[f"{side.netns}:{side.ifindex}"] = str(e)
                log.warning("policy: %s:%d does not answer denied SYNs: %s", side.netns,
                            side.ifindex, e)
        self.unguarded = failures
        return failures

    # ---- reporting and teardown -----------------------------------------------------------

    def counters(self) -> dict[int, PolicyCounters]:
        out = {}
        for i in [0, *self.counter_of.values()]:
            per_cpu = self.stats.lookup(ctypes.c_uint32(i)) or []
            out[i] = PolicyCounters(
                allowed=sum(c.allowed for c in per_cpu),
                denied=sum(c.denied for c in per_cpu),
                dry_run_denied=sum(c.dry_run_denied for c in per_cpu),
                closed_by_update=sum(c.closed for c in per_cpu))
        return out

    def status(self) -> PolicyStatus:
        counts = self.counters()
        live = self.live
        return PolicyStatus(
            policies={name: counts[i] for name, i in sorted(self.counter_of.items())},
            default=counts[0],
            maps={name: MapUsage(len(t.held[live]), t.capacity)
                  for name, t in self.tables.items()},
            guarded=sorted(f"{s.netns}:{s.ifindex}" for s in self.guarded),
            unguarded=dict(self.unguarded),
            namespaces=len(self.namespaces))

    def close(self) -> None:
        """Detach from the pods (the maps stay with the pins: the socket programs own them)."""
        self.guard(())
        self._link.close()
        for t in self.tables.values():
            t.map.close()
        self.stats.close()
        self.config.close()
        self.tc_prog.close()
        self.iter_prog.close()


class Enforcer:
    """The runtime's handle: PolicyMaps fed with the local pods pod routing found (their
    namespaces' identities, the policed ones' interfaces), the last Verdicts applied again
    when pods come and go (refresh(), a housekeeping chore), and what it attached recorded
    in the datapath's state for `accel uninstall`."""

    def __init__(self, datapath: Datapath, pods: PodRouter | Unavailable | None = None):
        self.datapath = datapath
        self.pods = pods  # a PodRouter (its .ports), or None: no pod is known
        self.maps = PolicyMaps(datapath.pin_dir, datapath.capacities, datapath.defines(),
                               datapath.batch_writes)
        self.verdicts: Verdicts | None = None
        self._seen: list[tuple[str, int, tuple[str, ...]]] | None = None

    def _pods(self) -> list[tuple[str, int, tuple[str, ...]]]:
        ports = getattr(self.pods, "ports", None) or {}
        return sorted((p.peer_netns, p.peer_ifindex, tuple(p.addresses))
                      for p in ports.values())

    def apply(self, verdicts: Verdicts) -> Applied:
        pods = self._pods()
        idents, sides = pod_namespaces(verdicts, pods)
        done = self.maps.apply(verdicts, idents, sides)
        self.verdicts, self._seen = verdicts, pods
        self.datapath.record(policy_prog_id=self.maps.tc_prog.id,
                             policy_sides=self.maps.status().guarded)
        return done

    def refresh(self) -> None:
        if self.verdicts is not None and self._pods() != self._seen:
            self.apply(self.verdicts)

    def status(self) -> PolicyStatus:
        return self.maps.status()

    def close(self, keep: bool = False) -> None:
        if keep:  # the filters stay with the kept datapath's pinned program
            self.maps.guarded.clear()
        self.maps.close()


def detach_from(sides: Iterable[str]) -> list[str]:
    """Remove our filter from pod interfaces ("netns:ifindex", as status() lists them) an
    agent left behind (it died, or was stopped with --keep)."""
    done = []
    for s in sides:
        path, _, idx = s.rpartition(":")
        if not os.path.exists(path):
            continue
        try:
            with _ipr(path) as ipr:
                if attach.tc_detach(ipr, int(idx), attach.TC_INGRESS, TC_PRIO, TC_HANDLE):
                    done.append(f"tc ingress filter on ifindex {idx} in {path}")
        except Exception as e:
            log.debug("policy: detach %s: %s", s, e)
    return done


def _ipr(path: str):
    from pyroute2 import IPRoute

    return IPRoute(netns=path)


def pod_namespaces(verdicts: Verdicts, pods: Iterable[tuple[str, int, Iterable[str]]]
                   ) -> tuple[dict[str, int], list[PodSide]]:
    """From the local pods as pod routing found them ((namespace path, pod-side ifindex,
    addresses) each: PodRouter.ports gives peer_netns, peer_ifindex, addresses): each
    namespace's identity (that of its addresses' workload) for apply(), and the pod sides
    of policed workloads for guard()."""
    idents: dict[str, int] = {}
    sides = []
    for path, ifindex, addresses in pods:
        ids = {verdicts.addr_ident.get(ipaddress.ip_address(a)) for a in addresses} - {None}
        if len(ids) == 1:  # a namespace of two workloads (or none) has no one identity
            (ident,) = ids
            idents[path] = ident
            if ident in verdicts.policed:
                sides.append(PodSide(path, ifindex))
    return idents, sides


__all__ = ["Applied", "Enforcer", "MapUsage", "PodSide", "PolicyCounters", "PolicyMaps",
           "PolicyStatus", "detach_from", "policy_unit", "pod_namespaces"]
