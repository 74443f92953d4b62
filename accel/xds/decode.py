"""Wire to messages: a response's Any (or Resource-wrapped) resources, with errors that
name the resource, and the address fields every resource kind shares."""

from __future__ import annotations

import functools
import ipaddress
import socket

from envoy.config.core.v3 import address_pb2
from google.protobuf import any_pb2, message

from accel.model import IPAddress, ValidationError, plain_address


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
    """ipaddress.ip_address, 5x faster for the plain dotted quads and colon forms a full
    sync holds by the hundred thousand: inet_pton is strict (no leading zeros, no short
    forms), so what it takes ipaddress takes the same; the rest goes to ipaddress."""
    try:
        return ipaddress.IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text)))
    except (OSError, TypeError, ValueError):
        pass
    try:
        return ipaddress.IPv6Address(int.from_bytes(socket.inet_pton(socket.AF_INET6, text)))
    except (OSError, TypeError, ValueError):
        return ipaddress.ip_address(text)
