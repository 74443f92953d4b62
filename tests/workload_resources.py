"""Workload API resources in the shape istiod sends ztunnel (Istio 1.2x ambient), built
here from the published field names, not captured: pods `Kubernetes//Pod/NS/NAME` with
their addresses as raw bytes, node, service account, locality and `services` map keyed
`namespace/hostname`; Services named `namespace/hostname` with VIPs on the default network
("") and ports; Authorizations of each scope and action in groups -> rules -> matches."""

from __future__ import annotations

import ipaddress

from google.protobuf import empty_pb2, wrappers_pb2

from accel.xds.gen.istio import security_pb2 as sec
from accel.xds.gen.istio import workload_pb2 as wl

CLUSTER = "Kubernetes"


def ipb(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def uid(ns: str, name: str) -> str:
    return f"{CLUSTER}//Pod/{ns}/{name}"


def host(name: str, ns: str) -> str:
    return f"{name}.{ns}.svc.cluster.local"


def workload(ns: str, name: str, addrs: list[str], node: str, sa: str = "",
             services: dict[str, list[tuple[int, int]]] | None = None,
             policies: list[str] | None = None, healthy: bool = True,
             zone: str = "z1", capacity: int | None = None, **kw) -> wl.Address:
    w = wl.Workload(
        uid=uid(ns, name), name=name, namespace=ns, addresses=[ipb(a) for a in addrs],
        network="", tunnel_protocol=wl.HBONE, trust_domain="cluster.local",
        service_account=sa, node=node, canonical_name=name.rsplit("-", 1)[0],
        canonical_revision="latest", workload_type=wl.POD, workload_name=name,
        authorization_policies=policies or [],
        status=wl.HEALTHY if healthy else wl.UNHEALTHY, cluster_id=CLUSTER,
        locality=wl.Locality(region="r1", zone=zone), **kw)
    for key, ports in (services or {}).items():
        w.services[key].ports.extend(wl.Port(service_port=s, target_port=t) for s, t in ports)
    if capacity is not None:
        w.capacity.CopyFrom(wrappers_pb2.UInt32Value(value=capacity))
    return wl.Address(workload=w)


def service(ns: str, name: str, vips: list[str], ports: list[tuple[int, int]],
            **kw) -> wl.Address:
    return wl.Address(service=wl.Service(
        name=name, namespace=ns, hostname=host(name, ns),
        addresses=[wl.NetworkAddress(network="", address=ipb(v)) for v in vips],
        ports=[wl.Port(service_port=s, target_port=t) for s, t in ports], **kw))


def exact(v: str) -> sec.StringMatch:
    return sec.StringMatch(exact=v)


def prefix(v: str) -> sec.StringMatch:
    return sec.StringMatch(prefix=v)


def suffix(v: str) -> sec.StringMatch:
    return sec.StringMatch(suffix=v)


def presence() -> sec.StringMatch:
    return sec.StringMatch(presence=empty_pb2.Empty())


def cidr(text: str) -> sec.Address:
    n = ipaddress.ip_network(text)
    return sec.Address(address=n.network_address.packed, length=n.prefixlen)


def authz(ns: str, name: str, scope: int, action: int, groups: list[list[list[sec.Match]]],
          dry_run: bool = False) -> sec.Authorization:
    """groups -> rules -> matches, as istiod nests from/to/when."""
    return sec.Authorization(
        name=name, namespace=ns, scope=scope, action=action, dry_run=dry_run,
        groups=[sec.Group(rules=[sec.Rules(matches=ms) for ms in rules]) for rules in groups])


# The fixture stream: namespaces "shop" and "db" on nodes n1 and n2; three Services.
NODE = "n1"


def fixture_addresses() -> list[wl.Address]:
    web = host("web", "shop")
    pg = host("pg", "db")
    return [
        workload("shop", "web-1", ["10.0.1.10", "fd00::1:10"], "n1", sa="web",
                 services={f"shop/{web}": [(80, 8080)]}, policies=["shop/web-allow-db"]),
        workload("shop", "web-2", ["10.0.1.11"], "n2", sa="web",
                 services={f"shop/{web}": [(80, 8081)]}, zone="z2"),
        workload("shop", "web-3", ["10.0.1.12"], "n2", sa="web",
                 services={f"shop/{web}": []}, healthy=False),
        workload("shop", "client-1", ["10.0.1.20"], "n1", sa="client"),
        workload("shop", "client-2", ["10.0.1.21"], "n2"),  # service account "default"
        workload("db", "pg-1", ["10.0.2.10"], "n1", sa="postgres",
                 services={f"db/{pg}": [(5432, 0)]}, policies=["db/pg-only-shop"],
                 capacity=3),
        workload("db", "pg-2", ["10.0.2.11"], "n2", sa="postgres",
                 services={f"db/{pg}": [(5432, 5433)]}),
        workload("db", "admin", ["10.0.2.30"], "n1", sa="admin"),
        service("shop", "web", ["10.96.0.10", "fd00:96::10"], [(80, 8080)]),
        service("db", "pg", ["10.96.0.20"], [(5432, 0)]),
        service("shop", "cart", ["10.96.0.30"], [(80, 80)],
                waypoint=wl.GatewayAddress(hostname=wl.NamespacedHostname(
                    namespace="shop", hostname="waypoint.shop.svc.cluster.local"),
                    hbone_mtls_port=15008)),
    ]


def fixture_authorizations() -> list[sec.Authorization]:
    A, D = sec.ALLOW, sec.DENY
    G, N, W = sec.GLOBAL, sec.NAMESPACE, sec.WORKLOAD_SELECTOR
    return [
        # mesh-wide: nobody from 192.168.0.0/16 except 192.168.7.0/24
        authz("istio-system", "deny-lab", G, D, [[[sec.Match(
            source_ips=[cidr("192.168.0.0/16")], not_source_ips=[cidr("192.168.7.0/24")])]]]),
        # db: only from namespace shop, or the admin account, to 5432; never port 22
        authz("db", "pg-only-shop", W, A, [
            [[sec.Match(namespaces=[exact("shop")]),
              sec.Match(service_accounts=[sec.ServiceAccountMatch(
                  namespace="db", service_account="admin")])],
             [sec.Match(destination_ports=[5432])]]]),
        authz("db", "no-ssh", N, D, [[[sec.Match(destination_ports=[22])]]]),
        # shop's web: principals web* (prefix) or ending /sa/client, not client-2's default
        authz("shop", "web-allow-db", W, A, [
            [[sec.Match(principals=[prefix("cluster.local/ns/shop/sa/web"),
                                    suffix("/sa/client")])]],
            [[sec.Match(namespaces=[exact("db")], not_destination_ports=[9090])]],
        ]),
        # dry run: would deny anything from 10.0.2.30/32 in shop
        authz("shop", "audit-admin", N, D, [[[sec.Match(source_ips=[cidr("10.0.2.30/32")])]]],
              dry_run=True),
        # any identity at all to fd00::1:10 (presence), not destination 10.0.1.10
        authz("shop", "v6-only", N, A, [[[sec.Match(
            principals=[presence()], destination_ips=[cidr("fd00::/16")],
            not_destination_ips=[cidr("10.0.1.10/32")])]]]),
    ]
