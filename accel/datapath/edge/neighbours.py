"""Neighbour resolution: how XDP reaches each backend (interface and MACs), or None to let
the kernel route it (route mode). The edge programs never look up routes themselves."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from accel.model import IPAddress

log = logging.getLogger(__package__)  # one logger for the edge, as before the split


@dataclass(frozen=True)
class NextHop:
    """How XDP reaches a backend: out of `ifindex`, from `smac` to `dmac`."""

    ifindex: int
    dmac: bytes
    smac: bytes


# Maps addresses to next hops; None means "let the kernel route it" (route mode).
Resolver = Callable[[Iterable[IPAddress]], dict[IPAddress, NextHop | None]]


class NeighbourResolver:
    """The kernel's view of how to reach an address: route, interface MAC, neighbour MAC.

    A missing neighbour is solicited with one UDP datagram to the discard port
    (the kernel sends the ARP/ND request) and waited for up to `wait` seconds.
    A route out of a bridge resolves to the bridge port that learned the
    neighbour's MAC (a bridge takes no XDP redirects; its veth ports do). Only
    veths and plain devices (NICs) are redirect targets: VLAN, bond, tunnel and
    other virtual devices are left to the kernel (route mode).
    """

    USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # reachable stale delay probe noarp permanent
    REDIRECT_KINDS = (None, "veth")

    def __init__(self, wait: float = 1.0):
        self.wait = wait

    def __call__(self, addrs: Iterable[IPAddress]) -> dict[IPAddress, NextHop | None]:
        from pyroute2 import IPRoute

        out: dict[IPAddress, NextHop | None] = {}
        pending: dict[IPAddress, tuple[int, str, bytes]] = {}
        with IPRoute() as ipr:
            for addr in addrs:
                hop = self._route(ipr, addr)
                if hop is None:
                    out[addr] = None
                    continue
                dmac = self._neigh(ipr, hop[0], hop[1])
                if dmac:
                    out[addr] = self._next_hop(ipr, hop, dmac)
                else:
                    pending[addr] = hop
                    self._solicit(hop[1])
            deadline = time.monotonic() + self.wait
            while pending and time.monotonic() < deadline:
                time.sleep(0.02)
                for addr, hop in list(pending.items()):
                    dmac = self._neigh(ipr, hop[0], hop[1])
                    if dmac:
                        out[addr] = self._next_hop(ipr, hop, dmac)
                        del pending[addr]
        for addr in pending:
            log.info("edge: no neighbour for %s yet: balanced in route mode", addr)
            out[addr] = None
        return out

    @staticmethod
    def _kind(ipr, index: int) -> tuple[str | None, str | None]:
        links = ipr.link("get", index=index)
        if not links:
            return None, None
        info = links[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        return kind, links[0].get_attr("IFLA_ADDRESS")

    def _next_hop(self, ipr, hop: tuple[int, str, bytes], dmac: bytes) -> NextHop | None:
        oif, _, smac = hop
        kind, _ = self._kind(ipr, oif)
        if kind == "bridge":
            port = self._bridge_port(ipr, oif, dmac)
            if port is None:
                return None  # not learned (yet): the bridge floods, the kernel copes
            oif = port
            kind, _ = self._kind(ipr, oif)
        if kind not in self.REDIRECT_KINDS:
            return None
        return NextHop(oif, dmac, smac)

    @staticmethod
    def _bridge_port(ipr, bridge: int, mac: bytes) -> int | None:
        want = ":".join(f"{b:02x}" for b in mac)
        for n in ipr.fdb("dump"):
            if n.get_attr("NDA_MASTER") == bridge and n.get_attr("NDA_LLADDR") == want:
                return n["ifindex"]
        return None

    @staticmethod
    def _route(ipr, addr: IPAddress) -> tuple[int, str, bytes] | None:
        try:
            routes = ipr.route("get", dst=str(addr))
        except Exception as e:  # noqa: BLE001 - unreachable: route mode, the kernel decides
            log.info("edge: no route to %s (%s): route mode", addr, e)
            return None
        if not routes:
            return None
        r = routes[0]
        if r["type"] != 1:  # RTN_UNICAST; local, blackhole...: the kernel handles it
            return None
        oif = r.get_attr("RTA_OIF")
        gw = r.get_attr("RTA_GATEWAY")
        links = ipr.link("get", index=oif) if oif else []
        smac = links[0].get_attr("IFLA_ADDRESS") if links else None
        if not oif or not smac or smac == "00:00:00:00:00:00":
            return None  # loopback, tunnels: nothing to rewrite MACs for
        return oif, gw or str(addr), bytes.fromhex(smac.replace(":", ""))

    def _neigh(self, ipr, oif: int, nh: str) -> bytes | None:
        fam = socket.AF_INET6 if ":" in nh else socket.AF_INET
        for n in ipr.neigh("dump", ifindex=oif, family=fam):
            if n.get_attr("NDA_DST") == nh and n["state"] & self.USABLE:
                mac = n.get_attr("NDA_LLADDR")
                if mac:
                    return bytes.fromhex(mac.replace(":", ""))
        return None

    @staticmethod
    def _solicit(nh: str) -> None:
        fam = socket.AF_INET6 if ":" in nh else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(b"", (nh, 9))
        except OSError:
            pass
