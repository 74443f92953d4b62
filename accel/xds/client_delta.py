"""The wire side of XdsClient(delta=True): incremental xDS (DeltaAggregatedResources).

Mixed into XdsClient, which owns the state; what a response does to the resources held
and the table is the same as for state of the world (XdsClient._apply). Here:

- first requests of a stream: LDS/CDS wildcard (no names: the form every server takes as
  "*"), EDS/RDS by name, each with initial_resource_versions = what is held, so a
  reconnect costs only what changed meanwhile;
- responses: added/changed resources and removed_resources, ACKed (or NACKed with
  error_detail) by nonce; versions are kept per resource;
- EDS/RDS names that appear or go are subscribed / unsubscribed by name.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import code_pb2, status_pb2

from accel.model import ValidationError
from accel.xds import translate
from accel.xds.kinds import Packed
from accel.xds.translate import ENDPOINT, ROUTE, Resources

if TYPE_CHECKING:
    from accel.xds.client import _Result

log = logging.getLogger(__name__)

_NAMED = (ENDPOINT, ROUTE)  # subscribed by name; the others are wildcard


class DeltaADS:
    # Owned by XdsClient.
    node: base_pb2.Node
    last_received: float
    _types: dict[str, Any]
    _versions: dict[str, dict[str, str]]
    _res: Resources
    _lock: threading.Lock

    def _delta_first_requests(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        reqs = []
        for t, ts in self._types.items():  # parents first (SUBSCRIBE_ORDER)
            if t in _NAMED and not ts.names:
                continue
            req = self._delta_request(t, subscribe=ts.sorted_names if t in _NAMED else (),
                                      initial=self._held_versions(t))
            if not reqs:
                req.node.CopyFrom(self.node)
            ts.subscribed = True
            reqs.append(req)
        return reqs

    def _delta_request(self, t: str, *, nonce: str = "", error: str | None = None,
                       subscribe=(), unsubscribe=(), initial: Mapping[str, str] | None = None
                       ) -> discovery_pb2.DeltaDiscoveryRequest:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=t, response_nonce=nonce, resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe, initial_resource_versions=initial or {})
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT,
                                                        message=error))
        return req

    def _handle_delta(self, resp: discovery_pb2.DeltaDiscoveryResponse,
                      out: queue.Queue) -> None:
        self.last_received = time.perf_counter()
        t = resp.type_url
        if t not in self._types:
            log.warning("xDS: ignoring a response of unrequested type %r", t)
            return
        removed = frozenset(resp.removed_resources) | \
            frozenset(r.name for r in resp.removed_resource_names)
        got: dict[str, str] = {}

        def apply() -> _Result:
            items, versions = translate.unpack_delta(t, resp.resources, self._versions[t])
            both = removed & items.keys()
            if both:
                raise ValidationError(f"{translate.KIND[t]}[{min(both)}]", "both in resources "
                                      "and in removed_resources")
            got.update(versions)
            return self._apply(t, items, removed=removed)  # type: ignore[attr-defined]

        def commit(r: _Result) -> None:
            self._versions[t].update(got)
            for name in removed:
                self._versions[t].pop(name, None)
            self._prune_versions(r.resources)

        self._take(t, resp.nonce, resp.system_version_info, out, apply,  # type: ignore
                   lambda error: self._delta_request(t, nonce=resp.nonce, error=error), commit)

    def _prune_versions(self, res: Resources) -> None:
        """Drop versions of what is no longer held (children dropped with their parent,
        resources filtered out). Every held resource has a version, so a count that differs
        means stale entries; equal counts cost nothing to check."""
        for t, versions in self._versions.items():
            held = res.of(t)
            if len(versions) != len(held):
                self._versions[t] = {n: v for n, v in versions.items() if n in held}

    def _held_versions(self, t: str) -> dict[str, str]:
        held = self._res.of(t)
        return {n: v for n, v in self._versions[t].items() if n in held}

    def _delta_resubscribe(self, t: str, names: frozenset[str], out: queue.Queue) -> None:
        ts = self._types[t]
        if names == ts.names and (ts.subscribed or not names):
            return
        add = names - ts.names if ts.subscribed else names
        gone = ts.names - names if ts.subscribed else frozenset()
        with self._lock:
            ts.names = names
            ts.sorted_names = tuple(sorted(names))
            # What is unsubscribed goes at once: state follows the subscription.
            held = self._res.of(t)
            assert isinstance(held, Packed)
            self._res = self._res.replace(t, held.only(names))
            self._prune_versions(self._res)
        if not ts.subscribed and not names:
            return  # a first request naming nothing would be a wildcard to some servers
        initial = None if ts.subscribed else self._held_versions(t)
        out.put(self._delta_request(t, subscribe=sorted(add), unsubscribe=sorted(gone),
                                    initial=initial))
        ts.subscribed = True
