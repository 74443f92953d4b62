"""Policies and workloads -> Verdicts: Istio's rules evaluated in user space, once per
change, into the table the kernel looks decisions up in (accel/policy/verdicts.py).

Identities. Every workload is a source identity (all its addresses); an address shared by
two workloads is nobody's (it cannot tell them apart) and is reported. A workload whose
addresses differ in the prefixes policies name (dual stack, a /32 rule) gets one identity
per group of alike addresses, so that every address of an identity decides alike. Each
prefix a policy names in source_ips / not_source_ips is an identity for the sources in it
that are no workload, evaluated at a representative address: one in the prefix and in no
longer named prefix (every such address is in exactly the same named prefixes). Any other
source is identity 0: no namespace, no principal, in no named prefix.

Ports. A destination's decisions are computed for each port its policies name and once for
"any other port" (0). Entries equal to the destination's default are left out.

Speed. Sources are bits of Python ints: a match's source fields become one bitset, built
once per match from the few distinct namespaces, principals and prefixes (cached across
policies), so a policy is evaluated for all sources at once; destinations whose policies
and named prefixes are alike share one evaluation.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from accel.model import IPAddress, IPNetwork, ValidationError
from accel.policy.rules import Action, Match, Peer, Policy, Scope, StringMatch
from accel.policy.verdicts import ANY_PORT, UNKNOWN_SOURCE, Decision, Verdict, Verdicts


@dataclass(frozen=True)
class Compiled:
    verdicts: Verdicts
    # What was left out and why, e.g. {"Workload[uid].addresses[1]": "10.0.0.5 is also
    # an address of ..."} or {"Workload[uid].authorization_policies[0]": "no policy ..."}.
    ignored: Mapping[str, str] = field(default_factory=dict)


class _Prefixes:
    """Which of a set of prefixes hold an address, by one set lookup per prefix length."""

    def __init__(self, nets: Iterable[IPNetwork]):
        self.by_len: dict[tuple[int, int], dict[int, IPNetwork]] = defaultdict(dict)
        for n in nets:
            self.by_len[(n.version, n.prefixlen)][int(n.network_address)] = n

    def holding(self, addr: IPAddress) -> frozenset[IPNetwork]:
        v, a = addr.version, int(addr)
        bits = 32 if v == 4 else 128
        out = []
        for (ver, plen), table in self.by_len.items():
            if ver == v:
                n = table.get((a >> (bits - plen)) << (bits - plen) if plen else 0)
                if n is not None:
                    out.append(n)
        return frozenset(out)


def _bits(x: int) -> Iterator[int]:
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


def _representatives(nets: Iterable[IPNetwork]) -> dict[IPNetwork, IPAddress | None]:
    """Per prefix an address in it and in no longer prefix of `nets` (None: they cover it)."""
    order = sorted(set(nets), key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    out: dict[IPNetwork, IPAddress | None] = {}
    for i, net in enumerate(order):
        cur, end = int(net.network_address), int(net.broadcast_address)
        for sub in order[i + 1:]:  # the prefixes inside `net` follow it, by start
            start = int(sub.network_address)
            if sub.version != net.version or start > end:
                break
            if start > cur:
                break
            cur = max(cur, int(sub.broadcast_address) + 1)
        out[net] = None if cur > end else ipaddress.ip_address(cur) if net.version == 4 \
            else ipaddress.IPv6Address(cur)
    return out


@dataclass
class _Source:
    namespace: str
    principal: str | None
    account: tuple[str, str] | None
    src_sig: frozenset[IPNetwork]


class _Matcher:
    """Match fields -> bitsets over the sources, cached by value across policies."""

    def __init__(self, sources: Sequence[_Source]):
        self.all = (1 << len(sources)) - 1
        self.by_ns: dict[str, int] = defaultdict(int)
        self.by_principal: dict[str, int] = defaultdict(int)
        self.by_account: dict[tuple[str, str], int] = defaultdict(int)
        self.by_prefix: dict[IPNetwork, int] = defaultdict(int)
        for i, s in enumerate(sources):
            bit = 1 << i
            self.by_ns[s.namespace] |= bit
            if s.principal is not None:
                self.by_principal[s.principal] |= bit
            if s.account is not None:
                self.by_account[s.account] |= bit
            for n in s.src_sig:
                self.by_prefix[n] |= bit
        self._strings: dict[tuple[str, StringMatch], int] = {}
        self._matches: dict[Match, int] = {}

    def _string(self, what: str, groups: dict[str, int], sm: StringMatch) -> int:
        key = (what, sm)
        hit = self._strings.get(key)
        if hit is None:
            hit = 0
            for value, bits in groups.items():
                if sm.matches(value):
                    hit |= bits
            self._strings[key] = hit
        return hit

    def sources(self, m: Match) -> int:
        """The sources a match's source fields hold for (destination fields aside)."""
        hit = self._matches.get(m)
        if hit is not None:
            return hit
        acc = self.all

        def either(values, one) -> int:
            out = 0
            for v in values:
                out |= one(v)
            return out

        ns = lambda sm: self._string("ns", self.by_ns, sm)  # noqa: E731
        pr = lambda sm: self._string("pr", self.by_principal, sm)  # noqa: E731
        sa = lambda a: self.by_account.get(a, 0)  # noqa: E731
        ip = lambda n: self.by_prefix.get(n, 0)  # noqa: E731
        for pos, neg, one in ((m.namespaces, m.not_namespaces, ns),
                              (m.service_accounts, m.not_service_accounts, sa),
                              (m.principals, m.not_principals, pr),
                              (m.source_ips, m.not_source_ips, ip)):
            if pos:
                acc &= either(pos, one)
            if neg:
                acc &= ~either(neg, one) & self.all
        self._matches[m] = acc
        return acc


def _dst_ok(m: Match, dst_sig: frozenset[IPNetwork]) -> bool:
    if m.destination_ips and not any(n in dst_sig for n in m.destination_ips):
        return False
    return not any(n in dst_sig for n in m.not_destination_ips)


def _port_ok(m: Match, port: int) -> bool:
    # port 0: any port no policy of the destination names (never in these lists)
    if m.destination_ports and port not in m.destination_ports:
        return False
    return port not in m.not_destination_ports


class _Policy:
    """One policy's bitsets of matching sources, per destination signature and port."""

    def __init__(self, index: int, policy: Policy, matcher: _Matcher):
        self.index = index
        self.policy = policy
        self.allow = policy.action == Action.ALLOW
        self.dry_run = policy.dry_run
        self.matcher = matcher
        ms = policy.matches()
        self.ports = frozenset(p for m in ms for p in m.ports())
        self.dst_nets = frozenset(n for m in ms for n in m.destination_ips + m.not_destination_ips)
        self._values: dict[tuple[frozenset[IPNetwork], int], int] = {}

    def value(self, dst_sig: frozenset[IPNetwork], port: int) -> int:
        if port not in self.ports:
            port = ANY_PORT
        sig = dst_sig & self.dst_nets if self.dst_nets else frozenset()
        key = (sig, port)
        hit = self._values.get(key)
        if hit is None:
            hit = self._values[key] = self._evaluate(sig, port)
        return hit

    def _evaluate(self, dst_sig: frozenset[IPNetwork], port: int) -> int:
        every = self.matcher.all
        out = 0
        for group in self.policy.groups:  # OR
            g = every
            for rule in group:  # AND
                if not rule:
                    continue  # no match: holds
                r = 0
                for m in rule:  # OR
                    if not m.empty() and _dst_ok(m, dst_sig) and _port_ok(m, port):
                        r |= self.matcher.sources(m)
                g &= r
                if not g:
                    break
            out |= g
            if out == every:
                break
        return out


class _Decisions:
    def __init__(self) -> None:
        self._made: dict[tuple[Verdict, int], Decision] = {}

    def __call__(self, verdict: Verdict, policy: int = 0) -> Decision:
        d = self._made.get((verdict, policy))
        if d is None:
            d = self._made[(verdict, policy)] = Decision(verdict, policy)
        return d


Classes = list[tuple[Decision, int]]  # decisions with the bitset of sources they are for
Kind = tuple[bool, bool]  # (ALLOW?, dry run?)
KINDS: tuple[Kind, ...] = ((False, False), (False, True), (True, False), (True, True))
Firsts = dict[Kind, list[tuple[int, int]]]  # per kind: (policy index, sources it is first for)


def _firsts(pols: Sequence[_Policy], dst_sig: frozenset[IPNetwork], port: int) -> Firsts:
    """Per kind, the sources each policy (in index order) is the first to match."""
    out: Firsts = {k: [] for k in KINDS}
    seen = dict.fromkeys(KINDS, 0)
    for p in pols:
        v = p.value(dst_sig, port)
        if v:
            k = (p.allow, p.dry_run)
            new = v & ~seen[k]
            if new:
                seen[k] |= new
                out[k].append((p.index, new))
    return out


def _merge(a: Firsts, b: Firsts) -> Firsts:
    """The firsts of two policy lists' union: per source, the lower index owns it."""
    out: Firsts = {}
    for k in KINDS:
        if not b[k]:
            out[k] = a[k]
            continue
        merged, seen = [], 0
        for index, bits in sorted(a[k] + b[k]):
            new = bits & ~seen
            if new:
                seen |= new
                merged.append((index, new))
        out[k] = merged
    return out


@dataclass(frozen=True)
class _Shared:
    """The policies every workload of a namespace has (global ones and the namespace's)."""

    pols: list[_Policy]
    indices: tuple[int, ...]
    nets: frozenset[IPNetwork]
    ports: frozenset[int]

    @classmethod
    def of(cls, pols: list[_Policy]) -> _Shared:
        return cls(pols, tuple(p.index for p in pols),
                   frozenset(n for p in pols for n in p.dst_nets),
                   frozenset(q for p in pols for q in p.ports))


class _Context:
    """The policies of destinations alike (same policies, same named prefixes holding
    their addresses): shared ones (global and namespace) evaluated once per namespace, the
    few a destination names itself added to them."""

    def __init__(self, shared: _Shared, own: list[_Policy],
                 dst_sig: frozenset[IPNetwork], cache: dict, every: int,
                 decision: _Decisions):
        self.shared, self.own, self.sig = shared, own, dst_sig
        self.cache, self.every, self.decision = cache, every, decision
        pols = shared.pols + own
        self.has_allow = any(p.allow and not p.dry_run for p in pols)
        self.dry_allows = sorted(p.index for p in pols if p.allow and p.dry_run)
        if self.has_allow:
            self.base = decision(Verdict.DENY)
        elif self.dry_allows:  # enforced, "no ALLOW matched" would deny
            self.base = decision(Verdict.DRY_RUN_DENY, self.dry_allows[0])
        else:
            self.base = decision(Verdict.ALLOW)
        self.shared_sig = dst_sig & shared.nets
        self.ports = sorted(shared.ports | {q for p in own for q in p.ports})

    def _shared_firsts(self, port: int) -> Firsts:
        port = port if port in self.shared.ports else ANY_PORT
        key = (self.shared.indices, self.shared_sig, port)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = _firsts(self.shared.pols, self.shared_sig, port)
        return hit

    def classes(self) -> dict[int, Classes]:
        """Per port (0: any other), the sources grouped by decision (each source in one
        group), in ztunnel's order: a DENY that matches denies; else, when ALLOW policies
        apply, one must match; dry-run policies are evaluated alike and only counted."""
        out: dict[int, Classes] = {}
        for port in [ANY_PORT, *self.ports]:
            firsts = self._shared_firsts(port)
            if self.own:
                firsts = _merge(firsts, _firsts(self.own, self.sig, port))
            out[port] = self._decide(firsts)
        return out

    def _decide(self, firsts: Firsts) -> Classes:
        decision = self.decision
        seen = {k: 0 for k in KINDS}
        for k in KINDS:
            for _, bits in firsts[k]:
                seen[k] |= bits
        classes: Classes = []
        rest = self.every
        for index, bits in firsts[(False, False)]:
            classes.append((decision(Verdict.DENY, index), bits))
        rest &= ~seen[(False, False)]
        if self.has_allow:
            classes.append((decision(Verdict.DENY), rest & ~seen[(True, False)]))
            rest &= seen[(True, False)]
        for index, bits in firsts[(False, True)]:
            classes.append((decision(Verdict.DRY_RUN_DENY, index), bits & rest))
        rest &= ~seen[(False, True)]
        if not self.has_allow and self.dry_allows:
            classes.append((decision(Verdict.DRY_RUN_DENY, self.dry_allows[0]),
                            rest & ~seen[(True, True)]))
            rest &= seen[(True, True)]
        for index, bits in firsts[(True, False)]:
            classes.append((decision(Verdict.ALLOW, index), bits & rest))
        rest &= ~seen[(True, False)]
        classes.append((decision(Verdict.ALLOW), rest))
        merged: dict[Decision, int] = {}
        for d, bits in classes:
            if bits:
                merged[d] = merged.get(d, 0) | bits
        return list(merged.items())


def compile_policies(peers: Sequence[Peer], policies: Iterable[Policy]) -> Compiled:
    """The Verdicts for `peers` (workloads; those with `local` are the destinations
    policed here) under `policies`. Raises ValidationError for two policies of one key."""
    ordered = sorted(policies, key=lambda p: p.key)
    keys = [p.key for p in ordered]
    for a, b in zip(keys, keys[1:], strict=False):
        if a == b:
            raise ValidationError(f"policies[{a}]", "two policies have this namespace/name")
    index = {k: i + 1 for i, k in enumerate(keys)}
    ignored: dict[str, str] = {}
    peers = sorted(peers, key=lambda p: p.uid)
    applying: dict[str, tuple[str, list[Policy]]] = {}  # uid -> (namespace, own policies)
    everywhere = [p for p in ordered if p.scope == Scope.GLOBAL]
    by_ns: dict[str, list[Policy]] = defaultdict(list)
    for p in ordered:
        if p.scope == Scope.NAMESPACE:
            by_ns[p.namespace].append(p)
    by_key = dict(zip(keys, ordered, strict=True))
    shared_of: dict[str, list[Policy]] = {}
    for peer in peers:
        for j, ref in enumerate(peer.policies):
            if ref not in index:
                ignored[f"Workload[{peer.uid}].authorization_policies[{j}]"] = \
                    f"no policy {ref!r} (yet): not applied"
        if peer.local:
            # applies(), by index: global ones and its namespace's (shared by the
            # namespace), then those it names that these are not
            shared = shared_of.get(peer.namespace)
            if shared is None:
                shared = shared_of[peer.namespace] = sorted(
                    (*everywhere, *by_ns.get(peer.namespace, ())), key=lambda p: p.key)
            have = {p.key for p in shared} if peer.policies else set()
            own = sorted({by_key[k].key: by_key[k] for k in peer.policies
                          if k in by_key and k not in have}.values(), key=lambda p: p.key)
            if shared or own:
                applying[peer.uid] = (peer.namespace, own)
    used = {p.key: p for ns, own in applying.values() for p in (*shared_of[ns], *own)}
    src_nets = {n for p in used.values() for m in p.matches()
                for n in m.source_ips + m.not_source_ips}
    dst_nets = {n for p in used.values() for m in p.matches()
                for n in m.destination_ips + m.not_destination_ips}
    src_index, dst_index = _Prefixes(src_nets), _Prefixes(dst_nets)

    owners: dict[IPAddress, list[str]] = defaultdict(list)
    for peer in peers:
        for a in dict.fromkeys(peer.addresses):
            owners[a].append(peer.uid)
    sources: list[_Source] = [_Source("", None, None, frozenset())]  # identity 0
    addr_ident: dict[IPAddress, int] = {}
    dst_groups: dict[str, list[tuple[int, frozenset[IPNetwork]]]] = defaultdict(list)
    for peer in peers:
        groups: dict[tuple[frozenset[IPNetwork], frozenset[IPNetwork]], int] = {}
        for j, a in enumerate(peer.addresses):
            if len(owners[a]) > 1:
                others = ", ".join(u for u in owners[a] if u != peer.uid)
                ignored[f"Workload[{peer.uid}].addresses[{j}]"] = (
                    f"{a} is also an address of {others}: it identifies no one")
                continue
            sig = (src_index.holding(a), dst_index.holding(a))
            ident = groups.get(sig)
            if ident is None:
                ident = groups[sig] = len(sources)
                sources.append(_Source(peer.namespace, peer.principal,
                                       (peer.namespace, peer.service_account), sig[0]))
                if peer.uid in applying:
                    dst_groups[peer.uid].append((ident, sig[1]))
            addr_ident[a] = ident
    cidr_ident: dict[IPNetwork, int] = {}
    for net, rep in sorted(_representatives(src_nets).items(),
                           key=lambda kv: (kv[0].version, str(kv[0]))):
        if rep is None:
            ignored[f"prefix {net}"] = "every address in it is in a longer named prefix"
            continue
        cidr_ident[net] = len(sources)
        sources.append(_Source("", None, None, src_index.holding(rep)))

    matcher = _Matcher(sources)
    compiled = {k: _Policy(index[k], p, matcher) for k, p in used.items()}
    decision = _Decisions()
    contexts: dict[tuple, tuple[Decision, dict[int, Classes]]] = {}
    shared_cache: dict = {}
    policed: dict[int, Decision] = {}
    rules: dict[tuple[int, int, int], Decision] = {}
    shared_sets = {ns: _Shared.of([compiled[p.key] for p in pols])
                   for ns, pols in shared_of.items()}
    for uid, (ns, own_p) in applying.items():
        shared = shared_sets[ns]
        own = [compiled[p.key] for p in own_p]
        named = shared.nets | {n for p in own for n in p.dst_nets}
        for ident, dst_sig in dst_groups.get(uid, ()):
            sig = dst_sig & named
            key = (shared.indices, tuple(p.index for p in own), sig)
            ctx = contexts.get(key)
            if ctx is None:
                c = _Context(shared, own, sig, shared_cache, matcher.all, decision)
                ctx = contexts[key] = (c.base, c.classes())
            base, by_port = ctx
            policed[ident] = base
            other = by_port[ANY_PORT]
            for d, bits in other:
                if d is not base:
                    for s in _bits(bits):
                        rules[(s, ident, ANY_PORT)] = d
            for port, here in by_port.items():
                if port == ANY_PORT:
                    continue
                for d, bits in here:  # where this port decides unlike any other port
                    for d0, bits0 in other:
                        if d is not d0:
                            for s in _bits(bits & bits0):
                                rules[(s, ident, port)] = d
        if uid not in dst_groups:
            ignored[f"Workload[{uid}]"] = "no address of its own: its policies are not enforced"
    assert UNKNOWN_SOURCE == 0
    return Compiled(Verdicts(tuple(keys), addr_ident, cidr_ident, policed, rules), ignored)
