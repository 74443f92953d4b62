"""Attaching the edge to its interface: XDP on ingress (native, else generic) and the tc
program on the clsact egress hook; and removing exactly that again, also after a crash."""

from __future__ import annotations

import errno
import json
import logging
import subprocess

from accel.datapath.edge.errors import EdgeError

log = logging.getLogger(__package__)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
TC_EGRESS = "ffff:fff3"
TC_PRIO = 0xED6E  # our filter's priority on the clsact egress hook: finds it again to delete
TC_HANDLE = 1


class Attachment:
    """The edge programs on one interface; `mode` is "native" | "generic" once attached."""

    def __init__(self, iface: str | None):
        self.iface = iface
        self.mode: str | None = None
        self._tc_ifindex: int | None = None
        self._made_clsact = False

    def attach(self, xdp_fn, tc_fn, mode: str) -> str:
        from bcc import BPF

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
                BPF.attach_xdp(self.iface, xdp_fn, flags)
            except Exception as e:  # bcc raises a bare Exception with the kernel's reason
                errors.append(f"{m}: {e}")
                continue
            self.mode = m
            break
        if self.mode is None:
            raise EdgeError(f"cannot attach XDP to {self.iface}: " + "; ".join(errors))
        if errors:
            log.info("edge: native XDP unavailable on %s (%s): generic mode", self.iface, errors)
        try:
            self._attach_tc(tc_fn)
        except Exception:
            self._detach_xdp()
            raise
        log.info("edge: XDP %s on %s, reverse NAT on its egress", self.mode, self.iface)
        return self.mode

    def _attach_tc(self, tc_fn) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.iface)
            if not idx:
                raise EdgeError(f"no interface {self.iface}")
            idx = idx[0]
            try:
                ipr.tc("add", "clsact", index=idx)
                self._made_clsact = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc(
                "replace-filter", "bpf", index=idx, handle=TC_HANDLE, fd=tc_fn.fd,
                name="edge_tc", parent=TC_EGRESS, prio=TC_PRIO, classid=1, direct_action=True,
            )
            self._tc_ifindex = idx

    def _detach_xdp(self) -> None:
        if self.mode is None or not self.iface:
            return
        from bcc import BPF

        flags = XDP_FLAGS_DRV_MODE if self.mode == "native" else XDP_FLAGS_SKB_MODE
        try:
            BPF.remove_xdp(self.iface, flags)
        except Exception as e:  # the interface may be gone already
            log.debug("edge: remove_xdp %s: %s", self.iface, e)
        self.mode = None

    def _detach_tc(self) -> None:
        if self._tc_ifindex is None:
            return
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        idx = self._tc_ifindex
        self._tc_ifindex = None
        with IPRoute() as ipr:
            try:
                ipr.tc("del-filter", "bpf", index=idx, handle=TC_HANDLE, parent=TC_EGRESS,
                       prio=TC_PRIO)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
            if self._made_clsact:
                self._made_clsact = False
                try:
                    others = ipr.get_filters(index=idx, parent=TC_EGRESS) + ipr.get_filters(
                        index=idx, parent="ffff:fff2"
                    )
                    if not [f for f in others if f.get_attr("TCA_KIND")]:
                        ipr.tc("del", "clsact", index=idx)
                except NetlinkError as e:
                    if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                        raise

    def detach(self) -> None:
        """Remove the XDP program and our tc filter (and the clsact qdisc if we made it)."""
        self._detach_xdp()
        self._detach_tc()


def attached_xdp(iface: str | None) -> str | None:
    """Name of the XDP program on the interface now (ours from an earlier agent is fine)."""
    try:
        out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", iface],
                             capture_output=True, text=True, check=True).stdout
        xdp = json.loads(out)[0].get("xdp") or {}
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None
    progs = [a.get("prog", {}) for a in xdp.get("attached", [])] or [xdp.get("prog", {})]
    names = [p.get("name") for p in progs if p]
    return names[0] if names else None


def detach_from(iface: str) -> list[str]:
    """Remove what an edge left on `iface` (after a crash or --keep): our XDP program in
    either mode and our tc egress filter. Another tool's programs are left alone."""
    from bcc import BPF
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    done = []
    if attached_xdp(iface) == "edge_xdp":
        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                BPF.remove_xdp(iface, flags)
            except Exception:  # not attached in this mode
                continue
        done.append(f"xdp on {iface}")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        if idx:
            try:
                ipr.tc("del-filter", "bpf", index=idx[0], handle=TC_HANDLE, parent=TC_EGRESS,
                       prio=TC_PRIO)
                done.append(f"tc egress filter on {iface}")
            except NetlinkError:
                pass
    return done
