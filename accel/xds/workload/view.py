"""The workload API as an agent holds it: one call per response, all or nothing. A
response's resources are decoded and validated, the held state changed, and the table and
verdicts for this node rebuilt; a malformed resource raises ValidationError (NACK it) and
changes nothing, the last good state stays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from accel.model import ValidationError
from accel.policy.compile import Compiled
from accel.policy.rules import DEFAULT_TRUST_DOMAIN
from accel.xds.workload.decode import AddressProcessor, AuthorizationProcessor, Raw
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION
from accel.xds.workload.state import WorkloadState
from accel.xds.workload.to_table import TableBuild, to_table
from accel.xds.workload.to_verdicts import to_verdicts


@dataclass(frozen=True)
class Build:
    state: WorkloadState
    table: TableBuild  # .table (ServiceTable), .skipped, .left, .ignored
    policy: Compiled  # .verdicts (accel.policy.verdicts.Verdicts), .ignored


class WorkloadView:
    def __init__(self, node_name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN):
        self.node_name = node_name
        self.trust_domain = trust_domain
        self.processors = {ADDRESS: AddressProcessor(), AUTHORIZATION: AuthorizationProcessor()}
        self.last: Build | None = None

    @property
    def state(self) -> WorkloadState:
        return self.last.state if self.last else WorkloadState()

    def apply(self, type_url: str, upsert: Mapping[str, Raw],
              remove: Iterable[str] = ()) -> Build:
        """One response: `upsert` is name -> wire bytes (or message) of the resources it
        carries, `remove` the names it removes. Raises ValidationError, changing nothing."""
        proc = self.processors.get(type_url)
        if proc is None:
            raise ValidationError("type_url", f"{type_url!r} is not a workload API type")
        remove = tuple(remove)
        decoded = proc.decode_all(upsert)
        proc.forget(remove)
        return self._build(self.state.apply(type_url, decoded, remove))

    def _build(self, state: WorkloadState) -> Build:
        previous = self.last.table.table if self.last else None
        built = Build(state, to_table(state, self.node_name, previous),
                      to_verdicts(state, self.node_name, self.trust_domain))
        self.last = built
        return built
