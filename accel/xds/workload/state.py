"""What a workload API client holds: workloads and services (the Address type) and
policies (the Authorization type) by resource name, changed a response at a time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from accel.policy.rules import Policy
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION
from accel.xds.workload.resources import ServiceInfo, WorkloadInfo


@dataclass(frozen=True)
class WorkloadState:
    workloads: Mapping[str, WorkloadInfo] = field(default_factory=dict)  # by uid
    services: Mapping[str, ServiceInfo] = field(default_factory=dict)  # "ns/hostname"
    policies: Mapping[str, Policy] = field(default_factory=dict)  # "ns/name"

    def apply(self, type_url: str, upsert: Mapping[str, WorkloadInfo | ServiceInfo | Policy],
              remove: Iterable[str] = ()) -> WorkloadState:
        """A copy with one type's resources added or replaced, and `remove`d by name (a
        name held under neither kind is ignored, as Delta xDS allows)."""
        gone = set(remove)
        if type_url == AUTHORIZATION:
            pols = {k: v for k, v in self.policies.items() if k not in gone}
            for k, v in upsert.items():
                assert isinstance(v, Policy)
                pols[k] = v
            return replace(self, policies=pols)
        assert type_url == ADDRESS, type_url
        wls = {k: v for k, v in self.workloads.items() if k not in gone}
        svcs = {k: v for k, v in self.services.items() if k not in gone}
        for k, v in upsert.items():
            # An Address may change kind under one name: drop it from the other kind.
            if isinstance(v, WorkloadInfo):
                svcs.pop(k, None)
                wls[k] = v
            else:
                assert isinstance(v, ServiceInfo)
                wls.pop(k, None)
                svcs[k] = v
        return replace(self, workloads=wls, services=svcs)
