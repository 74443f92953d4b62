"""The agent runtime: one object that composes the datapath parts (socket programs, edge, pod
routing), the source of the table (mesh.yaml or xDS), the API, metrics and housekeeping,
with start / ready / stop. `accel agent`, the demo, the bench and the tests all run this.

Flow: source -> ServiceTable -> Runtime.apply (all or nothing) -> parts -> kernel maps.

Readiness is one signal, `Runtime.ready`: set once the programs are attached and the first
table is applied (connects to a VIP are balanced from then on). GetStatus reports it as
"ready", gRPC health answers SERVING only then, and `accel status --wait` waits for it.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from accel import __version__
from accel.config import CapacityError, check_capacity
from accel.datapath.datapath import Capacities, Datapath
from accel.datapath.qos import mechanisms as qos_mechanisms
from accel.kernel.kbtf import fastpath_offsets
from accel.kernel.loader import DEFAULT_PIN_DIR
from accel.model import DEFAULT_FASTPATH, Guard, Service, ServiceTable, ValidationError
from accel.policy.verdicts import Verdicts

if TYPE_CHECKING:
    from accel.api.metrics import MetricsServer
    from accel.api.server import ApiServer
    from accel.datapath.edge import EdgeDatapath
    from accel.datapath.podroute import PodRouter, Unavailable
    from accel.datapath.policy import Applied, Enforcer
    from accel.flows.part import FlowsPart
    from accel.xds.client import XdsClient

log = logging.getLogger("accel.agent")
_endpoints = operator.attrgetter("endpoints")


def _count(services: Iterable[Service]) -> int:
    return sum(map(len, map(_endpoints, services)))


class ApplyError(RuntimeError):
    """A part failed to take a table; every part is back on the previous one."""


@dataclass
class Event:
    kind: str  # "applied" | "rejected" | "xds" | "datapath"
    message: str
    version: str = ""
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "version": self.version,
                "time": self.time}


@dataclass(frozen=True)
class XdsSettings:
    target: str  # HOST:PORT
    node_id: str = ""  # default meshaccel-<hostname>
    node_cluster: str = "meshaccel"
    node_meta: tuple[tuple[str, object], ...] = ()  # node.metadata, as the controller wants
    delta: bool = False
    # "envoy": Listener/Route/Cluster/Endpoint; "workload": Istio ambient's Address and
    # Authorization (Delta only), with node_name = this host's `node` and cluster_id.
    api: str = "envoy"
    node_name: str = ""
    cluster_id: str = "Kubernetes"
    fastpath: str = DEFAULT_FASTPATH  # the workload API's services' (it has no field)
    ca: str | None = None  # PEM paths: TLS (and mTLS with cert + key)
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ApiSettings:
    unix_path: str | None = "/run/accel/agent.sock"
    tcp_addr: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything `accel agent` takes; the other callers set what they need."""

    pin_dir: str = DEFAULT_PIN_DIR
    cgroup: str | None = None
    capacities: Capacities = field(default_factory=Capacities)
    keep: bool = False  # on stop, leave programs and maps for the next agent
    config: str | None = None  # mesh.yaml, watched for changes
    xds: XdsSettings | None = None
    edge_iface: str | None = None
    # Where the edge balancer runs: auto (tc on a veth, else native XDP, else generic),
    # native, generic, tc (accel/datapath/edge/attach.py).
    edge_hook: str = "auto"
    maglev_size: int = 65537
    pod_ifaces: tuple[str, ...] = ()
    pod_netns: str | None = None
    api: ApiSettings | None = None
    metrics: str | None = None  # HOST:PORT
    flows: bool = True  # connection records (accel flows, per-service metrics)
    flow_log: str | None = None  # also written here as rotated JSON lines

    @property
    def source(self) -> str:
        if self.config:
            return f"file:{self.config}"
        if self.xds:
            return f"xds:{self.xds.target}"
        return "api"


class Part(Protocol):
    """A datapath part a table is applied to: `apply` raises and may leave the part half
    way; applying the previous table again brings it back (the writers diff)."""

    name: str

    def check(self, table: ServiceTable) -> None: ...
    def apply(self, table: ServiceTable) -> None: ...


class SocketPart:
    name = "socket maps"

    def __init__(self, datapath: Datapath):
        self.datapath = datapath

    def check(self, table: ServiceTable) -> None:
        caps = self.datapath.capacities
        check_capacity("services", len(table.services), caps)
        # Counted by the map writers from what changes: a one-service update stays cheap
        # (config.check_fits counts a whole file the same way, from scratch).
        need = self.datapath.usage_after(table)
        check_capacity("slots", need["slots"], caps)
        check_capacity("mesh_nets", need["mesh_nets"], caps)

    def apply(self, table: ServiceTable) -> None:
        report = self.datapath.apply(table)
        failed = [e for r in report.values() for e in r.errors]
        if failed:
            raise ApplyError(f"maps full: {'; '.join(failed[:5])}")


class EdgePart:
    name = "edge"

    def __init__(self, edge: EdgeDatapath):
        self.edge = edge

    def check(self, table: ServiceTable) -> None:
        try:
            self.edge.check_capacity(table)
        except ValueError as e:
            raise CapacityError("services", f"edge: {e}") from None

    def apply(self, table: ServiceTable) -> None:
        self.edge.apply(table)
        self.edge.set_guard(table.guard)


class Runtime:
    """start() -> ready -> stop(). `apply`, `status`, `stats`, `watch` for the API, metrics
    and CLI; one writer at a time (`lock`)."""

    def __init__(self, settings: Settings | None = None, *, datapath: Datapath | None = None):
        self.settings = settings or Settings()
        # A datapath handed in is the caller's (started and closed by it): tests and the
        # bench drive tables into one without a source, API or housekeeping.
        self._own_datapath = datapath is None
        self.datapath = datapath or Datapath(pin_dir=self.settings.pin_dir,
                                             cgroup_path=self.settings.cgroup,
                                             capacities=self.settings.capacities)
        self.source = self.settings.source
        self.started = time.time()
        self.ready = threading.Event()
        self.ready_after: float | None = None  # seconds from start() to ready
        self.not_ready = "starting"
        self.table = ServiceTable()
        self.endpoint_count = 0  # over self.table's services
        self.version = ""
        self.applied_count = 0
        self.rejected_count = 0
        self.last_error = ""
        self.edge: EdgeDatapath | None = None
        self.pods: PodRouter | Unavailable | None = None
        self.policy: Enforcer | None = None  # from the first apply_policy()
        self.verdicts: Verdicts | None = None  # what the policy part holds
        self.policy_ignored: dict[str, str] = {}  # what the policy compiler left, and why
        self._housekeeping = False
        self.xds: XdsClient | None = None
        self.api: ApiServer | None = None
        self.metrics: MetricsServer | None = None
        self.flows: FlowsPart | None = None
        self.parts: list[Part] = [SocketPart(self.datapath)]
        self.lock = threading.RLock()  # sources, the API and housekeeping all change maps
        self._watchers: list[queue.Queue[Event]] = []
        self._stoppers: list[tuple[str, Callable[[], None]]] = []
        self._chores: list[tuple[Callable[[], Any], bool]] = []
        self._stop = threading.Event()
        self._keep = self.settings.keep

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, table: ServiceTable | None = None) -> Runtime:
        """Load and attach every part, start the source, the API and metrics. `table`: the
        first table (else the source's; with no source, an empty one). Raises (after undoing
        what it did) when a part cannot start; ready is set once the first table is in."""
        self.started = time.time()
        try:
            if self._own_datapath:
                self.datapath.start()
                self._stoppers.append(("datapath", self._close_datapath))
            if self.settings.flows:
                self._start_flows()
            if self.settings.edge_iface:
                self._start_edge()
            if self.settings.pod_ifaces:
                self._start_pods()
            if self._chores:
                self._start_housekeeping()
            if self.settings.xds is not None and table is None:
                # Said before the API answers: a status read then must not say "starting".
                self.not_ready = ("waiting for the first table from xDS "
                                  f"{self.settings.xds.target}")
            if self.settings.api is not None:
                self._start_api()
            if self.settings.metrics:
                from accel.api import metrics

                self.metrics = metrics.serve(self, self.settings.metrics)
                self._stoppers.append(("metrics", self.metrics.stop))
            if table is None and self.settings.config:
                from accel import config

                table = config.load(self.settings.config)
            if table is not None or self.settings.xds is None:
                self.apply(table or ServiceTable(), version="file-1" if self.settings.config
                           else "initial")
            if self.settings.config:
                self._watch_file()
            if self.settings.xds is not None:
                self._start_xds(self.settings.xds)
        except BaseException:
            self.stop()  # what it attached goes (unless --keep: a kept datapath serves on)
            raise
        log.info("agent running (pin dir %s, cgroup %s)%s", self.datapath.pin_dir,
                 self.datapath.cgroup, "" if self.ready.is_set() else f"; {self.not_ready}")
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self, keep: bool | None = None) -> None:
        """Stop everything started, in reverse; with keep, programs and maps stay attached
        for the next agent."""
        keep = self.settings.keep if keep is None else keep
        self._stop.set()
        self._keep = keep
        self.ready.clear()
        self.not_ready = "stopping"
        if self.api is not None:
            self.api.health.enter_graceful_shutdown()
        while self._stoppers:
            what, fn = self._stoppers.pop()
            try:
                fn()
            except Exception as e:
                log.warning("stopping %s: %s", what, e)
        log.info("agent stopped%s", " (datapath kept)" if keep else ", datapath removed")

    def _close_datapath(self) -> None:
        self.datapath.close(keep=self._keep)

    def _start_edge(self) -> None:
        from accel.datapath.edge import EdgeDatapath

        edge = EdgeDatapath(self.settings.edge_iface, pin_dir=self.datapath.pin_dir,
                            maglev_size=self.settings.maglev_size)
        mode = edge.attach(self.settings.edge_hook)
        log.info("edge balancer on %s (%s)", self.settings.edge_iface,
                 "tc ingress" if mode == "tc" else f"XDP {mode} mode")
        self.datapath.record(edge_iface=self.settings.edge_iface)
        self._stoppers.append(("edge", lambda: None if self._keep else edge.close()))
        self.edge = edge
        self.parts.append(EdgePart(edge))
        self._chores.append((edge.refresh, True))
        self._chores.append((_every(10, edge.compact), True))

    def _start_flows(self) -> None:
        from accel.flows.part import FlowsPart

        try:
            flows = FlowsPart(self.datapath.pin_dir, self.settings.flow_log)
        except (OSError, RuntimeError) as e:  # kept pins of a build without records
            if self.settings.flow_log:  # asked for a log: not without it
                raise
            log.error("connection records unavailable, the datapath serves on: %s", e)
            return
        flows.apply(self.table)
        self.flows = flows.start()
        self.parts.append(flows)
        self._stoppers.append(("flows", flows.stop))

    def _start_pods(self) -> None:
        """Pod routing, or, when it cannot run here, an Unavailable that says why: the rest
        of the datapath serves on and pod traffic keeps the bridge (fail open)."""
        from accel.datapath.podroute import PodRouter, Unavailable

        s, caps = self.settings, self.settings.capacities
        try:
            pods = PodRouter(self.datapath.pin_dir, s.pod_ifaces, netns=s.pod_netns,
                             defines=self.datapath.defines(), capacity=caps.pods,
                             flows=caps.pod_flows)
        except Exception as e:
            log.error("pod routing unavailable, pod traffic stays on the bridge: %s", e)
            self.pods = Unavailable(s.pod_ifaces, s.pod_netns, str(e))
            return
        self.datapath.record(pod_netns=s.pod_netns or "", pod_prog_id=pods.prog_id)
        self._stoppers.append(("pod routing", lambda: None if self._keep else pods.close()))
        pods.refresh()
        log.info("pod routing on %d ports (%s)", len(pods.ports), ", ".join(s.pod_ifaces))
        # Outside the lock: it touches only its own map and filters, and reading many pods'
        # namespaces must not hold up an xDS update.
        self._chores.append((pods.refresh, False))
        self.pods = pods

    def apply_policy(self, verdicts: Verdicts) -> Applied:
        """Enforce L4 authorization (accel/datapath/policy.py); the policy programs load on
        the first call. The local pods are pod routing's (--pod-iface): their namespaces
        and interfaces are followed as they come and go."""
        from accel.datapath.policy import Enforcer

        with self.lock:
            if self.policy is None:
                enforcer = Enforcer(self.datapath, self.pods)
                self._stoppers.append(("policy", lambda: enforcer.close(keep=self._keep)))
                self._chores.append((enforcer.refresh, True))
                self.policy = enforcer
                if not self._housekeeping:
                    self._start_housekeeping()
            applied = self.policy.apply(verdicts)
            self.verdicts = verdicts
            return applied

    def _verdicts_for(self, table: ServiceTable, verdicts: Verdicts | None
                      ) -> tuple[Verdicts | None, dict[str, str]]:
        """What the policy part must hold with `table` (the source's verdicts, the workload
        API's, else those of the table's own policies, mesh.yaml), and what compiling those
        left out. None: nothing to enforce and nothing enforced so far (the policy programs
        stay unloaded)."""
        ignored: dict[str, str] = {}
        if verdicts is None and table.policies:
            from accel.policy.from_table import verdicts_of

            compiled = verdicts_of(table)
            ignored = dict(compiled.ignored)
            verdicts = compiled.verdicts
        if verdicts is None or not verdicts.policed:
            return (None if self.policy is None else (verdicts or Verdicts())), ignored
        return verdicts, ignored

    def _start_housekeeping(self) -> None:
        """Once a second, each chore: the edge's neighbours resolve and MACs move after a
        table is applied, churn leaves ring slots to compact, and pods come and go."""

        def loop() -> None:
            while not self._stop.wait(1.0):
                for chore, locked in self._chores:
                    try:
                        if locked:
                            with self.lock:
                                chore()
                        else:
                            chore()
                    except Exception as e:  # never let housekeeping take the agent down
                        log.warning("housekeeping: %s", e)

        t = threading.Thread(target=loop, name="housekeeping", daemon=True)
        t.start()
        self._housekeeping = True
        self._stoppers.append(("housekeeping", lambda: t.join(timeout=5)))

    def _watch_file(self) -> None:
        from accel.sources.file import FileSource

        path = self.settings.config
        source = FileSource(path)
        counter = {"n": 1}

        def on_change(t: ServiceTable) -> None:
            counter["n"] += 1
            try:
                self.apply(t, version=f"file-{counter['n']}")
            except Exception as e:
                log.error("new %s not applied, keeping the last good one: %s", path, e)

        source.watch(on_change)
        self._stoppers.append(("file source", source.close))

    def _start_xds(self, xs: XdsSettings) -> None:
        import grpc

        from accel.xds.client import XdsClient

        creds = None
        if xs.ca:
            def read(p: str | None) -> bytes | None:
                if not p:
                    return None
                with open(p, "rb") as f:
                    return f.read()

            creds = grpc.ssl_channel_credentials(read(xs.ca), read(xs.key), read(xs.cert))
        if xs.api == "workload":
            # The table and the verdicts of one response, applied together.
            client = XdsClient(xs.target, xs.node_id, credentials=creds, api="workload",
                               on_update=lambda table, verdicts: self.apply(
                                   table, verdicts=verdicts),
                               node_name=xs.node_name, cluster=xs.cluster_id,
                               fastpath=xs.fastpath,
                               metadata=dict(xs.node_meta))
        else:
            node_id = xs.node_id or f"meshaccel-{socket.gethostname()}"
            client = XdsClient(xs.target, node_id, on_update=self.apply, credentials=creds,
                               delta=xs.delta, cluster=xs.node_cluster,
                               metadata=dict(xs.node_meta))
        # ACK/NACK as the protocol saw them (a NACK of a malformed resource never reaches
        # apply, so the runtime would not know of it otherwise).
        client.events.append(lambda kind, info: self.emit(
            "xds", f"{kind}: " + ", ".join(f"{k}={v}" for k, v in sorted(info.items())),
            str(info.get("version", ""))))
        self.xds = client
        client.start()
        self._stoppers.append(("xds", client.stop))

    def _start_api(self) -> None:
        from accel.api import server as api_server

        a = self.settings.api
        assert a is not None
        if not (a.unix_path or a.tcp_addr):
            return
        self.api = api_server.serve(self, unix_path=a.unix_path, tcp_addr=a.tcp_addr,
                                    tls_cert=a.tls_cert, tls_key=a.tls_key,
                                    tls_client_ca=a.tls_client_ca, insecure=a.insecure)
        self._stoppers.append(("api", self.api.stop))

    def _set_ready(self) -> None:
        if self.ready.is_set():
            return
        self.ready_after = time.time() - self.started
        self.not_ready = ""
        self.ready.set()
        if self.api is not None:
            self.api.set_serving(True)
        log.info("ready: %d services balanced, %.3f s after start (%s)",
                 len(self.table.services), self.ready_after,
                 "compiled" if self.datapath.compiled else "pinned programs reused")

    # ---- applying configuration ------------------------------------------------------------

    def check_capacity(self, table: ServiceTable) -> None:
        for part in self.parts:
            part.check(table)

    def apply(self, table: ServiceTable, version: str = "",
              verdicts: Verdicts | None = None) -> None:
        """Every part takes `table`, or none does: a part that fails is rolled back with
        the ones before it, the previous table stays, and the error says which part.
        `verdicts`: the L4 authorization to enforce with it (the workload API's); without,
        the table's own policies. Policy goes first, so a service never serves before the
        policy meant for it (fail closed), and is rolled back last.
        Raises ValidationError for input that cannot fit, ApplyError otherwise."""
        with self.lock:
            done: list[Part] = []
            before = self.verdicts
            policy_done = False
            try:
                self.check_capacity(table)
                want, ignored = self._verdicts_for(table, verdicts)
                if want is not None:
                    policy_done = True
                    self.apply_policy(want)
                for part in self.parts:
                    done.append(part)
                    part.apply(table)
            except Exception as e:
                failed = done[-1].name if done else ("policy" if policy_done else "check")
                rolled = self._roll_back(done)
                if policy_done:
                    rolled += self._roll_back_policy(before)
                self.rejected_count += 1
                self.last_error = (f"{failed}: {e}" if done else str(e)) + rolled
                self._emit(Event("rejected", self.last_error, version))
                if isinstance(e, ValidationError):
                    raise
                raise ApplyError(self.last_error) from e
            # Counted from the change: summing 10,000 services would cost more than applying
            # one changed service does.
            d = table.delta(self.table)
            self.endpoint_count += _count(d.added) - _count(d.removed)
            self.table = table
            self.policy_ignored = ignored  # with the table it was compiled from, not before
            self.version = version
            self.applied_count += 1
            self.last_error = ""
            self._emit(Event("applied", f"{len(table.services)} services, "
                             f"{self.endpoint_count} endpoints", version))
            log.info("applied version %r: %d services", version, len(table.services))
            self._set_ready()

    def _roll_back_policy(self, before: Verdicts | None) -> str:
        try:
            self.apply_policy(before or Verdicts())
        except Exception as e:  # the live slot stays whichever table was last whole
            log.error("rolling the policy back failed: %s", e)
            return f"; policy rollback failed: {e}"
        return ""

    def _roll_back(self, parts: list[Part]) -> str:
        """The previous table into each part that (partly) took the new one."""
        errors = []
        for part in reversed(parts):
            try:
                part.apply(self.table)
            except Exception as e:  # say so: the part now holds a mix
                errors.append(f"{part.name}: {e}")
                log.error("rolling %s back to version %r failed: %s", part.name,
                          self.version, e)
        if errors:
            return "; rollback failed: " + "; ".join(errors)
        return f"; rolled back to version {self.version!r}" if parts else ""

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
        return {
            "version": __version__,
            "ready": self.ready.is_set(),
            "not_ready": "" if self.ready.is_set() else self.not_ready,
            "compiled": self.datapath.compiled,
            "seconds_to_ready": self.ready_after,
            "source": self.source,
            "uptime_s": round(time.time() - self.started, 3),
            "config_version": self.version,
            "services": len(self.table.services),
            "services_left": len(self.xds.report()[0]) if self.xds is not None else 0,
            "applied": self.applied_count,
            "rejected": self.rejected_count,
            "last_error": self.last_error,
            "pin_dir": self.datapath.pin_dir,
            "maps": {**self.datapath.usage(),
                     **({"pods": self.pods.usage()} if self.pods is not None else {})},
            "cgroup": str(self.datapath.cgroup),
            "xds": self.xds.state() if self.xds is not None else None,
            "edge": self.edge.status() if self.edge is not None else None,
            "pod_routing": self.pods.status() if self.pods is not None else None,
            "policy": self.policy_status(),
            "redirect_unavailable": fastpath_offsets().missing or None,
            "qos": qos_mechanisms(),
        }

    def policy_status(self) -> dict[str, Any] | None:
        """Policies enforced, their counters, map use, and what the compiler left."""
        if self.policy is None:
            return None
        st = self.policy.status()
        return {"policies": {n: dataclasses.asdict(c) for n, c in sorted(st.policies.items())},
                "default": dataclasses.asdict(st.default),
                "maps": {n: dataclasses.asdict(u) for n, u in st.maps.items()},
                "guarded": list(st.guarded), "namespaces": st.namespaces,
                "ignored": {**self.policy_ignored,
                            **(self.xds.policy_ignored() if self.xds else {})}}

    def stats(self) -> dict[str, Any]:
        # Under the lock: the service writer's index changes while a table is applied.
        with self.lock:
            out: dict[str, Any] = {"global": self.datapath.counters(),
                                   "services": self.datapath.service_counters()}
            for name, q in self.datapath.qos_counters().items():  # limited services
                out["services"].setdefault(name, {}).update(
                    refused_by_limit=q["refused"], paced=q["paced"], repaced=q["repaced"],
                    paced_live=max(0, q["live"]), paced_light=q["light"])
            if self.edge is not None:
                out["edge"] = self.edge.counters()
            if self.flows is not None:
                out["flows"] = self.flows.stats()
        return out

    # ---- events --------------------------------------------------------------------------

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


def _every(n: int, fn: Callable[[], Any]) -> Callable[[], None]:
    ticks = {"n": 0}

    def tick() -> None:
        ticks["n"] += 1
        if ticks["n"] % n == 0:
            fn()

    return tick
