"""One processor per xDS resource type: how its resources come off the wire (decode,
names, validation of one resource alone) and whether it is subscribed to as a wildcard or
by the names its parents give. What the resources mean together is the cache's job
(cache.py); the wire is the stream's (stream.py). A new API (Istio's workload API) is a
new set of processors and a cache, not another client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, message

from accel.model import ValidationError
from accel.xds.decode import parse
from accel.xds.kinds import (
    CLUSTER,
    ENDPOINT,
    KIND,
    LISTENER,
    MESSAGE,
    RESOURCE_WRAPPER,
    ROUTE,
    resource_name,
)


@dataclass(frozen=True)
class Processor:
    type_url: str
    kind: str  # how errors name the resource: Listener[name]...
    message: type[message.Message]
    # Wildcard: every resource the server has. Otherwise by name: the names the cache
    # asks for (Envoy's EDS/RDS follow the clusters/listeners that name them).
    wildcard: bool
    # The name a resource carries inside; None: only the wire names it (Delta's Resource).
    inner_name: Callable[[message.Message], str] | None = resource_name
    # Envoy's types must be sent under their own name (a mismatch is malformed); the
    # workload API's are keyed by the name they were sent under, which is what a removal
    # names, whatever the server's naming scheme (the cache maps it to the content's).
    wire_names: bool = False

    def decode(self, raw: Iterable[any_pb2.Any]) -> dict[str, message.Message]:
        """A state-of-the-world response's resources by name; names unique, types right."""
        out: dict[str, message.Message] = {}
        for i, any_ in enumerate(raw):
            where = f"{self.kind} resources[{i}]"
            name = ""
            if any_.type_url == RESOURCE_WRAPPER:  # servers may wrap resources in a Resource
                wrapper = discovery_pb2.Resource()
                parse(wrapper, any_.value, where)
                any_ = wrapper.resource
                # Envoy goes by the resource's own name in state of the world; the wrapper's
                # counts only for types that carry none.
                name = wrapper.name if self.inner_name is None else ""
            msg = self._message(any_, where)
            name = self._name(msg, name, where)
            if name in out:
                raise ValidationError(f"{self.kind}[{name}]",
                                      f"duplicate {self.kind} name in one response")
            out[name] = msg
        return out

    def decode_delta(self, raw: Iterable[discovery_pb2.Resource], held: Mapping[str, str]
                     ) -> tuple[dict[str, message.Message], dict[str, str]]:
        """A Delta response's resources: ({name: message}, {name: version}). `held` is
        name -> version of what the client has: a Resource without a payload at the version
        held is a TTL heartbeat (nothing changed) and is skipped."""
        out: dict[str, message.Message] = {}
        versions: dict[str, str] = {}
        for i, r in enumerate(raw):
            where = f"{self.kind} resources[{i}]"
            name = r.name or r.resource_name.name
            if not r.HasField("resource"):
                if name and name in held and held[name] == r.version:
                    continue
                raise ValidationError(f"{self.kind}[{name}]" if name else where,
                                      "Resource has no resource (and is no heartbeat of a "
                                      "version held)")
            msg = self._message(r.resource, where)
            name = self._name(msg, name, where)
            if name in out:
                raise ValidationError(f"{self.kind}[{name}]",
                                      f"duplicate {self.kind} name in one response")
            out[name] = msg
            versions[name] = r.version
        return out, versions

    def _message(self, any_: any_pb2.Any, where: str) -> message.Message:
        if any_.type_url != self.type_url:
            raise ValidationError(where, f"type_url {any_.type_url!r} does not match the "
                                  f"response type {self.type_url!r}")
        msg = self.message()
        parse(msg, any_.value, where)
        return msg

    def _name(self, msg: message.Message, wire: str, where: str) -> str:
        inner = self.inner_name(msg) if self.inner_name else ""
        if self.wire_names and wire:
            return wire
        if inner and wire and inner != wire:
            raise ValidationError(f"{self.kind}[{inner}]", f"sent under the name {wire!r}")
        name = inner or wire
        if not name:
            raise ValidationError(where, "resource has no name")
        return name


def _envoy(t: str, wildcard: bool) -> Processor:
    return Processor(t, KIND[t], MESSAGE[t], wildcard)


# Subscribed parents first, so children are asked for as soon as their names are known.
ENVOY = (_envoy(CLUSTER, True), _envoy(ENDPOINT, False), _envoy(LISTENER, True),
         _envoy(ROUTE, False))


BY_TYPE = {p.type_url: p for p in ENVOY}


def _processor(type_url: str) -> Processor:
    p = BY_TYPE.get(type_url)
    if p is None:
        raise ValidationError("type_url", f"{type_url!r} is not a type meshaccel subscribes to")
    return p


def unpack(type_url: str, raw: Iterable[any_pb2.Any]) -> dict[str, message.Message]:
    """Decode one state-of-the-world response's Envoy resources."""
    return _processor(type_url).decode(raw)


def unpack_delta(type_url: str, raw: Iterable[discovery_pb2.Resource],
                 held: Mapping[str, str]) -> tuple[dict[str, message.Message], dict[str, str]]:
    """Decode one Delta response's Envoy resources: ({name: message}, {name: version})."""
    return _processor(type_url).decode_delta(raw, held)
