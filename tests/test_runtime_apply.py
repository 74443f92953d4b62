"""Runtime.apply is all or nothing: a failure in any part (socket maps, edge), injected after
the part has really written the new table, leaves every part's kernel maps as they were,
the previous table the runtime's, and the error naming the part and the rollback."""

from __future__ import annotations

import ipaddress

import pytest

from accel.datapath.edge import EdgeDatapath, NextHop
from accel.model import Endpoint, Service, ServiceTable
from accel.runtime import ApplyError, EdgePart, Runtime

pytestmark = pytest.mark.kernel


def svc(name: str, octet: int, *eps: int, edge: bool = False) -> Service:
    return Service(name=name, vip=ipaddress.ip_address(f"10.96.9.{octet}"), port=80,
                   endpoints=tuple(Endpoint(ipaddress.ip_address(f"10.200.9.{e}"), 8080)
                                   for e in eps), edge=edge)


OLD = ServiceTable((svc("a", 1, 1, 2), svc("e", 2, 3, edge=True)))
NEW = ServiceTable((svc("a", 1, 4), svc("b", 3, 5, 6), svc("e", 2, 7, 8, edge=True)))


class Injected(RuntimeError):
    pass


def fail_after(part, runtime: Runtime) -> None:
    """The part writes the new table for real, then fails, once."""
    real = part.apply

    def apply(table: ServiceTable) -> None:
        real(table)
        if table is NEW:
            raise Injected(f"{part.name} broke half way")

    part.apply = apply


@pytest.fixture
def runtime(side_agent):
    edge = EdgeDatapath(None, side_agent.datapath.pin_dir, max_vips=4,
                        resolver=lambda addrs: {a: NextHop(1, "02:00:00:00:00:01",
                                                           "02:00:00:00:00:02")
                                                for a in addrs})
    edge.load()
    side_agent.edge = edge
    side_agent.parts.append(EdgePart(edge))
    try:
        yield side_agent
    finally:
        edge.close()


def kernel_state(rt: Runtime) -> tuple:
    edge = rt.edge.status()
    return (rt.datapath.dump(),
            [(v["service"], sorted((b["address"], b["port"]) for b in v["backends"]))
             for v in edge["vips"]])


@pytest.mark.parametrize("failing", ["socket maps", "edge"])
def test_a_failing_part_rolls_every_part_back(runtime, failing):
    runtime.apply(OLD, version="v1")
    before = kernel_state(runtime)
    assert before[0]["services"] and before[1] == [("e", [("10.200.9.3", 8080)])]
    part = next(p for p in runtime.parts if p.name == failing)
    fail_after(part, runtime)
    with pytest.raises(ApplyError) as e:
        runtime.apply(NEW, version="v2")
    assert f"{failing}: " in str(e.value) and "rolled back to version 'v1'" in str(e.value)
    assert kernel_state(runtime) == before
    assert runtime.table is OLD and runtime.version == "v1"
    st = runtime.status()
    assert st["rejected"] == 1 and st["services"] == 2 and failing in st["last_error"]
    # The same table, once nothing fails, goes in whole.
    part.apply = type(part).apply.__get__(part)
    runtime.apply(NEW, version="v3")
    after = kernel_state(runtime)
    assert after != before and sorted(after[0]["services"]) == sorted(
        f"10.96.9.{o}:80/TCP" for o in (1, 2, 3))
    assert after[1] == [("e", [("10.200.9.7", 8080), ("10.200.9.8", 8080)])]
