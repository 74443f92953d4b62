"""The edge's devmap (edge_tx): one slot per interface backends are redirected to, held
while any backend uses it -- also across an agent restart that adopts the pinned maps."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import socket
import subprocess

import pytest

from accel.datapath.edge import EdgeDatapath, NextHop
from accel.model import Endpoint, Service, ServiceTable

pytestmark = pytest.mark.kernel

SMAC = bytes.fromhex("02000000ee01")


@pytest.fixture
def veth():
    """A second interface to redirect to (lo is the first); the devmap takes real ifindexes."""
    name = f"hr{secrets.token_hex(3)}"
    subprocess.run(["ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b"],
                   check=True)
    try:
        yield socket.if_nametoindex(f"{name}a")
    finally:
        subprocess.run(["ip", "link", "del", f"{name}a"], check=False)


def edge(ifindex_of: dict[str, int], pin: str) -> EdgeDatapath:
    def resolve(addrs):
        return {a: NextHop(ifindex_of[str(a)], b"\x02\xbe" + a.packed[-4:], SMAC) for a in addrs}

    return EdgeDatapath(None, pin, 16411, max_vips=8, resolver=resolve)


def table(*services: tuple[str, str, tuple[str, ...]]) -> ServiceTable:
    return ServiceTable.of([
        Service(name, ipaddress.ip_address(vip), 80, "TCP",
                tuple(Endpoint(ipaddress.ip_address(a), 80) for a in addrs), edge=True)
        for name, vip, addrs in services])


def devmap(dp: EdgeDatapath) -> set[int]:
    return {v.value for _, v in dp.table("edge_tx").items() if v.value}


def test_an_interface_first_used_after_adoption_keeps_its_slot_while_in_use(veth):
    pin = f"/sys/fs/bpf/hr-{secrets.token_hex(4)}"
    ifindex_of = {"10.1.0.1": 1, "10.2.0.1": veth, "10.2.0.2": veth}
    web = ("web", "10.96.0.1", ("10.1.0.1",))
    first = edge(ifindex_of, pin)
    try:
        first.apply(table(web))
        assert devmap(first) == {1}
    finally:
        first.close(unpin=False)
    second = edge(ifindex_of, pin)
    try:
        second.load()  # adopts lo's slot, held for the previous agent's backends
        # The first apply after adoption brings a new interface with two backends.
        second.apply(table(web, ("api", "10.96.0.2", ("10.2.0.1", "10.2.0.2"))))
        assert devmap(second) == {1, veth}
        # One of them goes: the other still redirects through the slot.
        second.apply(table(web, ("api", "10.96.0.2", ("10.2.0.2",))))
        assert devmap(second) == {1, veth}
        second.apply(table(web))
        assert devmap(second) == {1}
    finally:
        second.close()
        shutil.rmtree(pin, ignore_errors=True)
