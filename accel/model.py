"""The service table: the one model the agent, the controller and the datapath speak.

Everything is immutable and validated on construction, so a ServiceTable that exists
is a table the datapath can load. Errors name the service and the field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS = ("TCP", "UDP")
MAX_WEIGHT = 65535


class ValidationError(ValueError):
    """Bad input. `path` names the offending field, e.g. services[reviews].endpoints[1].port."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def parse_address(value: object, path: str) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str) or not value:
        raise ValidationError(path, f"expected an IPv4 or IPv6 address, got {value!r}")
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValidationError(path, f"{value!r} is not a valid IPv4 or IPv6 address") from None


def parse_network(value: object, path: str) -> IPNetwork:
    if not isinstance(value, str) or not value:
        raise ValidationError(path, f"expected a CIDR such as 10.0.0.0/8, got {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValidationError(path, f"{value!r} is not a valid CIDR") from None


def check_port(value: object, path: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(path, f"expected an integer port, got {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ValidationError(path, f"port {value} is out of range {low}-65535")
    return value


def check_int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(path, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ValidationError(path, f"{value} is out of range {low}-{high}")
    return value


def check_name(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(path, "a non-empty name is required")
    if len(value) > 253:
        raise ValidationError(path, "name is longer than 253 characters")
    return value


def mapped(addr: IPAddress) -> ipaddress.IPv6Address:
    """IPv4 as v4-mapped IPv6: the datapath keys every address as 16 bytes."""
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address("::ffff:" + str(addr))
    return addr


@dataclass(frozen=True, order=True)
class Endpoint:
    address: IPAddress
    port: int
    weight: int = 1
    healthy: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", parse_address(self.address, "address"))
        check_port(self.port, "port")
        check_int(self.weight, "weight", 1, MAX_WEIGHT)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


def _endpoint_order(ep: Endpoint) -> tuple:
    # IPv4 and IPv6 addresses do not compare with each other: order by version first.
    return (ep.address.version, ep.address, ep.port, ep.weight, ep.healthy)


@dataclass(frozen=True)
class Service:
    name: str
    vip: IPAddress
    port: int
    protocol: str = "TCP"
    endpoints: tuple[Endpoint, ...] = ()
    edge: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        object.__setattr__(self, "vip", parse_address(self.vip, "vip"))
        check_port(self.port, "port")
        if self.protocol not in PROTOCOLS:
            raise ValidationError("protocol", f"{self.protocol!r} is not one of {PROTOCOLS}")
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        seen: set[tuple[IPAddress, int]] = set()
        for i, ep in enumerate(self.endpoints):
            if (ep.address, ep.port) in seen:
                raise ValidationError(f"endpoints[{i}]", f"duplicate endpoint {ep}")
            seen.add((ep.address, ep.port))
            if ep.address == self.vip and ep.port == self.port:
                raise ValidationError(f"endpoints[{i}]", "an endpoint may not be its own VIP:port")

    @property
    def key(self) -> tuple[IPAddress, int, str]:
        return (self.vip, self.port, self.protocol)

    @property
    def usable_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.endpoints if ep.healthy)


@dataclass(frozen=True)
class Guard:
    """Flood guard for the XDP edge: CIDRs denied outright and a per-source SYN budget."""

    deny: tuple[IPNetwork, ...] = ()
    syn_rate: int = 0  # SYNs per second per source; 0 disables the limit
    syn_burst: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "deny", tuple(self.deny))
        check_int(self.syn_rate, "syn_rate", 0, 10_000_000)
        check_int(self.syn_burst, "syn_burst", 0, 100_000_000)
        if self.syn_rate and self.syn_burst < 1:
            raise ValidationError("syn_burst", "must be >= 1 when syn_rate is set")


@dataclass(frozen=True)
class ServiceTable:
    services: tuple[Service, ...] = ()
    # Extra prefixes whose sockets count as mesh sockets (pod CIDRs, loopback for sidecar hops).
    mesh_cidrs: tuple[IPNetwork, ...] = ()
    guard: Guard = field(default_factory=Guard)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "mesh_cidrs", tuple(self.mesh_cidrs))
        names: dict[str, int] = {}
        keys: dict[tuple[IPAddress, int, str], str] = {}
        for svc in self.services:
            where = f"services[{svc.name}]"
            if svc.name in names:
                raise ValidationError(where, "duplicate service name")
            names[svc.name] = 1
            if svc.key in keys:
                raise ValidationError(
                    where,
                    f"{svc.vip}:{svc.port}/{svc.protocol} is already used by service "
                    f"{keys[svc.key]!r}",
                )
            keys[svc.key] = svc.name

    @classmethod
    def of(cls, services: Iterable[Service], **kw: object) -> ServiceTable:
        return cls(services=tuple(services), **kw)  # type: ignore[arg-type]

    def by_name(self) -> dict[str, Service]:
        return {s.name: s for s in self.services}

    def endpoint_addresses(self) -> set[IPAddress]:
        return {ep.address for s in self.services for ep in s.endpoints}

    def vips(self) -> set[IPAddress]:
        return {s.vip for s in self.services}

    def canonical(self) -> ServiceTable:
        """Order-independent form: two tables that mean the same compare equal."""
        services = tuple(
            sorted(
                (
                    Service(s.name, s.vip, s.port, s.protocol,
                            tuple(sorted(s.endpoints, key=_endpoint_order)), s.edge)
                    for s in self.services
                ),
                key=lambda s: s.name,
            )
        )
        return ServiceTable(
            services=services,
            mesh_cidrs=tuple(sorted(self.mesh_cidrs, key=lambda n: (n.version, str(n)))),
            guard=Guard(
                tuple(sorted(self.guard.deny, key=lambda n: (n.version, str(n)))),
                self.guard.syn_rate,
                self.guard.syn_burst,
            ),
        )
