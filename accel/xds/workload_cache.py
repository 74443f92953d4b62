"""Istio's workload API held by the agent -> one ServiceTable and one policy Verdicts,
flushed together (the cache for xDS `--xds-api workload`; the Envoy one is cache.py).

A response (Delta: upserts and removals of Addresses or Authorizations) is decoded and
validated by the workload processors (accel/xds/workload/decode.py), merged into a candidate
WorkloadState, and the table (services of this node's view) and verdicts (the workloads on
node `node_name` are the policed destinations) are rebuilt and handed to `on_update`;
anything that raises leaves the state as it was and the stream NACKs.

The first flush waits for the first Address response: a table without workloads would
only mean "not there yet". istiod pushes Authorization first, so the policies a workload
names are there when it comes; one that is not yet is reported (policy "ignored").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from accel.model import DEFAULT_FASTPATH, ServiceTable
from accel.policy.compile import Compiled
from accel.policy.rules import DEFAULT_TRUST_DOMAIN, Policy
from accel.policy.verdicts import Verdicts
from accel.xds.processors import Processor
from accel.xds.stream import Update
from accel.xds.workload.decode import AddressProcessor, AuthorizationProcessor
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION, KIND, MESSAGE, resource_name
from accel.xds.workload.resources import ServiceInfo, WorkloadInfo
from accel.xds.workload.state import WorkloadState
from accel.xds.workload.to_table import TableBuild, to_table
from accel.xds.workload.to_verdicts import to_verdicts

OnWorkloadUpdate = Callable[[ServiceTable, Verdicts], None]

# Both wildcard, as ztunnel subscribes; policies first (istiod's push order).
WORKLOAD = tuple(Processor(t, KIND[t], MESSAGE[t], True, resource_name, wire_names=True)
                 for t in (AUTHORIZATION, ADDRESS))


def _own_name(info: WorkloadInfo | ServiceInfo | Policy) -> str:
    """What the rest of the API calls a resource: a workload's uid, a service's
    "namespace/hostname", a policy's "namespace/name" (workloads name their policies so)."""
    if isinstance(info, WorkloadInfo):
        return info.uid
    return info.key


@dataclass(frozen=True)
class WorkloadTaken:
    type_url: str
    state: WorkloadState
    build: TableBuild | None  # None: not synced yet (no Address response so far)
    policy: Compiled | None
    count: int
    removed: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)  # wire name -> own name
    children: Mapping[str, frozenset[str]] = field(default_factory=dict)
    info: Mapping[str, object] = field(default_factory=dict)


class WorkloadCache:
    processors: tuple[Processor, ...] = WORKLOAD

    def __init__(self, on_update: OnWorkloadUpdate, node_name: str,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, fastpath: str = DEFAULT_FASTPATH):
        self.on_update = on_update
        self.node_name = node_name
        self.fastpath = fastpath
        self.trust_domain = trust_domain
        self.lock = threading.Lock()
        self._decode = {ADDRESS: AddressProcessor(), AUTHORIZATION: AuthorizationProcessor()}
        self.state = WorkloadState()
        self._seen: set[str] = set()
        self.table: ServiceTable | None = None  # the last table on_update accepted
        self.translation: TableBuild | None = None  # where `table` came from, and the rest
        self.policy: Compiled | None = None
        # Per type, the name each resource was sent under -> its own (state keys): a
        # removal names the former, workloads and services refer to the latter.
        self._aliases: dict[str, dict[str, str]] = {ADDRESS: {}, AUTHORIZATION: {}}

    def held(self, type_url: str) -> Collection[str]:
        """Names as the server sent them."""
        return self._aliases[type_url].keys()

    def keep_only(self, type_url: str, names: frozenset[str]) -> None:
        """Nothing to do: both types are wildcard subscriptions."""

    def take(self, update: Update) -> WorkloadTaken:
        t = update.type_url
        removed = set(update.removed)
        if update.complete:  # state of the world: what is absent is gone
            removed |= set(self.held(t)) - update.items.keys()
        decoded = self._decode[t].decode_all(update.items, strict=False)
        aliases = {w: o for w, o in self._aliases[t].items() if w not in removed}
        aliases.update((w, _own_name(info)) for w, info in decoded.items())
        # Gone: every resource no name carries any more (removed, or renamed in place).
        gone = set(self._aliases[t].values()) - set(aliases.values())
        state = self.state.apply(t, {_own_name(i): i for i in decoded.values()}, gone)
        seen = self._seen | {t}
        count = len(state.policies) if t == AUTHORIZATION else \
            len(state.workloads) + len(state.services)
        if ADDRESS not in seen:
            return WorkloadTaken(t, state, None, None, count, frozenset(removed), aliases)
        build = to_table(state, self.node_name, self.table, self.fastpath)
        policy = to_verdicts(state, self.node_name, self.trust_domain)
        self.on_update(build.table, policy.verdicts)
        info = {"services": len(build.table.services), "workloads": len(state.workloads),
                "policies": len(state.policies)}
        return WorkloadTaken(t, state, build, policy, count, frozenset(removed), aliases,
                             info=info)

    def commit(self, taken: WorkloadTaken) -> None:
        with self.lock:
            self.state = taken.state
            self._aliases[taken.type_url] = dict(taken.aliases)
            self._seen.add(taken.type_url)
            if taken.build is not None:
                self.table = taken.build.table
                self.translation = taken.build
                self.policy = taken.policy
        self._decode[taken.type_url].forget(taken.removed)  # its memo of decoded resources

    def pending(self) -> dict[str, str]:
        return {}
