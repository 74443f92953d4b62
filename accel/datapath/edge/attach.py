"""Attaching the edge to its interface: XDP on ingress (native, else generic) and the tc
program on the clsact egress hook; and removing exactly that again, also after a crash."""

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
TC_PRIO = 0xED6E  # our filter's priority on the clsact egress hook: finds it again to delete
TC_HANDLE = 1


class Attachment:
    """The edge programs on one interface; `mode` is "native" | "generic" once attached."""

    def __init__(self, iface: str | None):
        self.iface = iface
        self.mode: str | None = None
        self._tc_ifindex: int | None = None

    def attach(self, xdp_fd: int, tc_fd: int, mode: str) -> str:
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
            self._attach_tc(tc_fd)
        except Exception:
            self._detach_xdp()
            raise
        log.info("edge: XDP %s on %s, reverse NAT on its egress", self.mode, self.iface)
        return self.mode

    def _attach_tc(self, tc_fd: int) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.iface)
            if not idx:
                raise EdgeError(f"no interface {self.iface}")
            try:
                kattach.tc_attach(ipr, idx[0], tc_fd, "edge_tc", TC_EGRESS, TC_PRIO, TC_HANDLE)
            except kattach.AttachError as e:
                raise EdgeError(str(e)) from e
            self._tc_ifindex = idx[0]

    def _detach_xdp(self) -> None:
        if self.mode is None or not self.iface:
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
            kattach.tc_detach(ipr, idx, TC_EGRESS, TC_PRIO, TC_HANDLE)

    def detach(self) -> None:
        """Remove the XDP program and our tc filter (and the clsact qdisc once empty)."""
        self._detach_xdp()
        self._detach_tc()


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
    either mode and our tc egress filter. Another tool's programs are left alone."""
    from pyroute2 import IPRoute

    done = []
    if attached_xdp(iface) == "edge_xdp":
        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            kattach.xdp_detach(iface, flags)
        done.append(f"xdp on {iface}")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        if idx and kattach.tc_detach(ipr, idx[0], TC_EGRESS, TC_PRIO, TC_HANDLE):
            done.append(f"tc egress filter on {iface}")
    return done
