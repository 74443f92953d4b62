"""Benchmark (not a test): translate a big table to xDS and back, as controller and agent do.

    python -m accel.xds.bench --services 10000 --endpoints 10
"""

from __future__ import annotations

import argparse
import time

from envoy.service.discovery.v3 import discovery_pb2

from accel.bench.xds import make_table
from accel.xds import translate


def run(services: int, endpoints: int) -> dict[str, float]:
    table = make_table(services, endpoints)
    t = {}
    start = time.perf_counter()
    res = translate.to_resources(table)
    t["table->resources"] = time.perf_counter() - start

    start = time.perf_counter()
    wire = {}
    for type_url in translate.PUSH_ORDER:
        resp = discovery_pb2.DiscoveryResponse(
            type_url=type_url, version_info="1",
            resources=list(translate.pack_all(res.of(type_url)).values()))
        wire[type_url] = resp.SerializeToString()
    t["pack+serialize"] = time.perf_counter() - start

    start = time.perf_counter()
    back = {}
    for type_url, data in wire.items():
        resp = discovery_pb2.DiscoveryResponse.FromString(data)
        back[type_url] = translate.unpack(type_url, resp.resources)
    t["parse+unpack"] = time.perf_counter() - start

    start = time.perf_counter()
    out = translate.to_table(translate.Resources(
        back[translate.LISTENER], back[translate.ROUTE], back[translate.CLUSTER],
        back[translate.ENDPOINT])).table
    t["resources->table"] = time.perf_counter() - start
    assert len(out.services) == services
    t["total"] = sum(t.values())
    t["bytes"] = float(sum(len(d) for d in wire.values()))
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=10)
    a = p.parse_args()
    result = run(a.services, a.endpoints)
    print(f"{a.services} services x {a.endpoints} endpoints:")
    for k, v in result.items():
        print(f"  {k:18} {v / 1e6:8.1f} MB" if k == "bytes" else f"  {k:18} {v:8.2f} s")


if __name__ == "__main__":
    main()
