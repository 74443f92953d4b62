"""The service table: the one model the agent, the controller and the datapath speak.

Everything is immutable and validated on construction, so a ServiceTable that exists
is a table the datapath can load. Errors name the service and the field.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from accel.policy.rules import DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT, Policy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS = ("TCP", "UDP")
# How a service's connections between two local sockets travel once established:
# "route": TCP (balanced at connect(), pod-routed past the bridge): every socket call
# behaves exactly as on TCP; "redirect": each send handed socket to socket (sk_msg),
# faster, with the gaps README lists (splice, MSG_OOB, blocking reads' wake-ups).
FASTPATHS = ("route", "redirect")
DEFAULT_FASTPATH = "route"
MAX_WEIGHT = 65535
# A service's port 0: the VIP on every port (a transparent proxy's chain matching a VIP/32
# without a destination port: Consul's upstreams). Each connection goes to an endpoint at
# the endpoint's own port; a service on the same VIP and a concrete port is looked up first.
ANY_PORT = 0
T = TypeVar("T")


class ValidationError(ValueError):
    """Bad input. `path` names the offending field, e.g. services[reviews].endpoints[1].port."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def parse_address(value: object, path: str) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return plain_address(value, path)
    if not isinstance(value, str) or not value:
        raise ValidationError(path, f"expected an IPv4 or IPv6 address, got {value!r}")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValidationError(path, f"{value!r} is not a valid IPv4 or IPv6 address") from None
    return plain_address(addr, path)


def plain_address(addr: IPAddress, path: str) -> IPAddress:
    """One spelling per datapath key. The kernel keys every address as 16 bytes, so
    ::ffff:10.0.0.1 and 10.0.0.1 are the same VIP or endpoint there: they must be the same
    here too, or two services could share one map entry. A zone (fe80::1%eth0) is not part
    of the key at all, so it cannot be honoured."""
    if addr.version == 6:
        if addr.scope_id:  # type: ignore[union-attr]
            raise ValidationError(path, f"{addr} has a zone; the datapath matches addresses "
                                  "only, not interfaces")
        v4 = addr.ipv4_mapped  # type: ignore[union-attr]
        if v4 is not None:
            return v4
    return addr


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
    if not value.isascii():
        try:  # YAML's "\ud800" makes a lone surrogate: no protobuf, log or label can carry it
            value.encode()
        except UnicodeEncodeError:
            raise ValidationError(path, f"{value!r} is not valid Unicode") from None
    bad = _bad_name_char(value)
    if bad is not None:
        raise ValidationError(path, f"{value!r} holds {bad}; names must be printable text")
    return value


# Characters a name may not hold: control characters (an escape sequence in a name rewrites
# the terminal that prints `accel services`), invisible format characters such as bidi
# overrides (U+202E shows "abc" for "cba") and line or paragraph separators.
_BAD_NAME_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible formatting "
                        "character (bidi override, zero-width, ...)", "Zl": "a line separator",
                        "Zp": "a paragraph separator"}


def _bad_name_char(value: str) -> str | None:
    if value.isprintable():  # the common case, one C pass: no Cc, Cf, Zl or Zp in it
        return None
    for ch in value:
        what = _BAD_NAME_CATEGORIES.get(unicodedata.category(ch))
        if what is not None:
            return f"U+{ord(ch):04X} ({what})"
    return None


def check_fastpath(value: object, path: str) -> str:
    if value not in FASTPATHS:
        raise ValidationError(path, f"expected one of {', '.join(FASTPATHS)}, got {value!r}")
    return value  # type: ignore[return-value]


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def check_vip(addr: IPAddress, path: str) -> IPAddress:
    """A VIP is an address clients dial, matched at connect() in every pod: never an address
    that means "any", "everyone" or "this host"."""
    if addr.is_unspecified:
        why = "the unspecified address (any address), which no client dials"
    elif addr.version == 4 and addr == _BROADCAST:
        why = "the broadcast address"
    elif addr.is_multicast:
        why = "a multicast address"
    elif addr.is_loopback:
        why = ("a loopback address: every pod's own connections to it, on that port, would "
               "be sent to the endpoints")
    else:
        return addr
    raise ValidationError(path, f"{addr} cannot be a service VIP: it is {why}")


def mapped(addr: IPAddress) -> ipaddress.IPv6Address:
    """IPv4 as v4-mapped IPv6: the datapath keys every address as 16 bytes."""
    if isinstance(addr, ipaddress.IPv4Address):
        # ::ffff:a.b.c.d by arithmetic: a string round trip costs seconds at 100,000 endpoints.
        return ipaddress.IPv6Address(0xFFFF_0000_0000 | int(addr))
    return addr


@dataclass(frozen=True, order=True)
class Endpoint:
    address: IPAddress
    port: int
    weight: int = 1
    healthy: bool = True
    # The workload behind the address, as policies name it (Istio's terms): its identity
    # (namespace, service account), and a name and labels selectors pick it by.
    namespace: str = DEFAULT_NAMESPACE
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    name: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", parse_address(self.address, "address"))
        check_port(self.port, "port")
        check_int(self.weight, "weight", 1, MAX_WEIGHT)
        check_name(self.namespace, "namespace")
        check_name(self.service_account, "service_account")
        if self.name:
            check_name(self.name, "name")
        object.__setattr__(self, "labels", tuple(sorted(self.labels)))

    @classmethod
    def trusted(cls, address: IPAddress, port: int, weight: int = 1,
                healthy: bool = True) -> Endpoint:
        """An endpoint of fields its decoder already checked (a plain address, a port in
        range, a weight within MAX_WEIGHT), with the default identity: the checks cost
        half a second over the 100,000 endpoints of a large mesh's full sync."""
        ep = object.__new__(cls)
        ep.__dict__.update(address=address, port=port, weight=weight, healthy=healthy,
                           namespace=DEFAULT_NAMESPACE,
                           service_account=DEFAULT_SERVICE_ACCOUNT, name="", labels=())
        return ep

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


_SI = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}
_BANDWIDTH_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bit/s)?\s*$", re.IGNORECASE)
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_PER = {"s": 1, "m": 60, "h": 3600}
MAX_BANDWIDTH = 400 * 1000**3  # bit/s: beyond any NIC; keeps bytes/s well inside 64 bits
MAX_CONNECTION_RATE = 10_000_000.0  # per second
MIN_CONNECTION_RATE = 1 / 86400  # one a day: the bucket's refill interval fits 64-bit ns
MAX_BURST = 1_000_000


def parse_bandwidth(value: object, path: str) -> int:
    """bit/s from 200Mbit, 1.5Gbit, 500k, 1000000 (decimal k/M/G, as tc and Kubernetes'
    bandwidth annotations write them). Bytes are refused: tc reads `mbps` as megaBYTES."""
    if isinstance(value, bool):
        raise ValidationError(path, f"expected a rate such as 200Mbit, got {value!r}")
    if isinstance(value, int):
        bits = value
    else:
        m = _BANDWIDTH_RE.match(value) if isinstance(value, str) else None
        if not m:
            raise ValidationError(path, f"expected a rate in bit/s such as 50Mbit, 1.5Gbit or "
                                  f"500k, got {value!r}")
        bits = int(float(m.group(1)) * _SI[m.group(2).lower()])
    if not 1000 <= bits <= MAX_BANDWIDTH:
        raise ValidationError(path, f"{value!r} is out of range 1kbit-400Gbit")
    return bits


def parse_connection_rate(value: object, path: str) -> float:
    """New connections per second from 100/s, 30/m, 2/h or a number (per second)."""
    if isinstance(value, bool):
        raise ValidationError(path, f"expected a rate such as 100/s, got {value!r}")
    if isinstance(value, int | float):
        rate = float(value)
    else:
        m = _RATE_RE.match(value) if isinstance(value, str) else None
        if not m:
            raise ValidationError(path, f"expected connections per second, minute or hour "
                                  f"such as 100/s or 30/m, got {value!r}")
        rate = float(m.group(1)) / _PER[m.group(2)]
    if not MIN_CONNECTION_RATE <= rate <= MAX_CONNECTION_RATE:
        raise ValidationError(path, f"{value!r} is out of range 1/day-{MAX_CONNECTION_RATE:.0f}/s")
    return rate


def bandwidth_text(bits: int) -> str:
    for suffix, mult in (("Gbit", 1000**3), ("Mbit", 1000**2), ("kbit", 1000)):
        if bits % mult == 0:
            return f"{bits // mult}{suffix}"
    return f"{bits}bit"


def rate_text(rate: float) -> str:
    for unit, per in (("s", 1), ("m", 60), ("h", 3600)):
        n = rate * per
        if abs(n - round(n)) < 1e-9 * max(1.0, n):
            return f"{round(n)}/{unit}"
    return f"{rate!r}/s"  # exact: reads back as the same float


@dataclass(frozen=True)
class Limits:
    """A service's QoS. `bandwidth`: bit/s, the aggregate clients on this host send to the
    service's endpoints (0: unlimited); `connections`: new connections per second through
    the VIP (0: unlimited), a token bucket holding up to `burst` connections."""

    bandwidth: int = 0
    connections: float = 0.0
    burst: int = 0

    def __post_init__(self) -> None:
        if self.bandwidth:
            parse_bandwidth(self.bandwidth, "bandwidth")
        if self.connections:
            object.__setattr__(self, "connections",
                               parse_connection_rate(self.connections, "connections"))
            if not self.burst:  # one second's worth, at least one connection
                object.__setattr__(self, "burst", max(1, math.ceil(self.connections)))
            check_int(self.burst, "burst", 1, MAX_BURST)
        elif self.burst:
            raise ValidationError("burst", "a burst needs a connection rate (connections)")

    def __bool__(self) -> bool:
        return bool(self.bandwidth or self.connections)

    def to_dict(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {}
        if self.bandwidth:
            out["bandwidth"] = bandwidth_text(self.bandwidth)
        if self.connections:
            out["connections"] = rate_text(self.connections)
            out["burst"] = self.burst
        return out


NO_LIMITS = Limits()


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
    fastpath: str = DEFAULT_FASTPATH
    limits: Limits = NO_LIMITS  # QoS (accel/datapath/qos.py)

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check_fastpath(self.fastpath, "fastpath")
        if not isinstance(self.limits, Limits):
            raise ValidationError("limits", f"expected Limits, got {self.limits!r}")
        object.__setattr__(self, "vip", check_vip(parse_address(self.vip, "vip"), "vip"))
        check_port(self.port, "port", allow_zero=True)  # ANY_PORT: every port of the VIP
        if self.edge and self.port == ANY_PORT:
            raise ValidationError("edge", "the XDP edge balances a VIP:port; a service on "
                                  "every port of its VIP cannot be an edge service")
        if self.protocol not in PROTOCOLS:
            raise ValidationError("protocol", f"{self.protocol!r} is not one of {PROTOCOLS}")
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        seen: set[tuple[int, int, int]] = set()  # by int: ipaddress hashes via hex()
        for i, ep in enumerate(self.endpoints):
            key = (int(ep.address), ep.address.version, ep.port)
            if key in seen:
                raise ValidationError(f"endpoints[{i}]", f"duplicate endpoint {ep}")
            seen.add(key)
            if ep.address == self.vip and self.port in (ep.port, ANY_PORT):
                raise ValidationError(f"endpoints[{i}]", "an endpoint may not be its own VIP:port")

    @property
    def key(self) -> tuple[IPAddress, int, str]:
        return (self.vip, self.port, self.protocol)

    @property
    def usable_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.endpoints if ep.healthy)

    def canonical(self) -> Service:
        """Endpoints in a fixed order: two services that mean the same compare equal."""
        return Service(self.name, self.vip, self.port, self.protocol,
                       tuple(sorted(self.endpoints, key=_endpoint_order)), self.edge,
                       self.fastpath, self.limits)

    def derived(self, key: str, make: Callable[[Service], T]) -> T:
        """`make(self)`, computed once per Service object (slot runs, address sets): a service
        is immutable, so a table that reuses unchanged Service objects costs nothing to
        re-derive. The cache lives beside the fields, out of equality and hashing."""
        cache: dict[str, Any] = self.__dict__.setdefault("_derived", {})
        try:
            return cache[key]
        except KeyError:
            value = cache[key] = make(self)
            return value


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
class TableDelta:
    """The services two tables do not share, as objects: `added` are in the new table but not
    (as that very object) in the old one, `removed` the reverse; a service replaced under its
    name is in both. Map writers apply these alone and skip everything else."""

    added: tuple[Service, ...] = ()
    removed: tuple[Service, ...] = ()


_NO_BASE: tuple[Callable[[], ServiceTable | None] | None, TableDelta] = (None, TableDelta())


@dataclass(frozen=True)
class ServiceTable:
    services: tuple[Service, ...] = ()
    # Extra prefixes whose sockets count as mesh sockets (pod CIDRs, loopback for sidecar hops).
    mesh_cidrs: tuple[IPNetwork, ...] = ()
    guard: Guard = field(default_factory=Guard)
    # The fast path of mesh connections dialed straight to a mesh address (not a VIP).
    fastpath: str = DEFAULT_FASTPATH
    # L4 authorization (Istio AuthorizationPolicy terms) over the endpoints' identities.
    policies: tuple[Policy, ...] = ()

    # Out of equality and repr: the indexes validation builds anyway, kept so that derive()
    # validates only what changes (name -> position; (vip, port, protocol) -> name), and for
    # a derived table the table it came from (weakly: no chain of old tables) and the change.
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _keys: dict[tuple[IPAddress, int, str], str] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _base: tuple[Callable[[], ServiceTable | None] | None, TableDelta] = field(
        default=_NO_BASE, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "mesh_cidrs", tuple(self.mesh_cidrs))
        object.__setattr__(self, "policies", tuple(self.policies))
        check_fastpath(self.fastpath, "fastpath")
        policy_keys: set[str] = set()
        for p in self.policies:
            if p.key in policy_keys:
                raise ValidationError(f"policies[{p.name}]", f"policy {p.key} is defined twice")
            policy_keys.add(p.key)
        names: dict[str, int] = {}
        keys: dict[tuple[IPAddress, int, str], str] = {}
        for i, svc in enumerate(self.services):
            where = f"services[{svc.name}]"
            if svc.name in names:
                raise ValidationError(where, "duplicate service name")
            names[svc.name] = i
            if svc.key in keys:
                raise ValidationError(where, _key_clash(svc, keys[svc.key]))
            keys[svc.key] = svc.name
        object.__setattr__(self, "_index", names)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_base", _NO_BASE)

    @classmethod
    def of(cls, services: Iterable[Service], **kw: object) -> ServiceTable:
        return cls(services=tuple(services), **kw)  # type: ignore[arg-type]

    def by_name(self) -> dict[str, Service]:
        return {s.name: s for s in self.services}

    def get(self, name: str) -> Service | None:
        i = self._index.get(name)
        return None if i is None else self.services[i]

    def service_at(self, vip: IPAddress, port: int, protocol: str) -> Service | None:
        """The service on VIP:port/protocol, from the index (no pass over the services)."""
        name = self._keys.get((vip, port, protocol))
        return None if name is None else self.get(name)

    def derive(
        self,
        upsert: Iterable[Service] = (),
        remove: Iterable[str] = (),
        mesh_cidrs: Iterable[IPNetwork] | None = None,
        guard: Guard | None = None,
    ) -> ServiceTable:
        """This table with services added or replaced (by name) and removed (by name),
        validating only those against the rest: one changed service among 10,000 costs
        microseconds instead of a full validation. Services keep their places; new ones come
        last. Raises ValidationError, like the constructor, on a name or VIP:port clash."""
        new = list(upsert)
        remove = tuple(remove)
        if not remove and mesh_cidrs is None and guard is None:
            simple = self._replace_in_place(new)
            if simple is not None:
                return simple
        services: list[Service | None] = list(self.services)
        index: dict[str, int] = dict(self._index)
        keys: dict[tuple[IPAddress, int, str], str] = dict(self._keys)
        added: list[Service] = []
        removed: list[Service] = []
        holes = False
        for name in remove:
            i = index.pop(name, None)
            if i is not None:
                holes = True
                old = services[i]
                assert old is not None
                services[i] = None
                del keys[old.key]
                removed.append(old)
        seen: set[str] = set()
        for svc in new:  # first free the keys of replaced services: two may swap VIPs
            if svc.name in seen:
                raise ValidationError(f"services[{svc.name}]", "duplicate service name")
            seen.add(svc.name)
            i = index.get(svc.name)
            old = services[i] if i is not None else None
            if old is not None and old is not svc:
                del keys[old.key]
        for svc in new:
            i = index.get(svc.name)
            old = services[i] if i is not None else None
            if old is svc:
                continue
            if svc.key in keys:
                raise ValidationError(f"services[{svc.name}]", _key_clash(svc, keys[svc.key]))
            keys[svc.key] = svc.name
            if i is None:
                index[svc.name] = len(services)
                services.append(svc)
            else:
                assert old is not None
                services[i] = svc
                removed.append(old)
            added.append(svc)
        kept: tuple[Service, ...]
        if holes:  # removals shift positions: one pass, only when something went
            kept = tuple(s for s in services if s is not None)
            index = {s.name: i for i, s in enumerate(kept)}
        else:
            kept = tuple(services)  # type: ignore[arg-type]
        return self._derived(kept, self.mesh_cidrs if mesh_cidrs is None else tuple(mesh_cidrs),
                             self.guard if guard is None else guard, index, keys,
                             TableDelta(tuple(added), tuple(removed)))

    def _replace_in_place(self, new: list[Service]) -> ServiceTable | None:
        """derive() when every service replaces one of the same name and VIP:port (an
        endpoint change, the common case): nothing can clash and the indexes are shared."""
        services = list(self.services)
        added, removed = [], []
        for svc in new:
            i = self._index.get(svc.name)
            if i is None or services[i].key != svc.key or services[i] is not self.services[i]:
                return None  # new, moved to another VIP:port, or named twice: the full path
            if services[i] is not svc:
                removed.append(services[i])
                added.append(svc)
                services[i] = svc
        return self._derived(tuple(services), self.mesh_cidrs, self.guard, self._index,
                             self._keys, TableDelta(tuple(added), tuple(removed)))

    def _derived(self, services: tuple[Service, ...], mesh_cidrs: tuple[IPNetwork, ...],
                 guard: Guard, index: dict[str, int],
                 keys: dict[tuple[IPAddress, int, str], str], delta: TableDelta) -> ServiceTable:
        # Validated by the caller: bypass __init__ (and its full validation). The index
        # dicts are never changed once a table has them, so tables may share them.
        table = object.__new__(ServiceTable)
        object.__setattr__(table, "services", services)
        object.__setattr__(table, "mesh_cidrs", mesh_cidrs)
        object.__setattr__(table, "guard", guard)
        object.__setattr__(table, "fastpath", self.fastpath)
        object.__setattr__(table, "policies", self.policies)
        object.__setattr__(table, "_index", index)
        object.__setattr__(table, "_keys", keys)
        object.__setattr__(table, "_base", (weakref.ref(self), delta))
        return table

    def delta(self, old: ServiceTable | None) -> TableDelta:
        """The services this table does not share with `old` (None: all of them are new), by
        object identity. Free when either was derived from the other; otherwise one pass."""
        if old is None:
            return TableDelta(self.services, ())
        if old is self:
            return TableDelta()
        ref, d = self._base
        if ref is not None and ref() is old:
            return d
        ref, d = old._base
        if ref is not None and ref() is self:  # asked the other way round
            return TableDelta(d.removed, d.added)
        mine: dict[str, int] = self._index
        theirs: dict[str, int] = old._index
        added = tuple(s for s in self.services
                      if (i := theirs.get(s.name)) is None or old.services[i] is not s)
        removed = tuple(s for s in old.services
                        if (i := mine.get(s.name)) is None or self.services[i] is not s)
        return TableDelta(added, removed)

    def equivalent(self, other: ServiceTable) -> bool:
        """Same as canonical() == other.canonical(), but only the services the two tables do
        not share are canonicalised."""
        if self is other:
            return True
        if len(self.services) != len(other.services) or \
                self._settings() != other._settings():
            return False
        d = self.delta(other)
        return {s.name: s.canonical() for s in d.added} == \
            {s.name: s.canonical() for s in d.removed}

    def _settings(self) -> tuple[tuple[IPNetwork, ...], Guard, str, tuple[Policy, ...]]:
        def order(n: IPNetwork) -> tuple[int, str]:
            return (n.version, str(n))

        g = self.guard
        return (tuple(sorted(self.mesh_cidrs, key=order)),
                Guard(tuple(sorted(g.deny, key=order)), g.syn_rate, g.syn_burst), self.fastpath,
                tuple(sorted(self.policies, key=lambda p: p.key)))

    def endpoint_addresses(self) -> set[IPAddress]:
        return {ep.address for s in self.services for ep in s.endpoints}

    def vips(self) -> set[IPAddress]:
        return {s.vip for s in self.services}

    def canonical(self) -> ServiceTable:
        """Order-independent form: two tables that mean the same compare equal."""
        services = tuple(sorted((s.canonical() for s in self.services), key=lambda s: s.name))
        cidrs, guard, fastpath, policies = self._settings()
        return ServiceTable(services=services, mesh_cidrs=cidrs, guard=guard, fastpath=fastpath,
                            policies=policies)


def port_text(port: int) -> str:
    """A service port as people read it: ANY_PORT is "*"."""
    return "*" if port == ANY_PORT else str(port)


def _key_clash(svc: Service, other: str) -> str:
    return f"{svc.vip}:{port_text(svc.port)}/{svc.protocol} is already used by service {other!r}"


def endpoint_loops(services: Sequence[Service]) -> Iterator[tuple[Service, int, Service]]:
    """(service, endpoint index, other service) for each endpoint that is another service's
    VIP:port: a connection is balanced once, at connect(), so it would be sent on to a VIP
    that no backend answers on (and two services naming each other would be a loop).
    A service's own VIP:port is refused by Service itself. A service on every port of a VIP
    (ANY_PORT) catches an endpoint on that VIP at any port."""
    by_key = {s.key: s for s in services}
    # By (int, version): an ipaddress object's hash goes through hex(), ~1 us each, and
    # this runs over every endpoint of a 100,000-endpoint table.
    vips = {(int(s.vip), s.vip.version) for s in services}
    for svc in services:
        for i, ep in enumerate(svc.endpoints):
            if (int(ep.address), ep.address.version) in vips:
                other = by_key.get((ep.address, ep.port, svc.protocol)) or \
                    by_key.get((ep.address, ANY_PORT, svc.protocol))
                if other is not None and other is not svc:
                    yield svc, i, other
