"""Incremental tables and map writers: a table derived from the last one (ServiceTable.derive)
must validate, diff and land in the kernel exactly as the same table built from scratch."""

from __future__ import annotations

import ipaddress
import random

import pytest

from accel.datapath.services import weighted_slots
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
        if op < 0.5 and names:
            upsert.append(service(int(rng.choice(names)[1:]), rng))  # changed endpoints/VIP
        elif op < 0.8:
            upsert.append(service(1000 + step * 10 + len(upsert), rng))
        elif names:
            remove.append(rng.choice(names))
    upsert = list({s.name: s for s in upsert if s.name not in remove}.values())
    cidrs = table.mesh_cidrs if rng.random() < 0.8 else \
        (ipaddress.ip_network(f"10.{rng.randrange(200, 203)}.0.0/16"),)
    by_name = {u.name: u for u in upsert}
    # derive keeps each replaced service in its place and appends new ones.
    order = [by_name.pop(s.name, s) for s in table.services if s.name not in remove]
    order += by_name.values()
    try:
        expected = ServiceTable(tuple(order), mesh_cidrs=cidrs)
    except ValidationError as e:
        with pytest.raises(ValidationError) as got:
            table.derive(upsert, remove, mesh_cidrs=cidrs)
        assert "already used" in str(got.value) and "already used" in str(e)
        return table
    new = table.derive(upsert, remove, mesh_cidrs=cidrs)
    assert new == expected and new.canonical() == expected.canonical()
    assert new.equivalent(expected) and expected.equivalent(new)
    assert new.equivalent(table) == (new.canonical() == table.canonical())
    d = new.delta(table)
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
    rng = random.Random(11)
    table = ServiceTable(tuple(service(i, rng, port=1000 + i) for i in range(30)))
    datapath.apply(table)
    assert datapath.dump() == expected_maps(table)
    for step in range(60):
        new = mutate(table, rng, step)
        need = datapath.usage_after(new)
        assert need["slots"] == sum(len(weighted_slots(s.endpoints)) for s in new.services)
        assert need["mesh_nets"] == len({mapped(a) for a in new.endpoint_addresses()}) + \
            len(new.mesh_cidrs)
        report = datapath.apply(new)
        assert not any(r.errors for r in report.values())
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
