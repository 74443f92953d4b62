"""Batched map writes (accel/datapath/batch.py) against the one-entry-per-call path, on this
kernel's maps: the same tables must leave the same entries, a map that fills part-way must be
reported and left as one entry at a time would leave it, and no reader may ever find a
service pointing at a run that is not whole."""

from __future__ import annotations

import ctypes
import ipaddress
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from accel.datapath.batch import BatchMap, Layout, addr16
from accel.datapath.datapath import Capacities, Datapath
from accel.datapath.maps import mesh_prefixes
from accel.datapath.services import PROTO, weighted_slots
from accel.model import Endpoint, Service, ServiceTable

pytestmark = pytest.mark.kernel


def svc(i: int, n: int, *, base: int = 0, v6: bool = False, proto: str = "TCP",
        weights: bool = True, unhealthy: bool = True) -> Service:
    def addr(j: int):
        if v6:
            return ipaddress.IPv6Address(f"fd00:{base:x}::{i:x}:{j + 1:x}")
        return ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.201.0.0")) + base * 4096
                                     + i * 64 + j + 1)

    eps = tuple(Endpoint(addr(j), 8000 + j, 1 + j % 3 if weights else 1,
                         healthy=not (unhealthy and j == 5))
                for j in range(n))
    vip = (ipaddress.IPv6Address(f"fd01::{i + 1:x}") if v6
           else ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.97.0.1")) + i))
    return Service(f"s{i}", vip, 80 if proto == "TCP" else 53, proto, eps)


def expected(table: ServiceTable) -> dict:
    return {
        "mesh_nets": sorted((str(a), p) for a, p in mesh_prefixes(table)),
        "services": {f"{s.vip}:{s.port}/{s.protocol}": sorted(
            (str(a), p) for a, p in weighted_slots(s.endpoints))
            for s in sorted(table.services, key=lambda s: str(s.key))},
    }


def slot_entries(dp: Datapath) -> int:
    """accel_slots entries in the kernel: a run left behind would show here, not in dump()."""
    return len(dp.map("accel_slots"))


@pytest.fixture
def pair(pin_dir, test_cgroup) -> Iterator:
    """make(caps) -> (batched, one-by-one) datapaths on maps of their own."""
    made: list[Datapath] = []

    def make(caps: Capacities | None = None) -> tuple[Datapath, Datapath]:
        caps = caps or Capacities()
        n = len(made)
        for batch in (True, False):
            made.append(Datapath(pin_dir=f"{pin_dir}-{n}{'b' if batch else 'e'}",
                                 cgroup_path=str(test_cgroup), capacities=caps,
                                 batch_writes=batch).start())
        return made[-2], made[-1]

    yield make
    for dp in made:
        dp.close()
        shutil.rmtree(dp.pin_dir, ignore_errors=True)


def test_layout_packs_as_the_c_struct(datapath) -> None:
    slots, services = datapath.map("accel_slots"), datapath.map("accel_services")
    v = slots.Leaf()
    ctypes.memmove(ctypes.addressof(v.addr), addr16(ipaddress.IPv4Address("10.1.2.3")), 16)
    v.port = 8080
    assert Layout(slots.Leaf, "addr", "port").pack(
        addr16(ipaddress.IPv4Address("10.1.2.3")), 8080) == bytes(v)
    k = services.Key()
    ctypes.memmove(ctypes.addressof(k.vip), addr16(ipaddress.IPv6Address("fd00::1")), 16)
    k.port, k.proto = 443, PROTO["UDP"]
    assert Layout(services.Key, "vip", "port", "proto").pack(
        addr16(ipaddress.IPv6Address("fd00::1")), 443, PROTO["UDP"]) == bytes(k)
    with pytest.raises(ValueError):
        Layout(services.Key, "port", "vip")  # not in offset order


def test_kernel_support_is_probed_per_map_and_op(datapath) -> None:
    assert BatchMap(datapath.map("accel_slots")).batched  # hash maps: since 5.6
    stats = BatchMap(datapath.map("accel_svc_stats"))
    # Arrays have no delete batch: the probe says so and deletes go one by one.
    assert stats._update_batch and not stats._delete_batch
    assert not BatchMap(datapath.map("accel_slots"), batch=False).batched


def test_both_paths_leave_the_same_maps(pair) -> None:
    batched, single = pair()
    tables = [
        ServiceTable(tuple(svc(i, 10) for i in range(40))
                     + tuple(replace(svc(40 + i, 4, v6=True), name=f"v6-{i}") for i in range(5))
                     + (replace(svc(50, 3, proto="UDP"), name="dns"),),
                     (ipaddress.ip_network("10.250.0.0/16"),)),
    ]
    t = tables[0]
    # Changed, removed, added, and the endpoints of one moved to another service.
    changed = [replace(t.services[i], endpoints=svc(i, 7, base=1).endpoints) for i in range(10)]
    moved = replace(t.services[20], endpoints=t.services[21].endpoints)
    tables.append(ServiceTable(tuple(changed) + t.services[12:20] + (moved,) + t.services[21:]
                               + tuple(replace(svc(60 + i, 2), name=f"new{i}") for i in range(5)),
                               (ipaddress.ip_network("fd10::/64"),)))
    tables.append(ServiceTable(tables[-1].services[::2]))  # a table rebuilt, half the services
    tables.append(ServiceTable())
    for n, table in enumerate(tables):
        reports = [dp.apply(table) for dp in (batched, single)]
        assert [{k: vars(r) for k, r in rep.items()} for rep in reports][0] == \
            [{k: vars(r) for k, r in rep.items()} for rep in reports][1], n
        assert batched.dump() == single.dump() == expected(table), n
        assert slot_entries(batched) == slot_entries(single) == \
            sum(len(weighted_slots(s.endpoints)) for s in table.services), n
        assert batched.usage() == single.usage(), n


def test_a_map_full_part_way_ends_as_one_by_one_and_is_reported(pair) -> None:
    batched, single = pair(Capacities(services=8, slots=64, mesh_nets=40))
    # 7 runs of 10 slots and one of 2: the 7th cannot fit, the 8th still does.
    big = ServiceTable(tuple(svc(i, 10, weights=False, unhealthy=False) for i in range(7))
                       + (svc(7, 2, weights=False),))
    reports = [dp.apply(big) for dp in (batched, single)]  # past Agent's capacity check
    for rep in reports:
        assert rep["services"].failed == 1 and "s6" in rep["services"].errors[0]
        assert "accel_slots is full" in rep["services"].errors[0]
        assert rep["mesh_nets"].failed == 72 - 40
    assert vars(reports[0]["services"]) == vars(reports[1]["services"])
    assert reports[0]["mesh_nets"].failed == reports[1]["mesh_nets"].failed
    got = batched.dump()
    assert got == single.dump()
    assert "10.97.0.7:80/TCP" not in got["services"]  # s6: not there rather than truncated
    assert len(got["services"]) == 7 and len(got["mesh_nets"]) == 40
    assert slot_entries(batched) == slot_entries(single) == 6 * 10 + 2  # no half run left
    # More services than indexes: the ninth and tenth are refused, nothing else changes.
    many = ServiceTable(tuple(svc(i, 1) for i in range(10)))
    reports = [dp.apply(many) for dp in (batched, single)]
    for rep in reports:
        assert rep["services"].failed == 2 and "accel_services is full" in \
            rep["services"].errors[0]
    assert batched.dump() == single.dump()
    assert slot_entries(batched) == slot_entries(single) == 8
    # A table that fits is applied whole by both afterwards.
    fits = ServiceTable(tuple(svc(i, 6) for i in range(5)))
    for dp in (batched, single):
        rep = dp.apply(fits)
        assert not any(r.failed for r in rep.values())
        assert dp.dump() == expected(fits)
        assert slot_entries(dp) == sum(len(weighted_slots(s.endpoints)) for s in fits.services)


def test_replacing_every_run_of_a_nearly_full_map_succeeds_like_one_by_one(pair) -> None:
    # 50 of 64 slots in use; replacing all five runs at once would need 100. One at a time
    # needs 60: the batch group stops where the map is full and the rest goes one by one.
    batched, single = pair(Capacities(services=8, slots=64, mesh_nets=256))
    before = ServiceTable(tuple(svc(i, 10, weights=False) for i in range(5)))
    after = ServiceTable(tuple(svc(i, 10, base=2, weights=False) for i in range(5)))
    for dp in (batched, single):
        assert not any(r.failed for r in dp.apply(before).values())
        rep = dp.apply(after)
        assert not any(r.failed for r in rep.values()), rep
        assert dp.dump() == expected(after)
        assert slot_entries(dp) == 45


def test_no_reader_sees_a_service_whose_run_is_not_whole(datapath) -> None:
    services, slots = datapath.map("accel_services"), datapath.map("accel_slots")
    tables = [ServiceTable(tuple(svc(i, 10, base=b % 2) for i in range(2000))) for b in range(4)]
    datapath.apply(tables[0])
    done = threading.Event()
    seen = {"checked": 0, "broken": []}

    def reader() -> None:
        while not done.is_set():
            for k, v in services.items():
                sid, n = int(v.slots_id), int(v.nslots)
                for i in range(n):
                    try:
                        slots[slots.Key(sid, i)]
                    except KeyError:
                        # Missing is fine only if the service has moved on meanwhile.
                        try:
                            still = int(services[k].slots_id) == sid
                        except KeyError:
                            still = False
                        if still:
                            seen["broken"].append((sid, i, n))
                        break
                seen["checked"] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for table in tables[1:]:
            start = time.monotonic()
            datapath.apply(table)
            assert time.monotonic() - start < 30
            assert datapath.dump() == expected(table)
    finally:
        done.set()
        t.join(30)
    assert seen["checked"] > 1000
    assert not seen["broken"], seen["broken"][:5]
