"""The seam between the policy compiler (user space) and its enforcement (the kernel).

Istio's rules (namespaces, service accounts, principals, CIDRs, ports and their `not_`
forms, ALLOW/DENY, dry run) are evaluated in user space, once per change; the kernel only
looks up a precomputed decision (computation in user space, decisions in the kernel):

1. destination identity = `addr_ident[dst address]`; a destination that is not in
   `policed` has no policy at all: allowed, nothing counted;
2. source identity = `addr_ident[src address]` (a workload), else the longest prefix of
   `cidr_ident` holding it (a non-workload source in a range some policy names), else 0;
3. decision = `rules[(src, dst, port)]`, else `rules[(src, dst, 0)]` (any other port),
   else `policed[dst]`.

Entries equal to the destination's default are left out of `rules`, which keeps the table
near the number of (source, destination) pairs some policy tells apart.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ANY_PORT = 0
UNKNOWN_SOURCE = 0  # neither a workload nor in a prefix any policy names


class Verdict(enum.IntEnum):
    ALLOW = 1
    DENY = 2
    DRY_RUN_DENY = 3  # a dry-run policy would deny: allowed, and counted against it


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    # 1-based index into Verdicts.policies of the policy that decided (or, for
    # DRY_RUN_DENY, the dry-run policy that would have denied); 0: no policy decided
    # (the default: allowed as no ALLOW policy applies, or denied as none matched).
    policy: int = 0


@dataclass(frozen=True)
class Verdicts:
    policies: tuple[str, ...] = ()  # "namespace/name" of policy i+1
    addr_ident: Mapping[IPAddress, int] = field(default_factory=dict)  # identities >= 1
    cidr_ident: Mapping[IPNetwork, int] = field(default_factory=dict)
    policed: Mapping[int, Decision] = field(default_factory=dict)  # dst identity -> default
    rules: Mapping[tuple[int, int, int], Decision] = field(default_factory=dict)

    def source(self, addr: IPAddress) -> int:
        ident = self.addr_ident.get(addr)
        if ident is not None:
            return ident
        best: tuple[int, int] | None = None
        for net, i in self.cidr_ident.items():
            if addr.version == net.version and addr in net and (
                    best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, i)
        return best[1] if best else UNKNOWN_SOURCE

    def decide(self, src: IPAddress, dst: IPAddress, port: int) -> Decision | None:
        """What the kernel decides for a new connection src -> dst:port; None: the
        destination has no policy (allowed, not counted). The reference for the kernel's
        lookup, which tests compare against."""
        d = self.addr_ident.get(dst)
        if d is None or d not in self.policed:
            return None
        s = self.source(src)
        return (self.rules.get((s, d, port)) or self.rules.get((s, d, ANY_PORT))
                or self.policed[d])
