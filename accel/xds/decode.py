"""Wire to messages: a response's Any (or Resource-wrapped) resources, with errors that
name the resource, and the address fields every resource kind shares."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import address_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, message

from accel.model import IPAddress, ValidationError, plain_address
from accel.xds.kinds import KIND, MESSAGE, RESOURCE_WRAPPER, resource_name


def unpack(type_url: str, raw: Iterable[any_pb2.Any]) -> dict[str, message.Message]:
    """Decode one response's resources; the names must be unique and the types right."""
    kind = KIND.get(type_url)
    if kind is None:
        raise ValidationError("type_url", f"{type_url!r} is not a type meshaccel subscribes to")
    out: dict[str, message.Message] = {}
    for i, any_ in enumerate(raw):
        where = f"{kind} resources[{i}]"
        if any_.type_url == RESOURCE_WRAPPER:  # servers may wrap resources in a Resource
            wrapper = discovery_pb2.Resource()
            parse(wrapper, any_.value, where)
            any_ = wrapper.resource
        if any_.type_url != type_url:
            raise ValidationError(where, f"type_url {any_.type_url!r} does not match the "
                                  f"response type {type_url!r}")
        msg = MESSAGE[type_url]()
        parse(msg, any_.value, where)
        name = resource_name(msg)
        if not name:
            raise ValidationError(where, "resource has no name")
        if name in out:
            raise ValidationError(f"{kind}[{name}]", f"duplicate {kind} name in one response")
        out[name] = msg
    return out



def unpack_delta(type_url: str, raw: Iterable[discovery_pb2.Resource],
                 held: Mapping[str, str]) -> tuple[dict[str, message.Message], dict[str, str]]:
    """Decode a DeltaDiscoveryResponse's resources: ({name: message}, {name: version}).
    `held` is name -> version of what the client has: a Resource without a payload at the
    version held is a TTL heartbeat (nothing changed) and is skipped."""
    kind = KIND.get(type_url)
    if kind is None:
        raise ValidationError("type_url", f"{type_url!r} is not a type meshaccel subscribes to")
    out: dict[str, message.Message] = {}
    versions: dict[str, str] = {}
    for i, r in enumerate(raw):
        where = f"{kind} resources[{i}]"
        name = r.name or r.resource_name.name
        if not r.HasField("resource"):
            if name and name in held and held[name] == r.version:
                continue
            raise ValidationError(f"{kind}[{name}]" if name else where,
                                  "Resource has no resource (and is no heartbeat of a "
                                  "version held)")
        if r.resource.type_url != type_url:
            raise ValidationError(where, f"type_url {r.resource.type_url!r} does not match "
                                  f"the response type {type_url!r}")
        msg = MESSAGE[type_url]()
        parse(msg, r.resource.value, where)
        inner = resource_name(msg)
        if not inner:
            raise ValidationError(where, "resource has no name")
        if name and name != inner:
            raise ValidationError(f"{kind}[{inner}]", f"sent under the name {name!r}")
        if inner in out:
            raise ValidationError(f"{kind}[{inner}]", f"duplicate {kind} name in one response")
        out[inner] = msg
        versions[inner] = r.version
    return out, versions

def parse(msg: message.Message, data: bytes, where: str) -> None:
    try:
        msg.ParseFromString(data)
    except message.DecodeError as e:
        raise ValidationError(where, f"malformed Any ({msg.DESCRIPTOR.name}): {e}") from None


def typed(any_: any_pb2.Any, cls: type[message.Message], where: str) -> message.Message:
    msg = cls()
    parse(msg, any_.value, where)
    return msg


def socket_address(sa: address_pb2.SocketAddress, where: str) -> tuple[IPAddress, int]:
    if sa.WhichOneof("port_specifier") == "named_port":
        raise ValidationError(f"{where}.named_port", "named ports are not supported; "
                              "use port_value")
    if sa.resolver_name:
        raise ValidationError(f"{where}.resolver_name", "custom resolvers are not supported; "
                              "give an IP address")
    try:
        addr = ip(sa.address)
    except ValueError:
        raise ValidationError(f"{where}.address", f"{sa.address!r} is not an IPv4 or IPv6 "
                              "address (hostnames need DNS, which meshaccel does not do)"
                              ) from None
    addr = plain_address(addr, f"{where}.address")  # ::ffff:a.b.c.d is a.b.c.d in the kernel
    if not 1 <= sa.port_value <= 65535:
        raise ValidationError(f"{where}.port_value",
                              f"port {sa.port_value} is out of range 1-65535")
    return addr, sa.port_value


# Small: the translation memo already skips resources whose bytes did not change, so this
# only serves addresses repeated within one change; 65,536 entries held 11 MB for nothing.
@functools.lru_cache(maxsize=1 << 12)
def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)
