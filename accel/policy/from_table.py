"""A ServiceTable's policies (mesh.yaml's `policies:`) -> Verdicts: each endpoint
address is a workload with the identity its endpoints state, selected by the policies whose
selector picks its name or labels in its namespace (any namespace for the root's)."""

from __future__ import annotations

from collections.abc import Callable

from accel.model import IPAddress, ServiceTable
from accel.policy.compile import Compiled, compile_policies
from accel.policy.rules import ROOT_NAMESPACE, Peer, Policy, Scope


def selected(policy: Policy, namespace: str, name: str,
             labels: tuple[tuple[str, str], ...]) -> bool:
    if policy.scope != Scope.WORKLOAD_SELECTOR or policy.selector is None:
        return False
    if policy.namespace not in (namespace, ROOT_NAMESPACE):
        return False
    return policy.selector.selects(name, labels)


def peers_of(table: ServiceTable,
             is_local: Callable[[IPAddress], bool] = lambda _: True) -> list[Peer]:
    """One Peer per workload: the endpoints of one name in one namespace (a dual-stack
    workload's addresses), else of one address (config.check_identities made the endpoints
    of an address agree). `is_local`: whether an address is a workload on this host."""
    workloads: dict[object, list] = {}
    for svc in table.services:
        for ep in svc.endpoints:
            key = (ep.namespace, ep.name) if ep.name else ep.address
            workloads.setdefault(key, []).append(ep)
    peers = []
    for eps in workloads.values():
        ep = eps[0]
        addrs = tuple(dict.fromkeys(e.address for e in eps))
        chosen = tuple(p.key for p in table.policies
                       if selected(p, ep.namespace, ep.name, ep.labels))
        peers.append(Peer(uid=f"{ep.namespace}/{ep.name}" if ep.name else str(ep.address),
                          namespace=ep.namespace, service_account=ep.service_account,
                          addresses=addrs, policies=chosen,
                          local=any(is_local(a) for a in addrs)))
    return peers


def verdicts_of(table: ServiceTable,
                is_local: Callable[[IPAddress], bool] = lambda _: True) -> Compiled:
    return compile_policies(peers_of(table, is_local), table.policies)
