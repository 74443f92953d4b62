"""Prometheus metrics of a running agent, collected when scraped (nothing polls).

Names: every datapath counter as meshaccel_<counter>_total; per-service
meshaccel_service_{connects,no_backend}_total{service=...}; the configuration
(meshaccel_config_{applied,rejected}_total, meshaccel_config_{services,endpoints},
meshaccel_config_info);
xDS (meshaccel_xds_connected, meshaccel_xds_nack{type_url}, meshaccel_xds_resources,
meshaccel_xds_last_update_timestamp_seconds, meshaccel_xds_ack_info{type_url,version});
map fill (meshaccel_map_entries{map}, meshaccel_map_capacity{map}); from the connection
records (accel/flows), per service{service,namespace}:
meshaccel_service_connections_total, meshaccel_service_connections_active,
meshaccel_service_bytes_total{direction}, meshaccel_service_connect_failures_total{reason},
meshaccel_service_connection_duration_seconds (histogram), per endpoint (at most
ENDPOINT_SERIES, then endpoint="other") meshaccel_endpoint_connections_total and
meshaccel_endpoint_bytes_total{direction}, and the records' own
meshaccel_flow_{events,dropped,read,watch_dropped,undecodable}_total; the XDP edge's
counters as meshaccel_edge_<counter>_total and meshaccel_edge_vip_<counter>_total{service,
vip,port,protocol} when an edge runs; L4 authorization, once a policy was applied:
meshaccel_policy_decisions_total{policy,decision} (decision allowed, denied, dry_run_denied,
closed_by_update; policy "" for a destination's default) and meshaccel_policies.
A part that cannot be read is reported by meshaccel_scrape_errors{part} instead of failing
the whole scrape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from accel.api.convert import XDS_SCALARS, flatten
from accel.model import ValidationError

if TYPE_CHECKING:
    from accel.runtime import Runtime

log = logging.getLogger(__name__)



def metric_name(*parts: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", "_".join(("meshaccel",) + parts))


class AgentCollector(Collector):
    def __init__(self, agent: Runtime):
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        errors: list[str] = []
        yield from self._guarded("config", errors, self._config)
        yield from self._guarded("datapath", errors, self._stats)
        yield from self._guarded("xds", errors, self._xds)
        yield from self._guarded("maps", errors, self._maps)
        yield from self._guarded("flows", errors, self._flows)
        yield from self._guarded("policy", errors, self._policy)
        g = GaugeMetricFamily("meshaccel_scrape_errors",
                              "1 for each part of the agent that could not be read",
                              labels=["part"])
        for part in errors:
            g.add_metric([part], 1)
        yield g

    def _guarded(self, part: str, errors: list[str], fn) -> Iterator[Any]:
        try:
            # Materialized first: a failure half way must not leave half a family out.
            yield from list(fn())
        except Exception as e:
            log.warning("metrics: reading %s: %s", part, e)
            errors.append(part)

    def _config(self) -> Iterator[Any]:
        a = self.agent
        yield CounterMetricFamily("meshaccel_config_applied", "service tables applied",
                                  value=a.applied_count)
        yield CounterMetricFamily("meshaccel_config_rejected",
                                  "service tables rejected (the last good one stayed)",
                                  value=a.rejected_count)
        yield GaugeMetricFamily("meshaccel_config_services", "services in the table in force",
                                value=len(a.table.services))
        yield GaugeMetricFamily("meshaccel_config_endpoints", "endpoints in the table in force",
                                value=sum(len(s.endpoints) for s in a.table.services))
        info = InfoMetricFamily("meshaccel_config", "the configuration in force",
                                labels=["source", "version"])
        info.add_metric([], {"source": a.source, "version": a.version})
        yield info
        yield GaugeMetricFamily("meshaccel_start_time_seconds", "when the agent started",
                                value=a.started)

    def _maps(self) -> Iterator[Any]:
        usage = self.agent.datapath.usage()
        used = GaugeMetricFamily("meshaccel_map_entries", "entries in use", labels=["map"])
        cap = GaugeMetricFamily("meshaccel_map_capacity", "entries the map can hold",
                                labels=["map"])
        for name, u in usage.items():
            used.add_metric([name], u.get("used", 0))
            cap.add_metric([name], u.get("capacity", 0))
        yield from (used, cap)

    def _stats(self) -> Iterator[Any]:
        stats = self.agent.stats()
        for name, value in (stats.get("global") or {}).items():
            yield CounterMetricFamily(metric_name(name), f"datapath counter {name}",
                                      value=value)
        fams = {
            key: CounterMetricFamily(f"meshaccel_service_{key}", doc, labels=["service"])
            for key, doc in (("connects", "connections balanced to an endpoint"),
                             ("no_backend", "connections refused: no usable endpoint"),
                             ("refused_by_limit", "connections refused (EPERM): over the "
                              "service's connection rate limit"),
                             ("paced", "connections paced by the service's bandwidth limit"),
                             ("repaced", "pacing rate changes on live connections"))
        }
        gauges = {
            key: GaugeMetricFamily(f"meshaccel_service_{key}", doc, labels=["service"])
            for key, doc in (("paced_live", "paced connections open now"),
                             ("paced_light", "paced connections that used less than their "
                              "share in the last window (the others share what they leave)"))
        }
        for svc, counts in (stats.get("services") or {}).items():
            for key, fam in fams.items():
                fam.add_metric([svc], counts.get(key, 0))
            for key, gauge in gauges.items():
                if key in counts:
                    gauge.add_metric([svc], counts[key])
        yield from fams.values()
        yield from gauges.values()
        edge = stats.get("edge")
        if isinstance(edge, dict):
            for name, value in flatten(edge.get("global") or {}).items():
                yield CounterMetricFamily(metric_name("edge", name), f"XDP edge counter {name}",
                                          value=value)
            labels = ["service", "vip", "port", "protocol"]
            per_vip: dict[str, CounterMetricFamily] = {}
            for row in edge.get("vips") or []:
                values = [str(row.get(k, "")) for k in labels]
                for name, value in flatten({k: v for k, v in row.items()
                                            if k not in labels}).items():
                    fam = per_vip.get(name)
                    if fam is None:
                        fam = per_vip[name] = CounterMetricFamily(
                            metric_name("edge_vip", name), f"XDP edge per-VIP {name}",
                            labels=labels)
                    fam.add_metric(values, value)
            yield from per_vip.values()

    def _flows(self) -> Iterator[Any]:
        from accel.flows.store import DURATION_BUCKETS

        flows = self.agent.flows
        if flows is None:
            return
        for name, value in flows.stats().items():
            yield CounterMetricFamily(metric_name("flow", name),
                                      f"connection records: {name}", value=value)
        services, endpoints = flows.store.snapshot()
        labels = ["service", "namespace"]
        conns = CounterMetricFamily("meshaccel_service_connections",
                                    "connections dialed through the service's VIP", labels=labels)
        active = GaugeMetricFamily("meshaccel_service_connections_active",
                                   "connections open now", labels=labels)
        nbytes = CounterMetricFamily("meshaccel_service_bytes", "bytes, as the clients saw them",
                                     labels=labels + ["direction"])
        failed = CounterMetricFamily("meshaccel_service_connect_failures",
                                     "connect() refused, by reason", labels=labels + ["reason"])
        hist = HistogramMetricFamily("meshaccel_service_connection_duration_seconds",
                                     "connect() to close", labels=labels)
        for key, t in sorted(services.items()):
            k = list(key)
            conns.add_metric(k, t.connections)
            active.add_metric(k, t.active)
            nbytes.add_metric(k + ["sent"], t.sent)
            nbytes.add_metric(k + ["received"], t.received)
            for reason, n in sorted(t.failures.items()):
                failed.add_metric(k + [reason], n)
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), t.buckets, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric(k, buckets, t.duration_sum)
        ep_conns = CounterMetricFamily("meshaccel_endpoint_connections",
                                       "connections balanced to the endpoint",
                                       labels=labels + ["endpoint"])
        ep_bytes = CounterMetricFamily("meshaccel_endpoint_bytes", "bytes, as the clients saw them",
                                       labels=labels + ["endpoint", "direction"])
        for key, e in sorted(endpoints.items()):
            k = list(key)
            ep_conns.add_metric(k, e.connections)
            ep_bytes.add_metric(k + ["sent"], e.sent)
            ep_bytes.add_metric(k + ["received"], e.received)
        yield from (conns, active, nbytes, failed, hist, ep_conns, ep_bytes)
    def _policy(self) -> Iterator[Any]:
        st = self.agent.policy_status()
        if st is None:
            return
        fam = CounterMetricFamily("meshaccel_policy_decisions",
                                  "connections decided by L4 authorization, by policy",
                                  labels=["policy", "decision"])
        for name, counters in [*st["policies"].items(), ("", st["default"])]:
            for decision, value in counters.items():
                fam.add_metric([name, decision], value)
        yield fam
        yield GaugeMetricFamily("meshaccel_policies", "authorization policies enforced",
                                value=len(st["policies"]))

    def _xds(self) -> Iterator[Any]:
        state = self.agent.xds.state() if self.agent.xds is not None else None
        if not isinstance(state, dict):
            return
        yield GaugeMetricFamily("meshaccel_xds_connected", "1 while the ADS stream is up",
                                value=1 if state.get("connected") else 0)
        yield CounterMetricFamily("meshaccel_xds_reconnects", "ADS stream reconnects",
                                  value=state.get("reconnects") or 0)
        nack = GaugeMetricFamily("meshaccel_xds_nack",
                                 "1 if the last response of this type was NACKed",
                                 labels=["type_url"])
        resources = GaugeMetricFamily("meshaccel_xds_resources", "resources of this type",
                                      labels=["type_url"])
        updated = GaugeMetricFamily("meshaccel_xds_last_update_timestamp_seconds",
                                    "when the last response of this type arrived",
                                    labels=["type_url"])
        ack = InfoMetricFamily("meshaccel_xds_ack", "the version last ACKed per type",
                               labels=["type_url"])
        for url, ts in state.items():
            if url in XDS_SCALARS or not isinstance(ts, dict):
                continue
            nack.add_metric([url], 1 if ts.get("last_nack_error") else 0)
            resources.add_metric([url], ts.get("resource_count") or 0)
            updated.add_metric([url], ts.get("last_update_time") or 0)
            ack.add_metric([url], {"version": str(ts.get("last_ack_version") or "")})
        yield from (nack, resources, updated, ack)


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValidationError("--metrics", f"{addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9478")
    return host, int(port)


@dataclass
class MetricsServer:
    httpd: Any
    thread: Any
    port: int

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(2)


def serve(agent: Runtime, addr: str) -> MetricsServer:
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    bound = httpd.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(httpd, thread, bound)
