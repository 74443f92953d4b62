"""Istio's L4 authorization as data: policies, their rules and matches, and the workloads
they name (as the policy compiler sees them). Both sources of policies produce these: the
workload API (istio.security.Authorization) and mesh.yaml's `policies:`.

Semantics are ztunnel's (src/rbac.rs): a policy matches when any group matches; a group
when all its rules match (none: it matches); a rule when any of its matches matches (none:
it matches); a match when every field it sets holds, a field holding when any of its values
matches and a `not_` field when none does. A match that sets no field matches nothing; a
policy without groups matches nothing. A source without an identity (not a workload) has
namespace "" and no principal: `namespaces` never match it, `not_namespaces` always do.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

# As accel.model names them (model imports this module: policies are part of a table).
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_NAMESPACE = "default"


class Scope(enum.IntEnum):  # the wire's numbers (istio.security.Scope)
    GLOBAL = 0  # every workload
    NAMESPACE = 1  # the workloads of the policy's namespace
    WORKLOAD_SELECTOR = 2  # the workloads that name the policy


class Action(enum.IntEnum):  # the wire's numbers (istio.security.Action)
    ALLOW = 0
    DENY = 1


@dataclass(frozen=True)
class StringMatch:
    kind: str  # "exact", "prefix", "suffix" or "presence"
    value: str = ""

    def matches(self, text: str) -> bool:
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        if self.kind == "suffix":
            return text.endswith(self.value)
        return bool(text)  # presence: any non-empty value

    def __str__(self) -> str:
        return {"exact": "{}", "prefix": "{}*", "suffix": "*{}",
                "presence": "*"}[self.kind].format(self.value)


STRING_MATCH_KINDS = ("exact", "prefix", "suffix", "presence")


@dataclass(frozen=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()  # (namespace, service account)
    not_service_accounts: tuple[tuple[str, str], ...] = ()
    # Against "TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT", the SPIFFE id without spiffe://.
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def empty(self) -> bool:
        return not any(getattr(self, f) for f in MATCH_FIELDS)

    def ports(self) -> frozenset[int]:
        return frozenset(self.destination_ports) | frozenset(self.not_destination_ports)


MATCH_FIELDS = ("namespaces", "not_namespaces", "service_accounts", "not_service_accounts",
                "principals", "not_principals", "source_ips", "not_source_ips",
                "destination_ips", "not_destination_ips", "destination_ports",
                "not_destination_ports")

Rule = tuple[Match, ...]  # matches, OR-ed (the wire's Rules / ztunnel's clause)
Group = tuple[Rule, ...]  # rules, AND-ed (the wire's Group / ztunnel's rule)


ROOT_NAMESPACE = "istio-system"  # Istio's default root namespace: its policies are global


@dataclass(frozen=True)
class Selector:
    """Which workloads a WORKLOAD_SELECTOR policy of mesh.yaml selects: every label given
    (Istio's matchLabels) and, when names are given, one of them. Like Istio, only in the
    policy's own namespace unless that is the root namespace."""

    labels: tuple[tuple[str, str], ...] = ()
    endpoints: tuple[str, ...] = ()  # endpoint names

    def selects(self, name: str, labels: tuple[tuple[str, str], ...]) -> bool:
        if self.endpoints and name not in self.endpoints:
            return False
        return set(self.labels) <= set(labels)


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    scope: Scope = Scope.WORKLOAD_SELECTOR
    action: Action = Action.ALLOW
    groups: tuple[Group, ...] = ()  # OR-ed
    dry_run: bool = False
    # mesh.yaml's: whom it selects. None where workloads name their policies themselves
    # (the workload API's authorization_policies).
    selector: Selector | None = None

    @property
    def key(self) -> str:
        """"namespace/name": how workloads name it (authorization_policies) and counters."""
        return f"{self.namespace}/{self.name}"

    def matches(self) -> list[Match]:
        return [m for g in self.groups for r in g for m in r]


@dataclass(frozen=True)
class Peer:
    """A workload as policy sees it: its identity, its addresses, the selector policies
    that name it and whether it runs here (a destination the kernel polices)."""

    uid: str
    namespace: str = DEFAULT_NAMESPACE
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    addresses: tuple[IPAddress, ...] = ()
    policies: tuple[str, ...] = ()  # "namespace/name" of WORKLOAD_SELECTOR policies
    local: bool = False

    @property
    def principal(self) -> str:
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def applies(policy: Policy, peer: Peer) -> bool:
    """Whether `policy` governs connections into `peer` (ztunnel's policy lookup: global
    ones, its namespace's, and those it names)."""
    return (policy.scope == Scope.GLOBAL
            or (policy.scope == Scope.NAMESPACE and policy.namespace == peer.namespace)
            or policy.key in peer.policies)
