"""The agent: one datapath, one source of truth (mesh.yaml or xDS), and the state the
API, the metrics and the CLI read.

Flow: source -> ServiceTable -> Agent.apply_table -> Datapath (map writers) -> kernel.
apply_table either applies a table completely or raises and changes nothing, which is
what lets the xDS client NACK with the last good state still serving.
"""

from __future__ import annotations

import logging
import operator
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from accel import __version__
from accel.datapath.datapath import Datapath
from accel.kernel.kbtf import fastpath_offsets
from accel.model import Guard, Service, ServiceTable, ValidationError

log = logging.getLogger(__name__)
_endpoints = operator.attrgetter("endpoints")


def _count(services: Iterable[Service]) -> int:
    return sum(map(len, map(_endpoints, services)))


class CapacityError(ValidationError):
    """The table does not fit the maps: rejected whole, never truncated."""


@dataclass
class Event:
    kind: str  # "applied" | "rejected" | "xds" | "datapath"
    message: str
    version: str = ""
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "version": self.version,
                "time": self.time}


class Agent:
    def __init__(self, datapath: Datapath, source: str = "file"):
        self.datapath = datapath
        self.source = source  # "file:<path>" | "xds:<target>" | "api"
        self.started = time.time()
        self.table = ServiceTable()
        self.endpoint_count = 0  # over self.table's services
        self.version = ""
        self.applied_count = 0
        self.rejected_count = 0
        self.last_error = ""
        self.xds_state: Any = None  # callable returning the xDS client's state, if any
        self.edge: Any = None  # the XDP edge datapath, if enabled
        self.pods: Any = None  # pod routing (datapath/podroute.py), if enabled
        # One writer at a time: sources, the API and edge housekeeping all change maps.
        self.lock = threading.RLock()
        self._watchers: list[queue.Queue[Event]] = []

    # ---- applying configuration ------------------------------------------------------------

    def check_capacity(self, table: ServiceTable) -> None:
        caps = self.datapath.capacities
        if len(table.services) > caps.services:
            raise CapacityError("services", f"{len(table.services)} services exceed the "
                                f"capacity of {caps.services} (--capacity services=N)")
        # Counted by the map writers from what changes: a one-service update stays cheap.
        need = self.datapath.usage_after(table)
        slots = need["slots"]
        if slots > caps.slots:
            raise CapacityError("services", f"{slots} endpoint slots exceed the capacity of "
                                f"{caps.slots} (--capacity slots=N)")
        if self.edge is not None and hasattr(self.edge, "check_capacity"):
            try:
                self.edge.check_capacity(table)
            except ValueError as e:
                raise CapacityError("services", f"edge: {e}") from None
        prefixes = need["mesh_nets"]
        if prefixes > caps.mesh_nets:
            raise CapacityError("services", f"{prefixes} mesh addresses exceed the capacity of "
                                f"{caps.mesh_nets} (--capacity mesh_nets=N)")

    def apply_table(self, table: ServiceTable, version: str = "") -> None:
        """Apply completely or raise (ValidationError for bad input, RuntimeError otherwise)."""
        with self.lock:
            try:
                self.check_capacity(table)
                report = self.datapath.apply(table)
                if self.edge is not None:
                    self.edge.apply(table)
                    self.edge.set_guard(table.guard)
            except Exception as e:
                self.rejected_count += 1
                self.last_error = str(e)
                self._emit(Event("rejected", str(e), version))
                raise
            failed = [e for r in report.values() for e in r.errors]
            # Counted from the change: summing 10,000 services would cost more than applying
            # one changed service does.
            d = table.delta(self.table)
            self.endpoint_count += _count(d.added) - _count(d.removed)
            self.table = table
            self.version = version
            self.applied_count += 1
            if failed:
                # Written as far as the kernel allowed: say so loudly, and refuse the version.
                self.last_error = "; ".join(failed[:5])
                self._emit(Event("rejected", f"partially applied: {self.last_error}", version))
                raise RuntimeError(f"maps full: {self.last_error}")
            self.last_error = ""
            self._emit(Event("applied", f"{len(table.services)} services, "
                             f"{self.endpoint_count} endpoints", version))
            log.info("applied version %r: %d services", version, len(table.services))

    def set_guard(self, guard: Guard) -> bool:
        """Replace the edge flood guard alone; True if an edge enforces it. The next table
        from the source replaces it in turn, as it would any table."""
        with self.lock:
            if self.edge is not None:
                self.edge.set_guard(guard)
            self.table = replace(self.table, guard=guard)
            self._emit(Event("applied", f"guard: {len(guard.deny)} denied CIDRs, "
                             f"syn_rate {guard.syn_rate}, syn_burst {guard.syn_burst}",
                             self.version))
            return self.edge is not None

    # ---- state for the API, metrics and CLI ------------------------------------------------

    def status(self) -> dict[str, Any]:
        xds = self.xds_state() if callable(self.xds_state) else None
        return {
            "version": __version__,
            "source": self.source,
            "uptime_s": round(time.time() - self.started, 3),
            "config_version": self.version,
            "services": len(self.table.services),
            "applied": self.applied_count,
            "rejected": self.rejected_count,
            "last_error": self.last_error,
            "pin_dir": self.datapath.pin_dir,
            "maps": {**self.datapath.usage(),
                     **({"pods": self.pods.usage()} if self.pods is not None else {})},
            "cgroup": str(self.datapath.cgroup),
            "xds": xds,
            "edge": self._edge_status(),
            "pod_routing": self.pods.status() if self.pods is not None else None,
            "redirect_unavailable": fastpath_offsets().missing or None,
        }

    def _edge_status(self) -> dict[str, Any] | None:
        if self.edge is None:
            return None
        if hasattr(self.edge, "status"):
            return self.edge.status()
        # An edge without its own report still says where it runs and how.
        return {"iface": getattr(self.edge, "iface", None),
                "mode": getattr(self.edge, "mode", None),
                "guard": {"deny": [str(n) for n in self.table.guard.deny],
                          "syn_rate": self.table.guard.syn_rate,
                          "syn_burst": self.table.guard.syn_burst}}

    def stats(self) -> dict[str, Any]:
        # Under the lock: the service writer's index changes while a table is applied.
        with self.lock:
            out: dict[str, Any] = {"global": self.datapath.counters(),
                                   "services": self.datapath.service_counters()}
            if self.edge is not None:
                out["edge"] = self.edge.counters()
        return out

    # ---- events --------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        for q in list(self._watchers):
            try:
                q.put_nowait(event)
            except queue.Full:
                pass

    def emit(self, kind: str, message: str, version: str = "") -> None:
        self._emit(Event(kind, message, version))

    def watch(self) -> queue.Queue[Event]:
        q: queue.Queue[Event] = queue.Queue(maxsize=1000)
        self._watchers.append(q)
        return q

    def unwatch(self, q: queue.Queue[Event]) -> None:
        if q in self._watchers:
            self._watchers.remove(q)
