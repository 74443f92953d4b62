"""Incremental tables and map writers: a table derived from the last one (ServiceTable.derive)
must validate, diff and land in the kernel exactly as the same table built from scratch."""

from __future__ import annotations

import ipaddress
import random

import pytest

from accel.model import Endpoint, Service, ServiceTable, ValidationError, mapped

VIP0 = int(ipaddress.IPv4Address("10.96.0.0"))
EP0 = int(ipaddress.IPv4Address("10.128.0.0"))


def service(i: int, rng: random.Random, port: int = 80) -> Service:
    # Endpoints drawn from a small pool so services share addresses (refcounts matter).
    eps = {ipaddress.IPv4Address(EP0 + rng.randrange(40)) for _ in range(rng.randrange(0, 5))}
    return Service(f"s{i}", ipaddress.IPv4Address(VIP0 + rng.randrange(60)), port,
                   endpoints=tuple(Endpoint(a, 8080, rng.randrange(1, 4), rng.random() > 0.2)
                                   for a in sorted(eps)))


def mutate(table: ServiceTable, rng: random.Random, step: int) -> ServiceTable:
    """One random change of the kinds xDS brings; a clash must fail like the constructor."""
    names = [s.name for s in table.services]
    upsert, remove = [], []
    for _ in range(rng.randrange(1, 4)):
        op = rng.random()
        if op < 0.3 and names:
            old = table.get(rng.choice(names))  # endpoints only: replaced in place
            upsert.append(Service(old.name, old.vip, old.port,
                                  endpoints=service(0, rng).endpoints))
        elif op < 0.5 and names:
            upsert.append(service(int(rng.choice(names)[1:]), rng))  # changed endpoints/VIP
        elif op < 0.8:
            upsert.append(service(1000 + step * 10 + len(upsert), rng))
        elif names:
            remove.append(rng.choice(names))
    upsert = list({s.name: s for s in upsert if s.name not in remove}.values())
    new_cidrs = None if rng.random() < 0.8 else \
        (ipaddress.ip_network(f"10.{rng.randrange(200, 203)}.0.0/16"),)
    cidrs = table.mesh_cidrs if new_cidrs is None else new_cidrs
    by_name = {u.name: u for u in upsert}
    # derive keeps each replaced service in its place and appends new ones.
    order = [by_name.pop(s.name, s) for s in table.services if s.name not in remove]
    order += by_name.values()
    try:
        expected = ServiceTable(tuple(order), mesh_cidrs=cidrs)
    except ValidationError as e:
        with pytest.raises(ValidationError) as got:
            table.derive(upsert, remove, mesh_cidrs=new_cidrs)
        assert "already used" in str(got.value) and "already used" in str(e)
        return table
    new = table.derive(upsert, remove, mesh_cidrs=new_cidrs)
    assert new == expected and new.canonical() == expected.canonical()
    assert new.equivalent(expected) and expected.equivalent(new)
    assert new.equivalent(table) == (new.canonical() == table.canonical())
    d = new.delta(table)
    back = table.delta(new)
    assert (back.added, back.removed) == (d.removed, d.added)
    assert {s.name for s in d.added} == {s.name for s in upsert}
    assert {id(s) for s in d.removed} == {id(s) for s in table.services
                                          if s.name in remove or s.name in
                                          {u.name for u in upsert}}
    assert expected.delta(table).added == tuple(s for s in expected.services
                                                if table.get(s.name) is not s)
    return new


def test_derive_matches_a_table_built_anew() -> None:
    rng = random.Random(7)
    table = ServiceTable(tuple(service(i, rng, port=1000 + i) for i in range(20)))
    for step in range(400):
        table = mutate(table, rng, step)
    with pytest.raises(ValidationError, match="duplicate service name"):
        table.derive([Service("x", "10.0.0.1", 1), Service("x", "10.0.0.2", 1)])


def expected_maps(table: ServiceTable) -> dict:
    """What the kernel must hold for `table`, from the definitions (not the writers' code)."""
    from accel.datapath.services import weighted_slots  # loads bcc: kernel tests only

    nets = {(str(mapped(ep.address)), 128) for s in table.services for ep in s.endpoints}
    for n in table.mesh_cidrs:
        nets.add((str(mapped(n.network_address)), 96 + n.prefixlen))
    return {
        "mesh_nets": sorted(nets),
        "services": {f"{s.vip}:{s.port}/{s.protocol}": sorted(
            (str(a), p) for a, p in weighted_slots(s.endpoints))
            for s in sorted(table.services, key=lambda s: str(s.key))},
    }


def test_derived_tables_land_in_the_kernel_like_full_ones(datapath) -> None:
    from accel.datapath.services import weighted_slots
    from accel.runtime import Runtime

    agent = Runtime(datapath=datapath)
    events = agent.watch()
    rng = random.Random(11)
    table = ServiceTable(tuple(service(i, rng, port=1000 + i) for i in range(30)))
    agent.apply(table)
    assert events.get_nowait().kind == "applied"
    assert datapath.dump() == expected_maps(table)
    for step in range(60):
        new = mutate(table, rng, step)
        need = datapath.usage_after(new)
        assert need["slots"] == sum(len(weighted_slots(s.endpoints)) for s in new.services)
        assert need["mesh_nets"] == len({mapped(a) for a in new.endpoint_addresses()}) + \
            len(new.mesh_cidrs)
        agent.apply(new)
        count = sum(len(s.endpoints) for s in new.services)
        assert events.get_nowait().message.endswith(f" {count} endpoints")
        got = datapath.dump()
        want = expected_maps(new)
        assert got["mesh_nets"] == want["mesh_nets"], step
        assert {k: sorted(v) for k, v in got["services"].items()} == want["services"], step
        table = new
    # A table not derived from the applied one (a full rebuild) reconciles just the same.
    rebuilt = ServiceTable(tuple(reversed(table.canonical().services)), table.mesh_cidrs)
    datapath.apply(rebuilt)
    assert datapath.dump()["mesh_nets"] == expected_maps(rebuilt)["mesh_nets"]
    assert datapath.usage()["slots"]["used"] == sum(len(weighted_slots(s.endpoints))
                                                    for s in rebuilt.services)


# ---- xDS: an EDS update rebuilds only its services; the server pushes only what changed ----


def xds_resources(table: ServiceTable) -> dict:
    from accel.xds import translate

    res = translate.to_resources(table)
    return {t: res.of(t) for t in translate.PUSH_ORDER}


def response(t: str, version: str, items) -> object:
    from envoy.service.discovery.v3 import discovery_pb2

    from accel.xds.translate import pack_all

    return discovery_pb2.DiscoveryResponse(type_url=t, version_info=version, nonce=f"{t}-{version}",
                                           resources=list(pack_all(items).values()))


def test_client_applies_one_changed_assignment_as_a_derived_table(monkeypatch) -> None:
    """Drive the client's stream.handle with responses (the stream is tested elsewhere): each single
    ClusterLoadAssignment update yields the table a full translation gives, derived from the
    last one (same Service objects but the changed one), and a bad one is NACKed."""
    import queue

    from accel.xds import translate
    from accel.xds.client import XdsClient
    from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER

    rng = random.Random(3)
    table = ServiceTable(tuple(service(i, rng, port=1000 + i) for i in range(30)))
    res = xds_resources(table)
    # A listener whose cluster's endpoints have not come yet: pending, not in the table.
    late = Service("late", "10.97.0.1", 80, endpoints=(Endpoint("10.129.0.1", 8080),))
    late_res = xds_resources(ServiceTable((late,)))
    applied: list[ServiceTable] = []
    client = XdsClient("127.0.0.1:1", "hx", applied.append)
    out: queue.Queue = queue.Queue()
    client.stream.handle(response(CLUSTER, "1", {**res[CLUSTER], **late_res[CLUSTER]}), out)
    client.stream.handle(response(ENDPOINT, "1", res[ENDPOINT]), out)
    client.stream.handle(response(LISTENER, "1", {**res[LISTENER], **late_res[LISTENER]}), out)
    assert applied[-1].canonical() == table.canonical()
    assert client.state()["pending"] == {"late.vip": "ClusterLoadAssignment 'late'"}

    full = []  # full translations from here on: none until the awaited assignment comes
    to_table = translate.to_table
    monkeypatch.setattr(translate, "to_table", lambda *a, **kw: full.append(1) or
                        to_table(*a, **kw))
    for v in range(2, 40):
        prev = applied[-1]
        name = rng.choice([s.name for s in prev.services])
        svc = prev.get(name)
        new = Service(name, svc.vip, svc.port, endpoints=service(0, rng).endpoints)
        cla = translate.load_assignment(new)
        client.stream.handle(response(ENDPOINT, str(v), {name: cla}), out)
        want = prev.derive([new])
        if want.equivalent(prev):
            assert applied[-1] is prev  # nothing to apply
            continue
        got = applied[-1]
        assert got.canonical() == want.canonical()
        assert got.delta(prev).added == (got.get(name),) and len(got.delta(prev).removed) == 1
        assert sum(a is b for a, b in zip(prev.services, got.services, strict=True)) == 29

    def nack(cla) -> str:
        n = len(applied)
        client.stream.handle(response(ENDPOINT, "bad", {cla.cluster_name: cla}), out)
        while True:
            req = out.get_nowait()
            if req.type_url == ENDPOINT and req.response_nonce == f"{ENDPOINT}-bad":
                break
        assert len(applied) == n and req.version_info != "bad"
        return req.error_detail.message

    s0 = applied[-1].services[0]
    bad = translate.load_assignment(Service(s0.name, s0.vip, s0.port,
                                            endpoints=(Endpoint("10.128.0.1", 8080),)))
    bad.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value = 0
    assert "ClusterLoadAssignment[s" in nack(bad) and "port" in nack(bad)
    s1 = applied[-1].services[1]
    loop = translate.load_assignment(Service(s0.name, s0.vip, s0.port,
                                             endpoints=(Endpoint(s1.vip, s1.port),)))
    assert f"is the VIP:port of service {s1.name!r}" in nack(loop)
    assert not full

    # The awaited assignment arrives: the service appears (the full translation's job).
    client.stream.handle(response(ENDPOINT, "50", late_res[ENDPOINT]), out)
    assert applied[-1].get("late") == late and client.state()["pending"] == {}
    assert full


def test_server_pushes_only_the_changed_assignment() -> None:
    from accel.sources.memory import MemorySource
    from accel.xds.server import ControllerServer
    from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER
    from tests.test_xds_controller import RawStream

    rng = random.Random(5)
    table = ServiceTable(tuple(service(i, rng, port=1000 + i) for i in range(10)))
    source = MemorySource(table)
    srv = ControllerServer(source, "127.0.0.1:18590").start()
    raw = RawStream(srv.port)
    try:
        names = [s.name for s in table.services]
        for t, n in ((CLUSTER, ()), (ENDPOINT, names), (LISTENER, ())):
            raw.ask(t, n)
            r = raw.next()
            assert len(r.resources) == (len(names) if t != LISTENER else 2 * len(names))
            raw.ask(t, n, nonce=r.nonce, version=r.version_info)
        s = table.services[4]
        changed = Service(s.name, s.vip, s.port, endpoints=(Endpoint("10.130.0.9", 1),))
        source.push(table.derive([changed]))
        r = raw.next()
        assert r.type_url == ENDPOINT and r.version_info == "2"
        assert [a.type_url for a in r.resources] == [ENDPOINT]
        from envoy.config.endpoint.v3 import endpoint_pb2

        cla = endpoint_pb2.ClusterLoadAssignment.FromString(r.resources[0].value)
        assert cla.cluster_name == s.name
    finally:
        raw.close()
        srv.stop()


def test_client_takes_a_listener_set_past_grpc_default_message_size() -> None:
    """LDS for 10,000 services is ~5.5 MB, more than gRPC's 4 MB default: the client must
    take it in one response, not reconnect forever."""
    import threading

    from accel.bench.xds import make_table
    from accel.sources.memory import MemorySource
    from accel.xds.client import XdsClient
    from accel.xds.server import ControllerServer

    table = make_table(10_000, 10)
    srv = ControllerServer(MemorySource(table), "127.0.0.1:18591").start()
    got: list[ServiceTable] = []
    done = threading.Event()
    client = XdsClient(f"127.0.0.1:{srv.port}", "hx-big",
                       lambda t: (got.append(t), done.set()), backoff_initial=0.1)
    client.start()
    try:
        assert done.wait(60), client.state()
        assert got[-1].equivalent(table) and client.state()["reconnects"] == 0
    finally:
        client.stop()
        srv.stop(0)
