"""Docker as a table source: services from container labels, followed through Engine events.

A container joins the mesh with labels (compose: `labels:` of a service):

  meshaccel.service=<name>    required: the service this container is an endpoint of
  meshaccel.port=<port>       required: the port it serves, also the VIP's port
  meshaccel.weight=<n>        optional, 1-65535, default 1
  meshaccel.vip=<ip>          optional: pin the service's VIP (else allocated from the CIDR)
  meshaccel.protocol=TCP|UDP  optional, default TCP
  meshaccel.network=<name>    optional: which of the container's networks gives the endpoint
                              address (a compose network name works: <project>_<name>);
                              without it, the only network, else the first by name
  meshaccel.namespace=<ns>    optional, default `default`: the workload's namespace and
  meshaccel.service_account=<sa>  service account (default `default`), as policies name it

Endpoint address: the container's IP on that network. Health: an endpoint is healthy when the
container is running, not paused, not being stopped (a `kill` event with TERM/KILL drains it at
once, before it dies) and, if it has a healthcheck, `healthy`. A service stays in the table
(with its VIP) while any of its containers exists, even stopped; it goes when the last one is
removed. VIPs come from accel.sources.vips (deterministic per set of names). The subnets of the
endpoints' networks become mesh_cidrs, so every container on them counts as a mesh socket.

A container with bad labels is left out (logged, listed in `errors`); a table that fails
validation is not published and the last good one stays.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from accel.model import (
    DEFAULT_FASTPATH,
    DEFAULT_NAMESPACE,
    DEFAULT_SERVICE_ACCOUNT,
    MAX_BURST,
    NO_LIMITS,
    PROTOCOLS,
    Endpoint,
    IPAddress,
    IPNetwork,
    Limits,
    Service,
    ServiceTable,
    ValidationError,
    check_fastpath,
    check_name,
    parse_address,
    parse_bandwidth,
    parse_connection_rate,
)
from accel.sources import OnChange
from accel.sources.vips import DEFAULT_VIP_CIDR, allocate, parse_cidr

log = logging.getLogger(__name__)

LABEL_SERVICE = "meshaccel.service"
LABEL_PORT = "meshaccel.port"
LABEL_WEIGHT = "meshaccel.weight"
LABEL_VIP = "meshaccel.vip"
LABEL_PROTOCOL = "meshaccel.protocol"
LABEL_NETWORK = "meshaccel.network"
LABEL_FASTPATH = "meshaccel.fastpath"
LABEL_NAMESPACE = "meshaccel.namespace"
LABEL_SERVICE_ACCOUNT = "meshaccel.service_account"
# The service's QoS (mesh.yaml's limits): bit/s such as 50Mbit; connections such as 100/s.
LABEL_BANDWIDTH = "meshaccel.bandwidth"
LABEL_CONNECTIONS = "meshaccel.connections"
LABEL_BURST = "meshaccel.burst"
COMPOSE_PROJECT = "com.docker.compose.project"

# Container events that can change the table; network connect/disconnect too.
_EVENTS = {"create", "start", "restart", "die", "stop", "kill", "pause", "unpause", "destroy",
           "rename", "update", "oom"}
_DRAIN_SIGNALS = {"15", "9", "SIGTERM", "SIGKILL", "TERM", "KILL"}


@dataclass(frozen=True)
class Member:
    """One labelled container as the table sees it."""

    container: str  # name, for messages
    service: str
    port: int
    protocol: str
    weight: int
    vip: IPAddress | None
    address: IPAddress | None  # None: not running, so no endpoint
    subnet: IPNetwork | None
    healthy: bool
    fastpath: str = DEFAULT_FASTPATH
    namespace: str = DEFAULT_NAMESPACE
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    limits: Limits = NO_LIMITS


def _limits(labels: dict[str, str]) -> Limits:
    """The QoS labels; each error names its label."""
    raw_bw = (labels.get(LABEL_BANDWIDTH) or "").strip()
    raw_conn = (labels.get(LABEL_CONNECTIONS) or "").strip()
    bandwidth = parse_bandwidth(raw_bw, LABEL_BANDWIDTH) if raw_bw else 0
    connections = parse_connection_rate(raw_conn, LABEL_CONNECTIONS) if raw_conn else 0.0
    burst = _label_int(labels, LABEL_BURST, 0, 1, MAX_BURST) if labels.get(LABEL_BURST) else 0
    try:
        return Limits(bandwidth=bandwidth, connections=connections, burst=burst)
    except ValidationError as e:
        raise ValidationError(f"meshaccel.{e.path}", e.reason) from None


def _label_int(labels: dict[str, str], key: str, default: int | None, low: int, high: int) -> int:
    raw = labels.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValidationError(key, "label is required")
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValidationError(key, f"expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ValidationError(key, f"{value} is out of range {low}-{high}")
    return value


def _pick_network(info: dict[str, Any], wanted: str | None) -> tuple[str, dict] | None:
    networks: dict[str, dict] = (info.get("NetworkSettings") or {}).get("Networks") or {}
    with_ip = {n: s for n, s in networks.items() if s and (s.get("IPAddress")
                                                           or s.get("GlobalIPv6Address"))}
    if wanted:
        project = ((info.get("Config") or {}).get("Labels") or {}).get(COMPOSE_PROJECT)
        for name in (wanted, f"{project}_{wanted}" if project else None):
            if name and name in with_ip:
                return name, with_ip[name]
        if networks:
            raise ValidationError(LABEL_NETWORK, f"container is not on network {wanted!r} "
                                  f"(it is on {', '.join(sorted(networks)) or 'none'})")
        return None
    if not with_ip:
        return None
    name = sorted(with_ip)[0]
    return name, with_ip[name]


def member_from_inspect(info: dict[str, Any], draining: Iterable[str] = (),
                        network: str | None = None) -> Member:
    """A Member from `docker inspect` output. Raises ValidationError for bad labels."""
    labels: dict[str, str] = (info.get("Config") or {}).get("Labels") or {}
    name = (info.get("Name") or info.get("Id", "?")[:12]).lstrip("/")
    service = (labels.get(LABEL_SERVICE) or "").strip()
    if not service:
        raise ValidationError(LABEL_SERVICE, "label is empty")
    port = _label_int(labels, LABEL_PORT, None, 1, 65535)
    weight = _label_int(labels, LABEL_WEIGHT, 1, 1, 65535)
    protocol = (labels.get(LABEL_PROTOCOL) or "TCP").strip().upper()
    if protocol not in PROTOCOLS:
        raise ValidationError(LABEL_PROTOCOL, f"{protocol!r} is not one of {PROTOCOLS}")
    vip = parse_address(labels[LABEL_VIP], LABEL_VIP) if labels.get(LABEL_VIP) else None
    fastpath = check_fastpath((labels.get(LABEL_FASTPATH) or DEFAULT_FASTPATH).strip(),
                              LABEL_FASTPATH)
    namespace = check_name((labels.get(LABEL_NAMESPACE) or DEFAULT_NAMESPACE).strip(),
                           LABEL_NAMESPACE)
    account = check_name((labels.get(LABEL_SERVICE_ACCOUNT) or DEFAULT_SERVICE_ACCOUNT)
                         .strip(), LABEL_SERVICE_ACCOUNT)

    state = info.get("State") or {}
    running = bool(state.get("Running")) and not state.get("Restarting")
    address = subnet = None
    healthy = False
    if running:
        picked = _pick_network(info, labels.get(LABEL_NETWORK) or network)
        if picked:
            _, net = picked
            if net.get("IPAddress"):
                address = ipaddress.ip_address(net["IPAddress"])
                plen = net.get("IPPrefixLen") or 32
            else:
                address = ipaddress.ip_address(net["GlobalIPv6Address"])
                plen = net.get("GlobalIPv6PrefixLen") or 128
            subnet = ipaddress.ip_network(f"{address}/{plen}", strict=False)
            health = (state.get("Health") or {}).get("Status")
            healthy = (not state.get("Paused") and info.get("Id") not in set(draining)
                       and health in (None, "", "healthy"))
    return Member(name, service, port, protocol, weight, vip, address, subnet, healthy,
                  fastpath, namespace, account, _limits(labels))


def table_from_members(
    members: Iterable[Member],
    cidr: str | IPNetwork = DEFAULT_VIP_CIDR,
    mesh_cidrs: Iterable[IPNetwork] = (),
    problems: dict[str, str] | None = None,
) -> ServiceTable:
    """Group members by service. Containers of one service that disagree on port, VIP or
    protocol: the most common value wins (ties: the smallest), with a warning. A service that
    cannot be built (its pinned VIP:port is another's) is left out and named in `problems`."""
    problems = {} if problems is None else problems
    by_service: dict[str, list[Member]] = {}
    for m in members:
        by_service.setdefault(m.service, []).append(m)

    def agreed(name: str, what: str, values: list) -> Any:
        counts: dict = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        best = sorted(counts, key=lambda v: (-counts[v], str(v)))[0]
        if len(counts) > 1:
            log.warning("service %s: containers disagree on %s (%s); using %s", name, what,
                        ", ".join(sorted(map(str, counts))), best)
        return best

    spec: dict[str, tuple[int, str, IPAddress | None, str, Limits]] = {}
    for name, ms in by_service.items():
        pinned = [m.vip for m in ms if m.vip is not None]
        spec[name] = (agreed(name, LABEL_PORT, [m.port for m in ms]),
                      agreed(name, LABEL_PROTOCOL, [m.protocol for m in ms]),
                      agreed(name, LABEL_VIP, pinned) if pinned else None,
                      agreed(name, LABEL_FASTPATH, [m.fastpath for m in ms]),
                      agreed(name, "meshaccel.bandwidth/connections/burst",
                             [m.limits for m in ms]))
    vips = allocate(by_service, cidr, {n: s[2] for n, s in spec.items() if s[2] is not None})

    services: list[Service] = []
    keys: dict[tuple, str] = {}
    subnets = set(mesh_cidrs)
    # Pinned services first, so an allocated VIP never pushes out a pinned one.
    for name in sorted(by_service, key=lambda n: (spec[n][2] is None, n)):
        port, protocol, _, fastpath, limits = spec[name]
        eps: dict[tuple[IPAddress, int], Endpoint] = {}
        for m in sorted(by_service[name], key=lambda m: m.container):
            if m.address is None:
                continue
            key = (m.address, port)
            if key in eps:
                log.warning("service %s: %s has the same address as another container", name,
                            m.container)
                continue
            eps[key] = Endpoint(m.address, port, m.weight, m.healthy,
                                namespace=m.namespace, service_account=m.service_account)
        try:
            svc = Service(name, vips[name], port, protocol, tuple(eps.values()),
                          fastpath=fastpath, limits=limits)
        except ValidationError as e:
            problems[f"service {name}"] = str(e)
            continue
        if svc.key in keys:
            problems[f"service {name}"] = (f"{svc.vip}:{port}/{protocol} is already used by "
                                           f"service {keys[svc.key]!r}")
            continue
        keys[svc.key] = name
        services.append(svc)
        subnets.update(m.subnet for m in by_service[name] if m.subnet is not None)
    services.sort(key=lambda s: s.name)
    return ServiceTable(services=tuple(services), mesh_cidrs=tuple(
        sorted(subnets, key=lambda n: (n.version, str(n)))))


class DockerSource:
    """TableSource over the Docker Engine API (the docker SDK's low-level client)."""

    def __init__(self, cidr: str = DEFAULT_VIP_CIDR, client: Any = None, *,
                 network: str | None = None, mesh_cidrs: Iterable[str] = (),
                 selector: Iterable[str] = (),
                 resync_interval: float = 30.0, debounce: float = 0.02):
        self.cidr = parse_cidr(cidr)
        self.network = network
        self.mesh_cidrs = tuple(parse_cidr(c, "mesh_cidrs") for c in mesh_cidrs)
        # Extra label filters ("key" or "key=value"): only matching containers are seen.
        self.selector = tuple(selector)
        self.resync_interval = resync_interval
        self.debounce = debounce
        if client is None:
            import docker

            try:
                client = docker.from_env()
            except docker.errors.DockerException as e:
                raise ConnectionError(f"cannot reach the Docker Engine: {e}") from None
        self.api = getattr(client, "api", client)  # DockerClient or APIClient
        self.errors: dict[str, str] = {}  # "container X" / "service Y" -> why it was left out
        self.last_error: str | None = None
        self._draining: set[str] = set()
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._stream: Any = None
        self._threads: list[threading.Thread] = []
        try:
            self._table = self.scan()
        except ValidationError:
            raise
        except Exception as e:  # docker.errors.APIError, requests' ConnectionError
            raise ConnectionError(f"cannot list containers from the Docker Engine: {e}") from None

    # -- reading Docker --------------------------------------------------------------------

    def scan(self) -> ServiceTable:
        """Read every labelled container now and build the table (raises ValidationError)."""
        members: list[Member] = []
        errors: dict[str, str] = {}
        known: set[str] = set()
        with self._lock:
            draining = set(self._draining)
        filters = {"label": [LABEL_SERVICE, *self.selector]}
        for summary in self.api.containers(all=True, filters=filters):
            cid = summary["Id"]
            try:
                info = self.api.inspect_container(cid)
            except Exception as e:  # removed between list and inspect
                log.debug("inspect %s: %s", cid[:12], e)
                continue
            known.add(cid)
            try:
                members.append(member_from_inspect(info, draining, self.network))
            except ValidationError as e:
                errors["container " + (info.get("Name") or cid[:12]).lstrip("/")] = str(e)
        table = table_from_members(members, self.cidr, self.mesh_cidrs, errors)
        for c, why in errors.items():
            if self.errors.get(c) != why:
                log.error("%s left out of the mesh: %s", c, why)
        self.errors = errors
        self._known = known
        return table

    def hosts(self) -> dict[str, IPAddress]:
        """Service name -> VIP of the current table."""
        return {s.name: s.vip for s in self._table.services}

    # -- TableSource -----------------------------------------------------------------------

    def current(self) -> ServiceTable:
        return self._table

    def watch(self, on_change: OnChange) -> None:
        self._on_change = on_change
        for target, name in ((self._follow_events, "docker-events"),
                             (self._publish_loop, "docker-source")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        self._kick.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass
        for t in self._threads:
            t.join(timeout=2)

    # -- internals -------------------------------------------------------------------------

    def _handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("Type")
        action = (ev.get("Action") or "").split(":")[0]
        actor = ev.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        cid = actor.get("ID") or ev.get("id") or ""
        if kind == "network":
            if attrs.get("container") in self._known and action in ("connect", "disconnect"):
                self._kick.set()
            return
        if kind != "container" or LABEL_SERVICE not in attrs or not self._selected(attrs):
            return
        if action == "health_status" or action in _EVENTS:
            with self._lock:
                if action == "kill" and attrs.get("signal") in _DRAIN_SIGNALS:
                    self._draining.add(cid)  # stopping: no new connections from now on
                elif action in ("start", "restart", "die", "destroy", "unpause"):
                    self._draining.discard(cid)
            self._kick.set()

    def _selected(self, labels: dict[str, str]) -> bool:
        for sel in self.selector:
            key, eq, value = sel.partition("=")
            if key not in labels or (eq and labels[key] != value):
                return False
        return True

    def _follow_events(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._stream = self.api.events(
                    decode=True, filters={"type": ["container", "network"]})
                self._kick.set()  # events may have been missed while disconnected
                for ev in self._stream:
                    backoff = 0.2
                    self._handle(ev)
                    if self._stop.is_set():
                        return
                if not self._stop.is_set():
                    log.warning("docker event stream ended; reconnecting")
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("docker event stream lost (%s); reconnecting in %.1fs", e, backoff)
            with self._lock:
                self._draining.clear()  # the rescan after reconnecting sees the true state
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.resync_interval)
            if self._stop.is_set():
                return
            self._stop.wait(self.debounce)  # one rescan for a burst of events
            self._kick.clear()
            try:
                table = self.scan()
            except ValidationError as e:
                self.last_error = str(e)
                log.error("docker: %s (keeping the last good table)", e)
                continue
            except Exception as e:
                self.last_error = f"cannot read containers: {e}"
                log.warning("docker: %s", self.last_error)
                self._stop.wait(1.0)
                self._kick.set()
                continue
            self.last_error = None
            if table.canonical() == self._table.canonical():
                continue
            self._table = table
            try:
                self._on_change(table)
            except Exception:  # the watcher must outlive a failing consumer
                log.exception("applying the docker table failed")
