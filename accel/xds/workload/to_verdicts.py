"""Held workload API state -> Verdicts for the workloads on node `node_name` (the
destinations policed here): each workload becomes a policy Peer, then
accel.policy.compile does the rest."""

from __future__ import annotations

from accel.policy.compile import Compiled, compile_policies
from accel.policy.rules import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, Peer
from accel.xds.workload.resources import WorkloadInfo
from accel.xds.workload.state import WorkloadState


def peer_of(w: WorkloadInfo, node_name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Peer:
    """A workload's identity as istiod states it: elided fields take ztunnel's defaults.
    A host-network workload's addresses are shared with others: they identify no one."""
    return Peer(uid=w.uid, namespace=w.namespace,
                service_account=w.service_account or DEFAULT_SERVICE_ACCOUNT,
                trust_domain=w.trust_domain or trust_domain,
                addresses=() if w.host_network else w.addresses,
                policies=w.policies, local=bool(node_name) and w.node == node_name)


def to_verdicts(state: WorkloadState, node_name: str,
                trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Compiled:
    peers = [peer_of(w, node_name, trust_domain) for w in state.workloads.values()]
    return compile_policies(peers, state.policies.values())
