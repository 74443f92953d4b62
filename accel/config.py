"""mesh.yaml <-> ServiceTable.

Errors name the service and the field, e.g.
``services[reviews].endpoints[1].port: port 70000 is out of range 1-65535``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from accel.model import (
    DEFAULT_FASTPATH,
    NO_LIMITS,
    PROTOCOLS,
    Endpoint,
    Guard,
    Limits,
    Service,
    ServiceTable,
    ValidationError,
    check_fastpath,
    check_name,
    check_port,
    check_vip,
    endpoint_loops,
    parse_address,
    parse_bandwidth,
    parse_connection_rate,
    parse_network,
)
from accel.policy.rules import DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT

# The largest mesh.yaml read, checked before a byte is parsed: parsing costs seconds of CPU
# and ~100 bytes of memory per byte of YAML. 8 MiB holds the default capacity (10,000
# services, 100,000 endpoints) written out in full; ACCEL_MAX_CONFIG_BYTES raises it.
MAX_CONFIG_BYTES = 8 << 20
MAX_CONFIG_ENV = "ACCEL_MAX_CONFIG_BYTES"

SERVICE_KEYS = {"name", "vip", "port", "protocol", "endpoints", "edge", "fastpath", "limits"}
LIMITS_KEYS = {"bandwidth", "connections", "burst"}
ENDPOINT_KEYS = {"address", "port", "weight", "healthy", "namespace", "service_account", "name",
                 "labels"}
TOP_KEYS = {"services", "guard", "mesh_cidrs", "fastpath", "policies"}
GUARD_KEYS = {"deny", "syn_rate", "syn_burst"}


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping naming one key twice: YAML says keys are unique, and
    PyYAML would silently keep the last (a second `vip:` replacing the first unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: explicit keys may override merged ones
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: SafeConstructor says so below
                if first is not key_node:
                    shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."
                    raise ValidationError("config", f"duplicate key {shown} at "
                                          f"{_at(key_node)} (first at {_at(first)}): each key "
                                          "may appear once in a mapping")
        return super().construct_mapping(node, deep=deep)


def _at(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _within(prefix: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ValidationError as e:
        path = f"{prefix}.{e.path}" if e.path else prefix
        raise ValidationError(path, e.reason) from None
    except TypeError as e:
        raise ValidationError(prefix, str(e)) from None


def _mapping(value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(path, f"expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        raise ValidationError(path, f"unknown field(s) {', '.join(unknown)}; allowed: "
                              f"{', '.join(sorted(allowed))}")
    return value


def _required(d: dict[str, Any], key: str, path: str) -> Any:
    if key not in d or d[key] is None:
        raise ValidationError(f"{path}.{key}", "missing required field")
    return d[key]


def parse_endpoint(raw: Any, path: str) -> Endpoint:
    d = _mapping(raw, path, ENDPOINT_KEYS)
    healthy = d.get("healthy", True)
    if not isinstance(healthy, bool):
        raise ValidationError(f"{path}.healthy", f"expected true or false, got {healthy!r}")
    labels = d.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise ValidationError(f"{path}.labels", "expected a mapping of strings to strings")
    return _within(
        path,
        Endpoint,
        address=str(_required(d, "address", path)),
        port=_required(d, "port", path),
        weight=d.get("weight", 1),
        healthy=healthy,
        namespace=d.get("namespace", DEFAULT_NAMESPACE),
        service_account=d.get("service_account", DEFAULT_SERVICE_ACCOUNT),
        name=d.get("name", ""),
        labels=tuple(labels.items()),
    )


def parse_service(raw: Any, index: int, fastpath: str = DEFAULT_FASTPATH) -> Service:
    """One service; `fastpath` is the file's default for a service that names none."""
    where = f"services[{index}]"
    # By name only when it is a valid one: a 64 KiB "name" would make every message (and the
    # API's error trailer) 64 KiB long, a lone surrogate would make it unsendable.
    try:
        where = f"services[{check_name(raw.get('name'), '')}]"
    except (ValidationError, AttributeError):
        pass
    d = _mapping(raw, where, SERVICE_KEYS)
    _within(where, check_name, _required(d, "name", where), "name")
    protocol = str(d.get("protocol", "TCP")).upper()
    if protocol not in PROTOCOLS:
        raise ValidationError(f"{where}.protocol", f"{d.get('protocol')!r} is not one of "
                              f"{', '.join(PROTOCOLS)}")
    raw_eps = d.get("endpoints") or []
    if not isinstance(raw_eps, list):
        raise ValidationError(f"{where}.endpoints", "expected a list of endpoints")
    endpoints = tuple(parse_endpoint(e, f"{where}.endpoints[{i}]") for i, e in enumerate(raw_eps))
    edge = d.get("edge", False)
    if not isinstance(edge, bool):
        raise ValidationError(f"{where}.edge", f"expected true or false, got {edge!r}")
    fastpath = check_fastpath(d.get("fastpath", fastpath), f"{where}.fastpath")
    # Checked here, in the order Service checks them (name, fastpath, vip, port): a file (or
    # the API) names its port; port 0 (ANY_PORT, every port of the VIP) is what only a
    # controller's transparent chain means (xDS).
    vip = str(_required(d, "vip", where))
    _within(where, lambda v: check_vip(parse_address(v, "vip"), "vip"), vip)
    _within(where, check_port, _required(d, "port", where), "port")
    return _within(
        where,
        Service,
        name=d["name"],
        vip=vip,
        port=d["port"],
        protocol=protocol,
        endpoints=endpoints,
        edge=edge,
        fastpath=fastpath,
        limits=parse_limits(d.get("limits"), f"{where}.limits"),
    )


def parse_limits(raw: Any, path: str) -> Limits:
    """`limits: {bandwidth: 200Mbit, connections: 100/s, burst: 20}`; each key optional."""
    if raw is None:
        return NO_LIMITS
    d = _mapping(raw, path, LIMITS_KEYS)
    bandwidth = d.get("bandwidth")
    connections = d.get("connections")
    return _within(path, Limits,
                   bandwidth=0 if bandwidth is None else
                   parse_bandwidth(bandwidth, f"{path}.bandwidth"),
                   connections=0.0 if connections is None else
                   parse_connection_rate(connections, f"{path}.connections"),
                   burst=d.get("burst") or 0)


def parse_guard(raw: Any) -> Guard:
    if raw is None:
        return Guard()
    d = _mapping(raw, "guard", GUARD_KEYS)
    deny_raw = d.get("deny") or []
    if not isinstance(deny_raw, list):
        raise ValidationError("guard.deny", "expected a list of CIDRs")
    deny = tuple(parse_network(c, f"guard.deny[{i}]") for i, c in enumerate(deny_raw))
    return _within("guard", Guard, deny=deny, syn_rate=d.get("syn_rate", 0),
                   syn_burst=d.get("syn_burst", d.get("syn_rate", 0)))


def table_from_dict(doc: Any) -> ServiceTable:
    if doc is None:
        doc = {}
    d = _mapping(doc, "config", TOP_KEYS)
    raw_services = d.get("services") or []
    if not isinstance(raw_services, list):
        raise ValidationError("services", "expected a list of services")
    fastpath = check_fastpath(d.get("fastpath", DEFAULT_FASTPATH), "fastpath")
    services = [parse_service(s, i, fastpath) for i, s in enumerate(raw_services)]
    for svc, i, other in endpoint_loops(services):
        raise ValidationError(f"services[{svc.name}].endpoints[{i}]", f"{svc.endpoints[i]} is "
                              f"the VIP:port of service {other.name!r}; endpoints must be "
                              "backends, not VIPs")
    cidrs_raw = d.get("mesh_cidrs") or []
    if not isinstance(cidrs_raw, list):
        raise ValidationError("mesh_cidrs", "expected a list of CIDRs")
    cidrs = tuple(parse_network(c, f"mesh_cidrs[{i}]") for i, c in enumerate(cidrs_raw))
    guard = parse_guard(d.get("guard"))
    check_identities(services)
    from accel.policy.meshyaml import parse_policies  # it reads mesh.yaml with this module

    policies = parse_policies(d.get("policies"))
    return ServiceTable(services=tuple(services), mesh_cidrs=cidrs, guard=guard,
                        fastpath=fastpath, policies=policies)


def check_identities(services: list[Service]) -> None:
    """An address is one workload: every endpoint at it must say the same namespace,
    service account, name and labels (policy cannot tell two workloads of one address)."""
    first: dict[object, tuple[str, int, Endpoint]] = {}
    for svc in services:
        for i, ep in enumerate(svc.endpoints):
            seen = first.setdefault(ep.address, (svc.name, i, ep))
            _, _, other = seen
            for f in ("namespace", "service_account", "name", "labels"):
                if getattr(ep, f) != getattr(other, f):
                    raise ValidationError(
                        f"services[{svc.name}].endpoints[{i}].{f}",
                        f"{getattr(ep, f)!r}, but services[{seen[0]}].endpoints[{seen[1]}] "
                        f"at the same address {ep.address} says {getattr(other, f)!r}: an "
                        "address is one workload")


def max_config_bytes() -> int:
    raw = os.environ.get(MAX_CONFIG_ENV, "")
    if not raw:
        return MAX_CONFIG_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise ValidationError(MAX_CONFIG_ENV, f"{raw!r}: expected a size in bytes")
    return int(raw)


def _too_big(size: int, limit: int, where: str = "config") -> ValidationError:
    return ValidationError(where, f"{size:,} bytes is over the limit of {limit:,} bytes "
                           f"({limit / (1 << 20):g} MiB), which is checked before parsing: split "
                           f"the mesh, or raise the limit with {MAX_CONFIG_ENV}=<bytes>")


def load_text(text: str) -> ServiceTable:
    limit = max_config_bytes()
    if len(text) * 4 > limit:  # UTF-8 takes at most 4 bytes a character: else surely fits
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise _too_big(size, limit)
    try:
        doc = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise ValidationError("config", f"not valid YAML: {e}") from None
    except RecursionError:  # PyYAML recurses per nesting level: [[[[...]]]] exhausts the stack
        raise ValidationError("config", "nested too deeply to be a mesh.yaml") from None
    return table_from_dict(doc)


def load(path: str | Path) -> ServiceTable:
    """The file's table. Its size is checked before it is read, and its encoding before
    it is parsed: a huge or binary file is an error naming the limit or the byte."""
    limit = max_config_bytes()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise _too_big(size, limit, str(path))
            data = f.read(limit + 1)  # a pipe or /dev/... has no size: read past the limit
    except OSError as e:
        raise ValidationError(str(path), f"cannot read: {e.strerror}") from None
    if len(data) > limit:
        raise _too_big(len(data), limit, str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError(str(path), f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset "
                              f"{e.start} (a binary file? mesh.yaml is UTF-8 YAML)") from None
    return load_text(text)


class CapacityError(ValidationError):
    """The table does not fit the maps: rejected whole, never truncated."""


_CAPACITY_NOUNS = {"services": "services", "slots": "endpoint slots",
                   "mesh_nets": "mesh addresses"}


def check_capacity(kind: str, n: int, capacities: Any) -> None:
    """Raise CapacityError when `n` entries of map `kind` (services, slots, mesh_nets)
    exceed its capacity: one message for the file check and the agent's own."""
    cap = getattr(capacities, kind)
    if n > cap:
        raise CapacityError("services", f"{n} {_CAPACITY_NOUNS[kind]} exceed the capacity of "
                            f"{cap} (--capacity {kind}=N)")


def check_fits(table: ServiceTable, capacities: Any) -> None:
    """Raise ValidationError if `table` cannot fit maps of these capacities (services,
    endpoint slots, mesh addresses), counted as the agent's capacity check counts them.
    Pure: for checking a file before anything is loaded, so that a table too big for the
    maps is refused with nothing changed, not after the datapath is up."""
    from accel.datapath.maps import service_addresses
    from accel.datapath.services import service_slots

    check_capacity("services", len(table.services), capacities)
    check_capacity("slots", sum(len(service_slots(s)) for s in table.services), capacities)
    check_capacity("mesh_nets", len({a for s in table.services for a in service_addresses(s)})
                   + len(table.mesh_cidrs), capacities)


def table_to_dict(table: ServiceTable) -> dict[str, Any]:
    out: dict[str, Any] = {
        "services": [
            {
                "name": s.name,
                "vip": str(s.vip),
                "port": s.port,
                "protocol": s.protocol,
                **({"edge": True} if s.edge else {}),
                **({} if s.fastpath == table.fastpath else {"fastpath": s.fastpath}),
                **({"limits": s.limits.to_dict()} if s.limits else {}),
                "endpoints": [
                    {
                        "address": str(e.address),
                        "port": e.port,
                        "weight": e.weight,
                        **({} if e.healthy else {"healthy": False}),
                        **({} if e.namespace == DEFAULT_NAMESPACE else {"namespace": e.namespace}),
                        **({} if e.service_account == DEFAULT_SERVICE_ACCOUNT
                           else {"service_account": e.service_account}),
                        **({"name": e.name} if e.name else {}),
                        **({"labels": dict(e.labels)} if e.labels else {}),
                    }
                    for e in s.endpoints
                ],
            }
            for s in table.services
        ]
    }
    if table.fastpath != DEFAULT_FASTPATH:
        out["fastpath"] = table.fastpath
    if table.mesh_cidrs:
        out["mesh_cidrs"] = [str(c) for c in table.mesh_cidrs]
    if table.policies:
        from accel.policy.meshyaml import policy_to_dict

        out["policies"] = [policy_to_dict(p) for p in table.policies]
    g = table.guard
    if g.deny or g.syn_rate:
        out["guard"] = {"deny": [str(c) for c in g.deny], "syn_rate": g.syn_rate,
                        "syn_burst": g.syn_burst}
    return out


def dump(table: ServiceTable) -> str:
    return yaml.safe_dump(table_to_dict(table), sort_keys=False)
