"""The controller's side of incremental (Delta) ADS: one resource type on one stream.

A DeltaSubscription knows what the client asked for (wildcard and/or names) and which
version of each resource the client holds, so a response carries only what differs:
changed or new resources, and the names of those it must drop. A resource's version is
a digest of its bytes, so it means the same across controller restarts and a reconnecting
client's initial_resource_versions spare it everything it already has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from accel.xds.kinds import WILDCARD_TYPES
from accel.xds.workload.kinds import TYPES as WORKLOAD_TYPES

WILDCARD = "*"


@dataclass(frozen=True)
class Changes:
    """What a response would carry: resources to (re)send and names to remove."""

    upsert: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.upsert or self.remove)


@dataclass(frozen=True)
class Due:
    """An answer a request asks for: the whole difference (`only` None) or just the named
    resources; `even_if_empty`: answer with nothing rather than stay silent."""

    only: frozenset[str] | None
    even_if_empty: bool


@dataclass
class DeltaSubscription:
    type_url: str
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    # name -> version the client holds, as far as the server knows: what it sent (ACKed or
    # not: a NACKed resource stays "held" so later pushes need not carry it again) or what
    # the client said it had when it reconnected.
    known: dict[str, str] = field(default_factory=dict)
    # Named in a subscribe: sent (or reported missing) even when the client should have it.
    force: set[str] = field(default_factory=set)
    started: bool = False
    nonce: str = ""  # of the last response
    sent_version: str = ""
    acked_version: str = ""
    nack_error: str | None = None
    nacked_version: str = ""
    acks: int = 0
    nacks: int = 0
    resources_sent: int = 0  # over the stream's life: what incremental xDS saves shows here
    removals_sent: int = 0

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> Due | None:
        """Apply one request's subscription changes (and, in the first of the type on the
        stream, the versions the client already holds). Returns what to answer now, None
        when nothing: a plain ACK/NACK or unsubscribe waits for the next push."""
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        first = not self.started
        self.started = True
        wild_type = self.type_url in WILDCARD_TYPES or self.type_url in WORKLOAD_TYPES
        due: Due | None = None
        if first:
            self.known = dict(req.initial_resource_versions)
            # Legacy wildcard: a first request naming nothing means "*" (LDS/CDS, and the
            # workload API's types, which ztunnel subscribes to so).
            self.wildcard = wild_type and not subscribe and not unsubscribe
            # Names the client re-subscribes to with a version are not new to it.
            self.force = {n for n in subscribe if n not in self.known and n != WILDCARD}
        else:
            self.force |= subscribe - {WILDCARD}
        if WILDCARD in subscribe and wild_type and not self.wildcard:
            self.wildcard = True
            due = Due(None, False)
        self.names |= subscribe - {WILDCARD}
        for n in unsubscribe - {WILDCARD}:
            self.names.discard(n)
            self.force.discard(n)
            if self.wildcard:
                # Still wanted through "*" or not: the client cannot tell, so say which.
                self.force.add(n)
            else:
                self.known.pop(n, None)
        if WILDCARD in unsubscribe and self.wildcard:
            self.wildcard = False
            # The client drops what it no longer wants itself: no answer needed.
            self.known = {n: v for n, v in self.known.items() if n in self.names}
            self.force &= self.names
        if first:
            # A fresh wildcard client learns "there is nothing" from an empty answer.
            return Due(None, self.wildcard and not self.known)
        if due is None and self.force:
            due = Due(frozenset(self.force), False)
        return due

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def changes(self, versions: Mapping[str, str], only: Iterable[str] | None = None) -> Changes:
        """The difference between what the client holds and `versions` (the snapshot's
        name -> version of this type), limited to `only` names when given."""
        known = self.known
        if only is None:
            existing: Iterable[str] = versions if self.wildcard else \
                (n for n in self.names if n in versions)
            upsert = [n for n in existing if known.get(n) != versions[n] or n in self.force]
            remove = [n for n in known if n not in versions or not self.wants(n)]
            remove += [n for n in self.force if n not in versions and n not in known]
        else:
            names = set(only)
            upsert = [n for n in names if n in versions and self.wants(n)]
            remove = list(names.difference(upsert))
        return Changes(tuple(sorted(set(upsert))), tuple(sorted(set(remove))))

    def sent(self, changes: Changes, versions: Mapping[str, str]) -> None:
        self.resources_sent += len(changes.upsert)
        self.removals_sent += len(changes.remove)
        for n in changes.upsert:
            self.known[n] = versions[n]
            self.force.discard(n)
        for n in changes.remove:
            self.known.pop(n, None)
            self.force.discard(n)

    def on_reply(self, req: discovery_pb2.DeltaDiscoveryRequest) -> str | None:
        """Record an ACK or NACK of the last response: "ack", "nack", or None when the
        request answers an older response (its subscription changes still count)."""
        if not req.response_nonce or req.response_nonce != self.nonce:
            return None
        if req.HasField("error_detail"):
            self.nacks += 1
            self.nack_error = req.error_detail.message
            self.nacked_version = self.sent_version
            return "nack"
        self.acks += 1
        self.acked_version = self.sent_version
        self.nack_error = None
        return "ack"

    def describe(self) -> dict:
        return {"names": None if self.wildcard and not self.names else
                sorted(self.names | ({WILDCARD} if self.wildcard else set())),
                "sent_version": self.sent_version, "acked_version": self.acked_version,
                "nack_error": self.nack_error, "resources": len(self.known),
                "resources_sent": self.resources_sent, "removals_sent": self.removals_sent}
