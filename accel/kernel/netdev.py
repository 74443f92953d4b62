"""What an interface accepts from XDP, read from the kernel without changing anything.

An XDP_REDIRECT from a native XDP program hands the frame to the target's ndo_xdp_xmit.
A NIC either has one or not; a veth has one only while its peer runs NAPI (a native XDP
program or GRO on the peer): otherwise the kernel drops the frame, counted nowhere we
see. Since Linux 6.3 the kernel publishes exactly this as the target's xdp-features
(netdev generic netlink family, NETDEV_XDP_ACT_NDO_XMIT; a veth updates it when its peer
changes), so the answer comes from the kernel, not from guessing. The peer's own state
(native XDP program, GRO) is read in the peer's namespace to say why.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
from dataclasses import dataclass

from accel.kernel.netns import NsidPaths, in_netns

NETDEV_XDP_ACT_NDO_XMIT = 1 << 2  # include/uapi/linux/netdev.h
NETDEV_CMD_DEV_GET = 1
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_MULTI = 4
SIOCETHTOOL = 0x8946
ETHTOOL_GGRO = 0x2B


def xdp_features(ifindex: int) -> int | None:
    """The interface's NETDEV_XDP_ACT_* bits (in the calling thread's namespace); None when
    the kernel has no netdev family (before 6.3) or the interface is gone."""
    from pyroute2.netlink import NLM_F_REQUEST, genlmsg
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    class devmsg(genlmsg):
        nla_map = (
            ("NETDEV_A_DEV_UNSPEC", "none"),
            ("NETDEV_A_DEV_IFINDEX", "uint32"),
            ("NETDEV_A_DEV_PAD", "none"),
            ("NETDEV_A_DEV_XDP_FEATURES", "uint64"),
        )

    sock = GenericNetlinkSocket()
    try:
        try:
            sock.bind("netdev", devmsg)
        except NetlinkError:
            return None
        msg = devmsg()
        msg["cmd"] = NETDEV_CMD_DEV_GET
        msg["version"] = 1
        msg["attrs"] = [("NETDEV_A_DEV_IFINDEX", ifindex)]
        try:
            for r in sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST):
                return int(r.get_attr("NETDEV_A_DEV_XDP_FEATURES") or 0)
        except NetlinkError:
            return None
        return None
    finally:
        sock.close()


def gro_on(ifname: str) -> bool | None:
    """GRO of an interface of the calling thread's namespace (ETHTOOL_GGRO); None unknown."""
    val = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_GGRO, 0))
    ifr = struct.pack("16sP", ifname.encode()[:15], ctypes.addressof(val))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    except OSError:
        return None
    return bool(struct.unpack("II", val.raw[:8])[1])


@dataclass(frozen=True)
class VethPeer:
    """The other end of a veth, as its own namespace sees it."""

    ifname: str
    netns: str | None  # namespace file; None: the same namespace as the veth
    up: bool
    native_xdp: int  # id of the native (driver mode) XDP program, 0 none
    gro: bool | None

    def describe(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        state = []
        if not self.up:
            state.append("down")
        state.append(f"native XDP program {self.native_xdp}" if self.native_xdp
                     else "no native XDP program")
        state.append({True: "GRO on", False: "GRO off", None: "GRO unknown"}[self.gro])
        return f"peer {self.ifname}{where}: {', '.join(state)}"


def _read_peer(peer_index: int) -> tuple[str, bool, int, bool | None] | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(peer_index)
    if not links:
        return None
    link = links[0]
    name = link.get_attr("IFLA_IFNAME")
    up = bool(link["flags"] & 1)
    xdp = link.get_attr("IFLA_XDP")
    native = 0
    if xdp is not None:
        mode = xdp.get_attr("IFLA_XDP_ATTACHED") or 0
        if mode == XDP_ATTACHED_DRV:
            native = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
        elif mode == XDP_ATTACHED_MULTI:
            native = xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or 0
    return name, up, native, gro_on(name)


def veth_peer(link, nsids: NsidPaths) -> VethPeer | None:
    """The peer of veth `link` (a link message from `nsids`' namespace), read where it
    lives; None when it cannot be found. Reads only: the pod's interface never changes."""
    peer = link.get_attr("IFLA_LINK")
    if not peer:
        return None
    nsid = link.get_attr("IFLA_LINK_NETNSID")
    path = None
    if nsid is not None:
        path = nsids.path(nsid)
        if path is None:
            return None
        got = in_netns(path, _read_peer, peer)
    else:
        got = _read_peer(peer)
    if got is None:
        return None
    name, up, native, gro = got
    return VethPeer(name, path, up, native, gro)
