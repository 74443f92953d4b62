"""Neighbour resolution: how XDP reaches each backend (interface and MACs), or None to let
the kernel route it (route mode). The edge programs never look up routes themselves."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from accel.kernel import netdev
from accel.kernel.netns import NsidPaths
from accel.model import IPAddress

log = logging.getLogger(__package__)  # one logger for the edge, as before the split


@dataclass(frozen=True)
class NextHop:
    """How the edge reaches a backend: out of `ifindex`, from `smac` to `dmac`; `why` that
    way works. `peer`: `ifindex` is the host end of a pod's veth (its other end in another
    namespace); tc ingress moves the packet into the pod (bpf_redirect_peer), not XDP."""

    ifindex: int
    dmac: bytes
    smac: bytes
    why: str = ""
    mtu: int = 0  # of the interface; 0 unknown (XDP routes bigger packets to the kernel)
    peer: bool = False


@dataclass(frozen=True)
class Routed:
    """The kernel routes the backend's packets (XDP rewrites the address and passes them):
    `reason` says why. `fallback`: a redirect target exists but would drop the frames
    (a veth whose peer runs no NAPI, a NIC without ndo_xdp_xmit), counted apart."""

    reason: str
    fallback: bool = False


# Maps addresses to next hops; Routed (or None: no reason given) is route mode.
Resolver = Callable[[Iterable[IPAddress]], dict[IPAddress, NextHop | Routed | None]]


class NeighbourResolver:
    """The kernel's view of how to reach an address: route, interface MAC, neighbour MAC.

    A missing neighbour is solicited with one UDP datagram to the discard port
    (the kernel sends the ARP/ND request) and waited for up to `wait` seconds.
    A route out of a bridge resolves to the bridge port that learned the
    neighbour's MAC (a bridge takes no XDP redirects; its veth ports do). Only
    veths and plain devices (NICs) are redirect targets: VLAN, bond, tunnel and
    other virtual devices are left to the kernel (route mode).

    A target must take frames from a native XDP program: the kernel says so in its
    xdp-features (accel/kernel/netdev.py); a veth does only while its peer runs a native
    XDP program or GRO, which container runtimes leave off. A veth whose peer lives in
    another namespace (a pod) is not an XDP target at all: it is entered from tc ingress
    with bpf_redirect_peer (`NextHop(peer=True)`), whatever its peer's state;
    `peer_path=False` judges it as any other target. A target that would drop the frames
    is routed (`Routed(fallback=True)`), never redirected into a drop, and the pod's
    interface is never changed.

    `hook` is where the balancer runs (EdgeDatapath.attach sets it): "native" XDP as above;
    "generic" XDP, whose redirect is an skb sent out of the target, which every device
    takes; "tc" (edge_tc_balance on skbs): a pod's veth is entered with bpf_redirect_peer
    and any other target with bpf_redirect, both of which every device takes.
    """

    USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # reachable stale delay probe noarp permanent
    REDIRECT_KINDS = (None, "veth")

    def __init__(self, wait: float = 1.0, hook: str = "native", peer_path: bool = True):
        self.wait = wait
        self.hook = hook
        self.peer_path = peer_path
        self._nsids: NsidPaths | None = None
        self._judged: dict[int, str | Routed] = {}

    def __call__(self, addrs: Iterable[IPAddress]) -> dict[IPAddress, NextHop | Routed | None]:
        from pyroute2 import IPRoute

        out: dict[IPAddress, NextHop | Routed | None] = {}
        pending: dict[IPAddress, tuple[int, str, bytes]] = {}
        with IPRoute() as ipr:
            self._nsids = NsidPaths(ipr)
            self._judged = {}  # per interface, for this call
            for addr in addrs:
                hop = self._route(ipr, addr)
                if isinstance(hop, Routed):
                    out[addr] = hop
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
            self._nsids = None
        for addr in pending:
            log.info("edge: no neighbour for %s yet: balanced in route mode", addr)
            out[addr] = Routed(f"no neighbour entry for {pending[addr][1]} yet")
        return out

    @staticmethod
    def _link(ipr, index: int):
        links = ipr.link("get", index=index)
        return links[0] if links else None

    @staticmethod
    def _kind(link) -> str | None:
        info = link.get_attr("IFLA_LINKINFO") if link is not None else None
        return info.get_attr("IFLA_INFO_KIND") if info else None

    @staticmethod
    def _name(link) -> str:
        return link.get_attr("IFLA_IFNAME") if link is not None else "?"

    def _next_hop(self, ipr, hop: tuple[int, str, bytes], dmac: bytes) -> NextHop | Routed:
        oif, _, smac = hop
        link = self._link(ipr, oif)
        kind = self._kind(link)
        if kind == "bridge":
            port = self._bridge_port(ipr, oif, dmac)
            if port is None:  # not learned (yet): the bridge floods, the kernel copes
                return Routed(f"bridge {self._name(link)}: port of {dmac.hex(':')} not learned")
            oif = port
            link = self._link(ipr, oif)
            kind = self._kind(link)
        name = self._name(link)
        if kind not in self.REDIRECT_KINDS:
            return Routed(f"{name} is a {kind} device: XDP redirects only to NICs and veths")
        mtu = link.get_attr("IFLA_MTU") or 0
        pod = kind == "veth" and link.get_attr("IFLA_LINK_NETNSID") is not None
        if self.hook == "tc":
            if pod and self.peer_path:
                return NextHop(oif, dmac, smac, f"{name}: tc hook, into the peer's namespace "
                               "(bpf_redirect_peer)", mtu, peer=True)
            return NextHop(oif, dmac, smac, f"{name}: tc hook (bpf_redirect)", mtu)
        if pod and self.hook == "native" and self.peer_path:
            # Into a pod from tc ingress even where XDP could redirect (its GRO on): the
            # skb GRO built on the edge interface goes in whole, and a pod turning GRO off
            # later cannot make a redirect drop frames before the next refresh.
            return NextHop(oif, dmac, smac, f"{name}: a pod's veth, entered from tc ingress "
                           "(bpf_redirect_peer)", mtu, peer=True)
        why = self._judged.get(oif)
        if why is None:  # backends behind one interface (a NIC, a pod's ports) share it
            why = self._judged[oif] = self._takes_frames(link, kind)
        if isinstance(why, Routed):
            return why
        return NextHop(oif, dmac, smac, why, mtu)

    def _takes_frames(self, link, kind: str | None) -> str | Routed:
        """Why `link` takes a native XDP program's redirected frames, or Routed: it would
        drop them. The kernel's xdp-features decide; the veth peer's state explains."""
        name = self._name(link)
        peer = None
        if kind == "veth" and self._nsids is not None:
            try:
                peer = netdev.veth_peer(link, self._nsids)
            except OSError as e:
                log.info("edge: %s: peer not readable (%s)", name, e)
        detail = f" ({peer.describe()})" if peer else ""
        if self.hook == "generic":
            return f"{name}: generic XDP sends an skb, every device takes it{detail}"
        feats = netdev.xdp_features(link["index"])
        if feats is None:  # a kernel before 6.3: judge a veth by its peer
            if kind != "veth":
                return f"{name}: a NIC (xdp-features unknown on this kernel)"
            if peer is not None and peer.up and (peer.native_xdp or peer.gro):
                return f"{name}{detail}"
            return Routed(f"{name}: veth peer takes no XDP frames{detail or ' (peer unknown)'}",
                          fallback=True)
        if feats & netdev.NETDEV_XDP_ACT_NDO_XMIT:
            return f"{name}: takes XDP frames (ndo_xdp_xmit){detail}"
        if kind == "veth":
            return Routed(f"{name}: veth peer has neither a native XDP program nor GRO, "
                          f"redirected frames would be dropped{detail}", fallback=True)
        return Routed(f"{name}: the driver has no ndo_xdp_xmit", fallback=True)

    @staticmethod
    def _bridge_port(ipr, bridge: int, mac: bytes) -> int | None:
        want = ":".join(f"{b:02x}" for b in mac)
        for n in ipr.fdb("dump"):
            if n.get_attr("NDA_MASTER") == bridge and n.get_attr("NDA_LLADDR") == want:
                return n["ifindex"]
        return None

    @staticmethod
    def _route(ipr, addr: IPAddress) -> tuple[int, str, bytes] | Routed:
        try:
            routes = ipr.route("get", dst=str(addr))
        except Exception as e:  # noqa: BLE001 - unreachable: route mode, the kernel decides
            log.info("edge: no route to %s (%s): route mode", addr, e)
            return Routed(f"no route ({e})")
        if not routes:
            return Routed("no route")
        r = routes[0]
        if r["type"] != 1:  # RTN_UNICAST; local, blackhole...: the kernel handles it
            return Routed(f"route type {r['type']} is not unicast")
        oif = r.get_attr("RTA_OIF")
        gw = r.get_attr("RTA_GATEWAY")
        links = ipr.link("get", index=oif) if oif else []
        smac = links[0].get_attr("IFLA_ADDRESS") if links else None
        if not oif or not smac or smac == "00:00:00:00:00:00":
            return Routed("the route's interface has no MAC")  # loopback, tunnels
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
