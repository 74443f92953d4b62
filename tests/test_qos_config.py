"""QoS limits from every source: mesh.yaml (parsed, refused naming the field, dumped back)
and xDS (Envoy's local_ratelimit + the meshaccel metadata's bandwidth, both ways)."""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.network.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.type.v3 import token_bucket_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2

from accel import config
from accel.model import Endpoint, Limits, Service, ServiceTable, ValidationError
from accel.xds import translate as tr
from accel.xds.kinds import META_KEY
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, tcp_listener

YAML = """services:
  - name: bulk
    vip: 10.96.0.10
    port: 80
    limits: LIMITS
    endpoints: [{address: 10.200.0.11, port: 80}]
"""


def load(limits: str) -> ServiceTable:
    return config.load_text(YAML.replace("LIMITS", limits))


def test_mesh_yaml_limits_parsed_and_dumped_back() -> None:
    t = load("{bandwidth: 200Mbit, connections: 100/s, burst: 20}")
    assert t.services[0].limits == Limits(bandwidth=200_000_000, connections=100.0, burst=20)
    assert config.load_text(config.dump(t)) == t
    assert "bandwidth: 200Mbit" in config.dump(t) and "connections: 100/s" in config.dump(t)
    assert load("{connections: 30/m}").services[0].limits == Limits(connections=0.5, burst=1)
    assert load("{bandwidth: 1.5Gbit}").services[0].limits.bandwidth == 1_500_000_000
    assert load("{bandwidth: 500k}").services[0].limits.bandwidth == 500_000
    assert not ServiceTable((Service("a", "10.96.0.1", 80),)).services[0].limits


@pytest.mark.parametrize("limits, error", [
    ("{bandwidth: 200Mbps}", "services[bulk].limits.bandwidth: expected a rate in bit/s"),
    ("{bandwidth: 0}", "services[bulk].limits.bandwidth: 0 is out of range"),
    ("{bandwidth: fast}", "services[bulk].limits.bandwidth: expected a rate in bit/s"),
    ("{connections: 5/x}", "services[bulk].limits.connections: expected connections per"),
    ("{connections: -5}", "services[bulk].limits.connections: -5 is out of range"),
    ("{burst: 3}", "services[bulk].limits.burst: a burst needs a connection rate"),
    ("{connections: 5/s, burst: 0.5}", "services[bulk].limits.burst: expected an integer"),
    ("{speed: 1}", "services[bulk].limits: unknown field(s) speed"),
    ("[1]", "services[bulk].limits: expected a mapping"),
])
def test_bad_limits_are_refused_naming_the_field(limits: str, error: str) -> None:
    with pytest.raises(ValidationError) as e:
        load(limits)
    assert str(e.value).startswith(error), str(e.value)


def bucket(max_tokens: int, per_fill: int | None, interval_ms: int):
    tb = token_bucket_pb2.TokenBucket(
        max_tokens=max_tokens,
        fill_interval=duration_pb2.Duration(seconds=interval_ms // 1000,
                                            nanos=interval_ms % 1000 * 1_000_000))
    if per_fill is not None:
        tb.tokens_per_fill.CopyFrom(wrappers_pb2.UInt32Value(value=per_fill))
    return listener_components_pb2.Filter(
        name="envoy.filters.network.local_ratelimit",
        typed_config=pack(local_rate_limit_pb2.LocalRateLimit(stat_prefix="x",
                                                              token_bucket=tb)))


def limited_resources(*filters, bandwidth=None) -> tr.Resources:
    lst = tcp_listener("l", "10.96.0.1", 80, "c")
    for f in reversed(filters):
        lst.filter_chains[0].filters.insert(0, f)
    if bandwidth is not None:
        lst.metadata.filter_metadata[META_KEY].CopyFrom(
            struct_pb2.Struct(fields={"bandwidth": bandwidth}))
    return tr.Resources({"l": lst}, {}, {"c": eds_cluster("c")},
                        {"c": cla("c", locality(lbe("10.0.0.1", 8080)))})


def test_envoy_local_ratelimit_is_the_connection_limit() -> None:
    t = tr.to_table(limited_resources(bucket(20, 10, 100)))
    assert t.table.services[0].limits == Limits(connections=100.0, burst=20)
    assert t.ignored.get("c", ()) == ()  # applied, not reported as ignored
    # tokens_per_fill defaults to 1; the strictest of two filters wins.
    t = tr.to_table(limited_resources(bucket(5, None, 1000), bucket(50, 50, 100)))
    assert t.table.services[0].limits == Limits(connections=1.0, burst=5)
    err = pytest.raises(ValidationError, tr.to_table, limited_resources(bucket(0, 1, 100)))
    assert "token_bucket.max_tokens: must be at least 1" in str(err.value)


def test_bandwidth_rides_in_the_meshaccel_metadata() -> None:
    t = tr.to_table(limited_resources(bandwidth=struct_pb2.Value(string_value="50Mbit")))
    assert t.table.services[0].limits == Limits(bandwidth=50_000_000)
    t = tr.to_table(limited_resources(bandwidth=struct_pb2.Value(number_value=2e6)))
    assert t.table.services[0].limits == Limits(bandwidth=2_000_000)
    err = pytest.raises(ValidationError, tr.to_table,
                        limited_resources(bandwidth=struct_pb2.Value(string_value="1MB/s")))
    assert "metadata.filter_metadata.meshaccel.bandwidth" in str(err.value)


@pytest.mark.parametrize("limits", [
    Limits(bandwidth=200_000_000, connections=100.0, burst=20),
    Limits(connections=1000.0, burst=3),  # > 20/s: several tokens per 50 ms fill
    Limits(connections=0.5, burst=1),
    Limits(bandwidth=50_000_000),
])
def test_controller_serves_limits_and_agent_reads_them_back(limits: Limits) -> None:
    table = ServiceTable((Service("bulk", "10.96.0.10", 80,
                                  endpoints=(Endpoint("10.200.0.11", 80),), limits=limits),))
    back = tr.to_table(tr.to_resources(table)).table
    assert back.services[0].limits == limits


def inspect(name: str, ip: str, **labels: str) -> dict:
    """The fields of `docker inspect` the source reads."""
    return {"Id": name * 4, "Name": f"/{name}",
            "Config": {"Labels": {"meshaccel.service": "bulk", "meshaccel.port": "80",
                                  **{f"meshaccel.{k}": v for k, v in labels.items()}}},
            "State": {"Running": True},
            "NetworkSettings": {"Networks": {"mesh": {"IPAddress": ip, "IPPrefixLen": 24}}}}


def test_docker_labels_give_the_limits() -> None:
    from accel.sources.docker import member_from_inspect, table_from_members

    members = [member_from_inspect(inspect(n, ip, bandwidth="50Mbit", connections="100/s",
                                           burst="20"))
               for n, ip in (("a", "172.18.0.2"), ("b", "172.18.0.3"))]
    t = table_from_members(members)
    assert t.services[0].limits == Limits(bandwidth=50_000_000, connections=100.0, burst=20)
    for labels, error in (({"bandwidth": "50MB"}, "meshaccel.bandwidth: expected a rate"),
                          ({"connections": "fast"}, "meshaccel.connections: expected"),
                          ({"burst": "5"}, "meshaccel.burst: a burst needs a connection"),
                          ({"connections": "5/s", "burst": "0"}, "meshaccel.burst: 0 is out")):
        with pytest.raises(ValidationError) as e:
            member_from_inspect(inspect("c", "172.18.0.4", **labels))
        assert str(e.value).startswith(error), str(e.value)
