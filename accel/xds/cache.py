"""Envoy resources held by the agent -> one consistent ServiceTable, flushed to the agent.

The stream (stream.py) hands each decoded response to `take`, which merges it into a
candidate state, translates it (translate.to_table, incrementally through a Memo; a pure
endpoint change through translate.update_endpoints) and flushes the table to `on_update`;
anything that raises (a malformed resource, a ValidationError or any other error from
on_update) leaves the state as it was and the stream NACKs. `commit` then makes the
candidate the state in force. Children follow their parents: EDS names come from the
clusters held, RDS names from the listeners, and what a parent no longer names goes.

The first table waits for one answer of every type in use: an agent must not flush its
datapath for a table that only means "not all there yet". Later tables hold back just
the services still waiting (their `pending` reason).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field

from google.protobuf import message

from accel.model import ServiceTable, ValidationError
from accel.xds import translate
from accel.xds.fronts import Front
from accel.xds.kinds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    MESSAGE,
    ROUTE,
    Packed,
    raw_items,
    raw_of,
)
from accel.xds.processors import ENVOY, Processor
from accel.xds.stream import Update
from accel.xds.translate import Resources

OnUpdate = Callable[[ServiceTable], None]


@dataclass(frozen=True)
class EnvoyTaken:
    type_url: str
    resources: Resources
    table: ServiceTable | None  # None: not synced yet (no LDS or no CDS so far)
    translation: translate.Translation | None
    count: int
    children: Mapping[str, frozenset[str]]
    info: Mapping[str, object] = field(default_factory=dict)


class EnvoyCache:
    """Listeners, routes, clusters and endpoints by name (held as wire bytes: a parsed
    message costs ~18x, see kinds.Packed) and the table made of them."""

    processors: tuple[Processor, ...] = ENVOY

    def __init__(self, on_update: OnUpdate):
        self.on_update = on_update
        self.lock = threading.Lock()
        self._res = Resources.packed()
        self._seen: set[str] = set()
        self.table: ServiceTable | None = None  # the last table on_update accepted
        self.translation: translate.Translation | None = None  # where `table` came from
        self._memo = translate.Memo()
        self._names_cache: dict[str, tuple[Mapping[str, message.Message], frozenset[str]]] = {}
        # Named subscriptions in force: a response's resources outside them are not kept.
        self._wanted: dict[str, frozenset[str]] = {ENDPOINT: frozenset(), ROUTE: frozenset()}

    # -- what the stream calls

    def held(self, type_url: str) -> Collection[str]:
        return self._res.of(type_url)

    def keep_only(self, type_url: str, names: frozenset[str]) -> None:
        with self.lock:
            self._wanted[type_url] = names
            held = self._res.of(type_url)
            assert isinstance(held, Packed)
            self._res = self._res.replace(type_url, held.only(names))

    def take(self, update: Update) -> EnvoyTaken:
        t, items = update.type_url, update.items
        if t == ENDPOINT and not update.removed and not update.complete:
            fast = self._take_endpoints(items)
            if fast is not None:
                return fast
        if update.complete:
            merged = Packed.of(MESSAGE[t], items)
        else:
            # A response need not repeat every resource: absence is no removal. EDS/RDS
            # keep only the names subscribed to.
            wanted = self._wanted.get(t)
            held = self._res.of(t)
            assert isinstance(held, Packed)
            merged = (held.without(update.removed) if update.removed else held).updated(
                {n: m for n, m in items.items() if wanted is None or n in wanted})
        cand = self._res.replace(t, merged)
        eds_names = self._names(CLUSTER, cand.clusters, translate.cluster_eds_names)
        rds_names = self._names(LISTENER, cand.listeners, self._rds_names)
        assert isinstance(cand.routes, Packed) and isinstance(cand.endpoints, Packed)
        cand = Resources(cand.listeners, cand.routes.only(rds_names), cand.clusters,
                         cand.endpoints.only(eds_names))
        seen = self._seen | {t}
        tr = translate.to_table(cand, strict=False, cds_seen=CLUSTER in seen,
                                check_clusters=self._changed_listeners(t, cand, items),
                                previous=self.table, memo=self._memo)
        table = None
        if self.table is not None or _synced(seen, eds_names, rds_names):
            if self.table is None or not self.table.equivalent(tr.table):
                self.on_update(tr.table)
            else:
                # Keep the table on_update last took: the next one derives from it, which
                # is what lets the agent apply just the difference.
                tr = dataclasses.replace(tr, table=self.table)
            table = tr.table
        return self._taken(t, cand, table, tr, len(merged), eds_names, rds_names)

    def commit(self, taken: EnvoyTaken) -> None:
        with self.lock:
            self._res = taken.resources
            self._seen.add(taken.type_url)
            if taken.table is not None:
                self.table = taken.table
                self.translation = taken.translation

    # -- reading

    def pending(self) -> dict[str, str]:
        tr = self.translation
        return dict(tr.pending) if tr is not None and self.table is not None else {}

    # -- inside

    def _take_endpoints(self, items: dict[str, message.Message]) -> EnvoyTaken | None:
        """An EDS response, when only ClusterLoadAssignments change: rebuild just the
        services made from the changed ones and hand on_update a table derived from the
        last. None: this needs the full translation."""
        prev = self.translation
        if prev is None or prev.table is not self.table:
            return None
        eds_names = self._names(CLUSTER, self._res.clusters, translate.cluster_eds_names)
        wanted = self._wanted[ENDPOINT]
        old = self._res.endpoints
        fresh = {n: m for n, m in items.items() if n in wanted and n in eds_names}
        tr = translate.update_endpoints(
            prev, {n: m for n, m in fresh.items() if raw_of(old, n) != m.SerializeToString()})
        if tr is None:
            return None
        if tr.table is not prev.table:
            if not prev.table.equivalent(tr.table):
                self.on_update(tr.table)
            else:
                tr = prev
        assert isinstance(old, Packed)
        merged = old.updated(fresh)
        rds_names = self._names(LISTENER, self._res.listeners, self._rds_names)
        return self._taken(ENDPOINT, self._res.replace(ENDPOINT, merged), tr.table, tr,
                           len(merged), eds_names, rds_names)

    @staticmethod
    def _taken(t: str, res: Resources, table: ServiceTable | None,
               tr: translate.Translation, count: int, eds: frozenset[str],
               rds: frozenset[str]) -> EnvoyTaken:
        return EnvoyTaken(t, res, table, tr if table is not None else None, count,
                          {ENDPOINT: eds, ROUTE: rds},
                          {"services": len(table.services) if table else None,
                           "pending": sorted(tr.pending)})

    def _rds_names(self, listeners: Mapping[str, message.Message]) -> set[str]:
        """Through the translation's memo: a full walk parses every listener (a second at
        10,000); the translation that follows finds each one's fronts there."""
        self._memo.begin()
        return {f.route for _, routes in self._listener_routes(listeners) for f in routes}

    def _listener_routes(self, listeners: Mapping[str, message.Message]
                         ) -> Iterator[tuple[str, list[Front]]]:
        for name, raw in raw_items(listeners):
            try:
                got = translate.listener_fronts(self._memo, name, raw)
            except ValidationError:
                continue  # NACKed by the translation: subscribe to nothing for it
            yield name, [f for f in got if isinstance(f, Front) and f.route]

    def _changed_listeners(self, t: str, new: Resources,
                           items: Mapping[str, message.Message]) -> set[str]:
        """Listeners whose cluster reference is new in this response: only those are NACKed
        for naming an unknown cluster."""
        if t == LISTENER:
            return {n for n, raw in raw_items(new.listeners)
                    if raw_of(self._res.listeners, n) != raw}
        if t == ROUTE:
            routes = set(items)
            return {n for n, fronts in self._listener_routes(new.listeners)
                    if any(f.route in routes for f in fronts)}
        return set()

    def _names(self, t: str, resources: Mapping[str, message.Message],
               fn: Callable[[Mapping[str, message.Message]], set[str]]) -> frozenset[str]:
        """EDS names of the clusters / RDS names of the listeners: each walks every
        resource, so it is redone only for a new cluster / listener set (Resources.replace
        keeps the dicts of the types a response did not touch)."""
        hit = self._names_cache.get(t)
        if hit is None or hit[0] is not resources:
            hit = self._names_cache[t] = (resources, frozenset(fn(resources)))
        return hit[1]


def _synced(seen: set[str], eds: frozenset[str], rds: frozenset[str]) -> bool:
    return (LISTENER in seen and CLUSTER in seen and (not eds or ENDPOINT in seen)
            and (not rds or ROUTE in seen))


