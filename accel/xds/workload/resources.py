"""The workload API's resources, decoded and validated: what the table and the policy
compiler read of a Workload and a Service (an Authorization decodes to
accel.policy.rules.Policy)."""

from __future__ import annotations

from dataclasses import dataclass

from accel.model import IPAddress


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True)
class PortMap:
    service_port: int
    target_port: int  # 0: not given here


@dataclass(frozen=True)
class WorkloadInfo:
    uid: str
    name: str = ""
    namespace: str = ""
    addresses: tuple[IPAddress, ...] = ()
    hostname: str = ""
    network: str = ""
    service_account: str = ""  # as sent ("" means "default")
    trust_domain: str = ""  # as sent ("" means the mesh's, cluster.local)
    node: str = ""
    cluster_id: str = ""
    locality: Locality = Locality()
    healthy: bool = True
    # "namespace/hostname" of each service it is an endpoint of, with its ports there.
    services: tuple[tuple[str, tuple[PortMap, ...]], ...] = ()
    policies: tuple[str, ...] = ()  # authorization_policies: "namespace/name"
    waypoint: bool = False
    host_network: bool = False  # its addresses are shared: no identity
    capacity: int = 1  # relative weight (0: sent no traffic)

    def ports_for(self, service: str) -> tuple[PortMap, ...] | None:
        for key, ports in self.services:
            if key == service:
                return ports
        return None


# LoadBalancing as sent (istio.workload.LoadBalancing's numbers).
MODE_UNSPECIFIED, MODE_STRICT, MODE_FAILOVER, MODE_PASSTHROUGH = 0, 1, 2, 3
MODES = (MODE_UNSPECIFIED, MODE_STRICT, MODE_FAILOVER, MODE_PASSTHROUGH)
SCOPES = {1: "REGION", 2: "ZONE", 3: "SUBZONE", 4: "NODE", 5: "CLUSTER", 6: "NETWORK"}


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    namespace: str
    hostname: str
    vips: tuple[tuple[str, IPAddress], ...] = ()  # (network, address)
    ports: tuple[PortMap, ...] = ()
    waypoint: bool = False
    mode: int = MODE_UNSPECIFIED
    routing_preference: tuple[int, ...] = ()  # SCOPES keys, most important first
    allow_unhealthy: bool = False  # health_policy ALLOW_ALL (any other: only healthy)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"
