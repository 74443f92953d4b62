"""ServiceTable and agent state <-> API messages, both directions.

Incoming tables go through accel.config's dict parser, so the API, mesh.yaml and xDS share
one set of rules and error paths ("services[reviews].endpoints[1].port: ...").
Outgoing dicts (client side) keep the shapes of Agent.status() and Agent.stats(), so
`--json` output does not depend on whether it came over the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from accel import config
from accel.api.gen import agent_pb2 as pb
from accel.model import DEFAULT_FASTPATH, Guard, Limits, ServiceTable, ValidationError

if TYPE_CHECKING:
    from accel.flows.record import FlowRecord

# ---- tables ---------------------------------------------------------------------------------


def _guard_dict(g: pb.Guard) -> dict[str, Any]:
    d: dict[str, Any] = {"deny": list(g.deny), "syn_rate": g.syn_rate}
    if g.syn_burst:  # 0 = unset: mesh.yaml's rule (burst defaults to the rate) applies
        d["syn_burst"] = g.syn_burst
    return d


def table_to_dict(msg: pb.ServiceTable) -> dict[str, Any]:
    services = []
    for s in msg.services:
        eps = []
        for e in s.endpoints:
            ep: dict[str, Any] = {"address": e.address, "port": e.port}
            if e.HasField("weight"):
                ep["weight"] = e.weight
            if e.HasField("healthy"):
                ep["healthy"] = e.healthy
            eps.append(ep)
        d: dict[str, Any] = {"name": s.name, "vip": s.vip, "port": s.port,
                             "endpoints": eps, "edge": s.edge}
        if s.protocol:
            d["protocol"] = s.protocol
        if s.fastpath:
            d["fastpath"] = s.fastpath
        limits = _limits_dict(s.limits)
        if limits:
            d["limits"] = limits
        services.append(d)
    out: dict[str, Any] = {"services": services, "mesh_cidrs": list(msg.mesh_cidrs)}
    if msg.fastpath:
        out["fastpath"] = msg.fastpath
    if msg.HasField("guard"):
        out["guard"] = _guard_dict(msg.guard)
    return out


def _limits_dict(lim: pb.Limits) -> dict[str, Any]:
    """mesh.yaml's limits mapping from the message: only what is set (0 = none)."""
    return {k: v for k, v in (("bandwidth", lim.bandwidth), ("connections", lim.connections),
                              ("burst", lim.burst)) if v}


def limits_to_proto(lim: Limits) -> pb.Limits | None:
    return pb.Limits(bandwidth=lim.bandwidth, connections=lim.connections,
                     burst=lim.burst) if lim else None


def limits_json(lim: pb.Limits) -> dict[str, Any]:
    """Client side: the limits as mesh.yaml writes them ({} for none)."""
    return Limits(bandwidth=lim.bandwidth, connections=lim.connections,
                  burst=lim.burst).to_dict() if lim.bandwidth or lim.connections else {}


def _within(prefix: str, fn, *args):
    try:
        return fn(*args)
    except ValidationError as e:
        raise ValidationError(f"{prefix}.{e.path}" if e.path else prefix, e.reason) from None


def table_from_proto(msg: pb.ServiceTable) -> ServiceTable:
    """Validated table; ValidationError's path starts with "table"."""
    return _within("table", config.table_from_dict, table_to_dict(msg))


def guard_from_proto(msg: pb.Guard) -> Guard:
    """Validated guard; ValidationError's path starts with "guard" (parse_guard's own)."""
    return config.parse_guard(_guard_dict(msg))


def guard_to_proto(g: Guard) -> pb.Guard:
    return pb.Guard(deny=[str(c) for c in g.deny], syn_rate=g.syn_rate, syn_burst=g.syn_burst)


def table_to_proto(t: ServiceTable) -> pb.ServiceTable:
    return pb.ServiceTable(
        services=[
            pb.Service(
                name=s.name, vip=str(s.vip), port=s.port, protocol=s.protocol, edge=s.edge,
                fastpath=s.fastpath, limits=limits_to_proto(s.limits),
                endpoints=[pb.Endpoint(address=str(e.address), port=e.port, weight=e.weight,
                                       healthy=e.healthy) for e in s.endpoints],
            )
            for s in t.services
        ],
        mesh_cidrs=[str(c) for c in t.mesh_cidrs],
        guard=guard_to_proto(t.guard),
        fastpath=t.fastpath,
    )


def table_msg_to_json(msg: pb.ServiceTable) -> dict[str, Any]:
    """Client side: the mesh.yaml shape, with every default filled in."""
    return {
        "services": [
            {
                "name": s.name, "vip": s.vip, "port": s.port, "protocol": s.protocol or "TCP",
                "edge": s.edge, "fastpath": s.fastpath or DEFAULT_FASTPATH,
                "limits": limits_json(s.limits),
                "endpoints": [
                    {"address": e.address, "port": e.port,
                     "weight": e.weight if e.HasField("weight") else 1,
                     "healthy": e.healthy if e.HasField("healthy") else True}
                    for e in s.endpoints
                ],
            }
            for s in msg.services
        ],
        "mesh_cidrs": list(msg.mesh_cidrs),
        "fastpath": msg.fastpath or DEFAULT_FASTPATH,
        "guard": {"deny": list(msg.guard.deny), "syn_rate": msg.guard.syn_rate,
                  "syn_burst": msg.guard.syn_burst},
    }


# ---- status ---------------------------------------------------------------------------------

# Keys of the xDS client's state that are not a resource type's.
XDS_SCALARS = {"connected", "target", "node_id", "reconnects", "services", "pending",
                "skipped", "ignored", "protocol", "api", "workloads", "policies",
                "policy_ignored"}
COUNTERS = ("allowed", "denied", "dry_run_denied", "closed_by_update")


def status_to_proto(st: dict[str, Any]) -> pb.GetStatusResponse:
    msg = pb.GetStatusResponse(
        version=st.get("version", ""), source=st.get("source", ""),
        config_version=st.get("config_version") or "",
        uptime_seconds=float(st.get("uptime_s") or 0.0),
        services=int(st.get("services") or 0), applied=int(st.get("applied") or 0),
        services_left=int(st.get("services_left") or 0),
        rejected=int(st.get("rejected") or 0), last_error=st.get("last_error") or "",
        pin_dir=st.get("pin_dir") or "", cgroup=st.get("cgroup") or "",
        redirect_unavailable=st.get("redirect_unavailable") or "",
        ready=bool(st.get("ready")), not_ready=st.get("not_ready") or "",
        compiled=bool(st.get("compiled")),
        seconds_to_ready=float(st.get("seconds_to_ready") or 0.0),
    )
    xds = st.get("xds")
    if isinstance(xds, dict):
        msg.xds.enabled = True
        msg.xds.connected = bool(xds.get("connected"))
        msg.xds.target = str(xds.get("target") or "")
        msg.xds.node_id = str(xds.get("node_id") or "")
        msg.xds.reconnects = int(xds.get("reconnects") or 0)
        msg.xds.api = str(xds.get("api") or "envoy")
        msg.xds.workloads = int(xds.get("workloads") or 0)
        msg.xds.policies = int(xds.get("policies") or 0)
        for k, v in (xds.get("pending") or {}).items():
            msg.xds.pending[str(k)] = str(v)
        for k, v in (xds.get("skipped") or {}).items():
            msg.xds.skipped[str(k)] = str(v)
        for k, v in (xds.get("ignored") or {}).items():
            msg.xds.ignored[str(k)] = str(v)
        for type_url, ts in xds.items():
            if type_url in XDS_SCALARS or not isinstance(ts, dict):
                continue
            t = msg.xds.types[type_url]
            t.last_ack_version = str(ts.get("last_ack_version") or "")
            t.last_nonce = str(ts.get("last_nonce") or "")
            t.last_nack_error = str(ts.get("last_nack_error") or "")
            t.last_update_time = float(ts.get("last_update_time") or 0.0)
            t.resource_count = int(ts.get("resource_count") or 0)
    edge = st.get("edge")
    if edge is not None:
        e = msg.edge
        e.enabled = True
        e.iface, e.mode = edge.get("iface") or "", edge.get("mode") or ""
        e.maglev_size = int(edge.get("maglev_size") or 0)
        guard = edge.get("guard") or {}
        e.guard.deny.extend(str(n) for n in guard.get("deny") or ())
        e.guard.syn_rate, e.guard.syn_burst = (int(guard.get("syn_rate") or 0),
                                               int(guard.get("syn_burst") or 0))
        for v in edge.get("vips") or ():
            limit = v.get("connection_limit") or {}
            ev = e.vips.add(service=v["service"], vip=v["vip"], port=v["port"],
                            protocol=v["protocol"], dirty_slots=int(v.get("dirty_slots") or 0),
                            connection_limit=float(limit.get("connections") or 0),
                            connection_burst=int(limit.get("burst") or 0))
            for b in v.get("backends") or ():
                ev.backends.add(address=b["address"], port=b["port"], via=b["via"])
    pods = st.get("pod_routing")
    if pods is not None:
        p = msg.pod_routing
        p.enabled = True
        p.netns, p.error = pods.get("netns") or "", pods.get("error") or ""
        p.patterns.extend(pods.get("patterns") or ())
        for port in pods.get("ports") or ():
            p.ports.add(iface=port["iface"], addresses=port["addresses"],
                        bridge=port.get("bridge") or 0)
        p.addresses = int(pods.get("addresses") or 0)
        p.conflicts.extend(pods.get("conflicts") or ())
        for k, v in (pods.get("failures") or {}).items():
            p.failures[str(k)] = str(v)
    for name, u in (st.get("maps") or {}).items():
        msg.maps[name].used = int(u.get("used", 0))
        msg.maps[name].capacity = int(u.get("capacity", 0))
    pol = st.get("policy")
    if pol is not None:
        p = msg.policy
        p.enabled = True
        for name, c in (pol.get("policies") or {}).items():
            p.policies[name].CopyFrom(pb.PolicyCounters(**{k: int(c[k]) for k in COUNTERS}))
        p.defaults.CopyFrom(pb.PolicyCounters(**{k: int(pol["default"][k]) for k in COUNTERS}))
        for name, u in (pol.get("maps") or {}).items():
            p.maps[name].used, p.maps[name].capacity = int(u["used"]), int(u["capacity"])
        p.guarded.extend(pol.get("guarded") or ())
        p.namespaces = int(pol.get("namespaces") or 0)
        for k, v in (pol.get("ignored") or {}).items():
            p.ignored[str(k)] = str(v)
    qos = st.get("qos")
    if qos:
        msg.qos.CopyFrom(pb.QosStatus(bandwidth=qos["bandwidth"], connections=qos["connections"],
                                      refused_errno=qos["refused_errno"],
                                      note=qos["bandwidth_note"]))
    return msg


def _counters_json(c: pb.PolicyCounters) -> dict[str, int]:
    return {k: getattr(c, k) for k in COUNTERS}


def policy_json(p: pb.PolicyStatus) -> dict[str, Any] | None:
    if not p.enabled:
        return None
    return {"policies": {n: _counters_json(c) for n, c in sorted(p.policies.items())},
            "default": _counters_json(p.defaults),
            "maps": {n: {"used": u.used, "capacity": u.capacity}
                     for n, u in sorted(p.maps.items())},
            "guarded": list(p.guarded), "namespaces": p.namespaces,
            "ignored": dict(sorted(p.ignored.items()))}


def status_to_json(msg: pb.GetStatusResponse) -> dict[str, Any]:
    xds = None
    if msg.xds.enabled:
        xds = {
            "connected": msg.xds.connected, "target": msg.xds.target,
            "node_id": msg.xds.node_id, "reconnects": msg.xds.reconnects,
            "api": msg.xds.api or "envoy",
            **({"workloads": msg.xds.workloads, "policies": msg.xds.policies}
               if msg.xds.api == "workload" else {}),
            "pending": dict(msg.xds.pending),
            "skipped": dict(msg.xds.skipped),
            "ignored": dict(msg.xds.ignored),
            "types": {
                url: {"last_ack_version": t.last_ack_version, "last_nonce": t.last_nonce,
                      "last_nack_error": t.last_nack_error or None,
                      "last_update_time": t.last_update_time or None,
                      "resource_count": t.resource_count}
                for url, t in sorted(msg.xds.types.items())
            },
        }
    return {
        "version": msg.version, "source": msg.source, "config_version": msg.config_version,
        "uptime_s": round(msg.uptime_seconds, 3), "services": msg.services,
        "services_left": msg.services_left,
        "applied": msg.applied, "rejected": msg.rejected, "last_error": msg.last_error,
        "pin_dir": msg.pin_dir, "cgroup": msg.cgroup, "xds": xds,
        "maps": {n: {"used": u.used, "capacity": u.capacity} for n, u in sorted(msg.maps.items())},
        "edge": _edge_json(msg.edge) if msg.edge.enabled else None,
        "pod_routing": _pods_json(msg.pod_routing) if msg.pod_routing.enabled else None,
        "policy": policy_json(msg.policy),
        "redirect_unavailable": msg.redirect_unavailable or None,
        "ready": msg.ready,
        "not_ready": msg.not_ready,
        "compiled": msg.compiled,
        "seconds_to_ready": round(msg.seconds_to_ready, 3) if msg.ready else None,
        "qos": {"bandwidth": msg.qos.bandwidth, "connections": msg.qos.connections,
                "refused_errno": msg.qos.refused_errno, "bandwidth_note": msg.qos.note}
        if msg.HasField("qos") else None,
    }


# ---- stats ----------------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, int]:
    """Nested counters -> {"a.b": n}; anything not a number is left out."""
    out: dict[str, int] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
            out[name] = int(v)
    return out


SERVICE_COUNTERS = ("connects", "no_backend", "refused_by_limit", "paced", "repaced",
                    "paced_live", "paced_light")


def stats_to_proto(st: dict[str, Any]) -> pb.GetStatsResponse:
    msg = pb.GetStatsResponse()
    for k, v in (st.get("global") or {}).items():
        msg.global_counters[k] = int(v)
    for name, c in (st.get("services") or {}).items():
        for key in SERVICE_COUNTERS:
            setattr(msg.services[name], key, int(c.get(key, 0)))
    edge = st.get("edge")
    if isinstance(edge, dict):
        msg.edge.SetInParent()
        for k, v in flatten(edge.get("global") or {}).items():
            msg.edge.counters[k] = v
        for row in edge.get("vips") or []:
            vip = msg.edge.vips.add(service=str(row.get("service", "")),
                                    vip=str(row.get("vip", "")), port=int(row.get("port", 0)),
                                    protocol=str(row.get("protocol", "")))
            for k, v in flatten({k: v for k, v in row.items()
                                 if k not in ("service", "vip", "port", "protocol")}).items():
                vip.counters[k] = v
    for k, v in (st.get("flows") or {}).items():
        msg.flow_counters[k] = int(v)
    return msg


def edge_stats_to_json(msg: pb.EdgeStats) -> dict[str, Any]:
    """The shape EdgeDatapath.counters() has: {"global": {...}, "vips": [{...}]}."""
    return {
        "global": dict(msg.counters),
        "vips": [{"service": v.service, "vip": v.vip, "port": v.port, "protocol": v.protocol,
                  **dict(v.counters)} for v in msg.vips],
    }


def stats_to_json(msg: pb.GetStatsResponse) -> dict[str, Any]:
    return {
        "global": dict(msg.global_counters),
        "services": {n: {k: getattr(c, k) for k in SERVICE_COUNTERS}
                     for n, c in sorted(msg.services.items())},
        "edge": edge_stats_to_json(msg.edge) if msg.HasField("edge") else None,
        "flows": dict(msg.flow_counters) or None,
    }


FLOW_FIELDS = tuple(f.name for f in pb.Flow.DESCRIPTOR.fields)


def flow_to_proto(r: FlowRecord) -> pb.Flow:
    return pb.Flow(**{k: getattr(r, k) for k in FLOW_FIELDS})


def flow_to_json(msg: pb.Flow) -> dict[str, Any]:
    return {k: getattr(msg, k) for k in FLOW_FIELDS}


def event_to_json(msg: pb.Event) -> dict[str, Any]:
    return {"kind": msg.kind, "message": msg.message, "version": msg.version, "time": msg.time}


def _edge_json(e: pb.EdgeStatus) -> dict[str, Any]:
    return {"iface": e.iface or None, "mode": e.mode or None, "maglev_size": e.maglev_size,
            "guard": {"deny": list(e.guard.deny), "syn_rate": e.guard.syn_rate,
                      "syn_burst": e.guard.syn_burst},
            "vips": [{"service": v.service, "vip": v.vip, "port": v.port,
                      "protocol": v.protocol, "dirty_slots": v.dirty_slots,
                      "connection_limit": ({"connections": v.connection_limit,
                                            "burst": v.connection_burst}
                                           if v.connection_limit else None),
                      "backends": [{"address": b.address, "port": b.port, "via": b.via}
                                   for b in v.backends]} for v in e.vips]}


def _pods_json(p: pb.PodRoutingStatus) -> dict[str, Any]:
    out: dict[str, Any] = {
        "netns": p.netns, "patterns": list(p.patterns),
        "ports": [{"iface": x.iface, "addresses": list(x.addresses), "bridge": x.bridge or None}
                  for x in p.ports],
        "addresses": p.addresses, "conflicts": list(p.conflicts),
        "failures": dict(p.failures)}
    if p.error:
        out["error"] = p.error
    return out
