"""Attaching the edge to its interface, at one of two hooks: XDP (native, else generic) with
edge_ingress on the clsact ingress hook for what XDP marks, or the whole balancer on the
clsact ingress hook (edge_tc_balance: "tc", what `auto` picks for a veth, whose native XDP
copies every packet and whose generic XDP turns GRO off); edge_tc on the egress hook
either way. And removing exactly that again, also after a crash."""

from __future__ import annotations

import logging
import os

from accel.datapath.edge.errors import EdgeError
from accel.kernel import attach as kattach
from accel.kernel import bpf

log = logging.getLogger(__package__)

XDP_FLAGS_SKB_MODE = kattach.XDP_FLAGS_SKB_MODE
XDP_FLAGS_DRV_MODE = kattach.XDP_FLAGS_DRV_MODE
TC_EGRESS = kattach.TC_EGRESS
TC_INGRESS = kattach.TC_INGRESS
TC_PRIO = 0xED6E  # our filters' priority on the clsact hooks: finds them again to delete
TC_HANDLE = 1
# edge_reply on backends' interfaces: ahead of pod routing's filter (0xAC1D) on the same
# hook, to which it hands what is not an edge reply (TC_ACT_UNSPEC).
REPLY_PRIO = 0x0ED6


class Attachment:
    """The edge programs on one interface; `mode` is "native" | "generic" | "tc" once
    attached."""

    def __init__(self, iface: str | None):
        self.iface = iface
        self.mode: str | None = None
        self._tc_ifindex: int | None = None
        self._replies: set[int] = set()  # backends' interfaces running our edge_reply
        self._stale: set[int] = set()  # running an earlier agent's: replaced or removed

    def attach(self, xdp_fd: int, tc_fds: dict[str, int], mode: str) -> str:
        """`tc_fds`: edge_tc (egress), edge_ingress and edge_tc_balance (ingress)."""
        if mode == "auto" and is_veth(self.iface):
            mode = "tc"
        if mode == "tc":
            # Another tool's XDP program may stay (it runs before us); an earlier edge's
            # would balance with what it last knew: it goes.
            if attached_xdp(self.iface) == "edge_xdp":
                for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
                    kattach.xdp_detach(self.iface, flags)
            self._attach_tc(tc_fds["edge_tc"], tc_fds["edge_tc_balance"])
            self.mode = "tc"
            log.info("edge: balancer on %s's tc ingress, reverse NAT on its egress", self.iface)
            return self.mode
        foreign = attached_xdp(self.iface)
        if foreign and foreign != "edge_xdp":
            raise EdgeError(
                f"{self.iface} already runs XDP program {foreign!r}: detach it first "
                f"(ip link set dev {self.iface} xdp off) or pick another interface"
            )
        tries = {"auto": ("native", "generic"), "native": ("native",), "generic": ("generic",)}
        errors = []
        for m in tries[mode]:
            flags = XDP_FLAGS_DRV_MODE if m == "native" else XDP_FLAGS_SKB_MODE
            try:
                kattach.xdp_attach(self.iface, xdp_fd, flags)
            except kattach.AttachError as e:
                errors.append(f"{m}: {e}")
                continue
            self.mode = m
            break
        if self.mode is None:
            raise EdgeError(f"cannot attach XDP to {self.iface}: " + "; ".join(errors))
        if errors:
            log.info("edge: native XDP unavailable on %s (%s): generic mode", self.iface, errors)
        try:
            self._attach_tc(tc_fds["edge_tc"], tc_fds["edge_ingress"])
        except Exception:
            self._detach_xdp()
            raise
        log.info("edge: XDP %s on %s, reverse NAT on its egress, pod delivery and resets "
                 "on its ingress", self.mode, self.iface)
        return self.mode

    def _attach_tc(self, egress_fd: int, ingress_fd: int) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.iface)
            if not idx:
                raise EdgeError(f"no interface {self.iface}")
            self._tc_ifindex = idx[0]
            try:
                for fd, name, parent in ((egress_fd, "edge_tc", TC_EGRESS),
                                         (ingress_fd, "edge_ingress", TC_INGRESS)):
                    kattach.tc_attach(ipr, idx[0], fd, name, parent, TC_PRIO, TC_HANDLE)
            except kattach.AttachError as e:
                self._detach_tc()
                raise EdgeError(str(e)) from e
            # An earlier agent's edge_reply filters (a restart, --keep): ours to keep in
            # step from now on, or to remove.
            self._stale = reply_links(ipr)

    def _detach_xdp(self) -> None:
        if self.mode in (None, "tc") or not self.iface:
            self.mode = None
            return
        flags = XDP_FLAGS_DRV_MODE if self.mode == "native" else XDP_FLAGS_SKB_MODE
        kattach.xdp_detach(self.iface, flags)  # False: the interface is gone already
        self.mode = None

    def _detach_tc(self) -> None:
        if self._tc_ifindex is None:
            return
        from pyroute2 import IPRoute

        idx = self._tc_ifindex
        self._tc_ifindex = None
        with IPRoute() as ipr:
            for parent in (TC_EGRESS, TC_INGRESS):
                kattach.tc_detach(ipr, idx, parent, TC_PRIO, TC_HANDLE)

    @property
    def ifindex(self) -> int | None:
        """The edge interface's, while attached."""
        return self._tc_ifindex

    def sync_replies(self, wanted: set[int], reply_fd: int) -> None:
        """edge_reply on the ingress of exactly the interfaces in `wanted` (the host ends of
        the backends' interfaces the edge enters directly). An interface that went away
        took its filter with it."""
        if wanted == self._replies and not self._stale:
            return  # the agent's refresh asks every second: most times nothing changed
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for idx in sorted((self._replies | self._stale) - wanted):
                kattach.tc_detach(ipr, idx, TC_INGRESS, REPLY_PRIO, TC_HANDLE)
                self._replies.discard(idx)
            self._stale = set()
            for idx in sorted(wanted - self._replies):
                try:
                    kattach.tc_attach(ipr, idx, reply_fd, "edge_reply", TC_INGRESS,
                                      REPLY_PRIO, TC_HANDLE)
                except kattach.AttachError as e:  # the reply goes the kernel's way
                    log.warning("edge: edge_reply on ifindex %d: %s", idx, e)
                    continue
                self._replies.add(idx)

    def detach(self) -> None:
        """Remove the XDP program and our tc filters (and clsact qdiscs once empty)."""
        self._detach_xdp()
        self._detach_tc()
        self.sync_replies(set(), -1)


def attached_xdp(iface: str | None) -> str | None:
    """Name of the XDP program on the interface now (ours from an earlier agent is fine)."""
    if not iface:
        return None
    pid = kattach.xdp_prog_id(iface)
    if not pid:
        return None
    try:
        fd = bpf.prog_fd_by_id(pid)
    except bpf.BpfError:
        return None
    try:
        return bpf.prog_info(fd).name.decode()
    finally:
        os.close(fd)


def detach_from(iface: str) -> list[str]:
    """Remove what an edge left on `iface` (after a crash or --keep): our XDP program in
    either mode and our tc filters. Another tool's programs are left alone."""
    from pyroute2 import IPRoute

    done = []
    if attached_xdp(iface) == "edge_xdp":
        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            kattach.xdp_detach(iface, flags)
        done.append(f"xdp on {iface}")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        for parent, hook in ((TC_EGRESS, "egress"), (TC_INGRESS, "ingress")):
            if idx and kattach.tc_detach(ipr, idx[0], parent, TC_PRIO, TC_HANDLE):
                done.append(f"tc {hook} filter on {iface}")
        for idx in reply_links(ipr):  # edge_reply on backends' interfaces
            kattach.tc_detach(ipr, idx, TC_INGRESS, REPLY_PRIO, TC_HANDLE)
            done.append(f"edge_reply on ifindex {idx}")
    return done


def is_veth(iface: str | None) -> bool:
    """A veth: its packets are skbs already, so the balancer belongs at tc (see above)."""
    if not iface:
        return False
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        if not idx:
            return False
        info = ipr.get_links(idx[0])[0].get_attr("IFLA_LINKINFO")
        return bool(info) and info.get_attr("IFLA_INFO_KIND") == "veth"


def reply_links(ipr) -> set[int]:
    """Interfaces (this namespace) whose ingress runs a filter at edge_reply's priority."""
    found = set()
    for link in ipr.get_links():
        for f in ipr.get_filters(index=link["index"], parent=TC_INGRESS):
            if f["info"] >> 16 == REPLY_PRIO and f.get_attr("TCA_KIND") == "bpf":
                found.add(link["index"])
                break
    return found
