"""Attaching pinned programs and taking them off again: cgroups, a sockhash (sk_msg), XDP
and tc on an interface. Everything here works from program fds (opened from pins), so an
agent can adopt what an earlier one attached: an attachment already in place is found by
program id and kept, never doubled.

One rule for tc's clsact qdisc, for the edge and pod routing alike: added when missing, and
removed when our filter was the last on either of its hooks. An empty clsact does nothing,
and every tool that needs one adds it when missing (tc qdisc add/replace), so this is safe
also after a restart, when whether we made it is no longer known.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from accel.kernel import bpf

log = logging.getLogger(__name__)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"


@dataclass
class Attachments:
    """Every attachment made, undone in reverse order by undo_all()."""

    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def undo_all(self) -> list[str]:
        errors = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # keep undoing the rest
                errors.append(f"{what}: {e}")
                log.warning("undo %s failed: %s", what, e)
        return errors

    def forget(self) -> None:
        """--keep: leave everything in place for the next agent to adopt."""
        self._undo.clear()

    def __len__(self) -> int:
        return len(self._undo)


class AttachError(RuntimeError):
    """Attaching failed; .errno is the kernel's reason where there is one."""

    def __init__(self, message: str, err: int = 0):
        super().__init__(message)
        self.errno = err


class Program:
    """A pinned program, open: its fd, id and name."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.fd = bpf.obj_get(path)
        info = bpf.prog_info(self.fd)
        self.id = info.id
        self.name = info.name.decode()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---- cgroups -------------------------------------------------------------------------------

def cgroup_attach(prog: Program, cg_fd: int, attach_type: int) -> bool:
    """Attach with ALLOW_MULTI (other CNIs' programs stay); False when this very program was
    attached already (an adopted datapath)."""
    if prog.id in bpf.prog_query(cg_fd, attach_type):
        return False
    try:
        bpf.prog_attach(prog.fd, cg_fd, attach_type, bpf.F_ALLOW_MULTI)
    except bpf.BpfError as e:
        raise AttachError(f"attaching {prog.name}: {e.strerror}", e.errno) from None
    return True


def cgroup_detach(prog_fd: int, cg_fd: int, attach_type: int) -> None:
    try:
        bpf.prog_detach(prog_fd, cg_fd, attach_type)
    except bpf.BpfError as e:
        if e.errno != errno.ENOENT:  # already gone: the goal is reached
            raise


def cgroup_detach_ids(cgroup_dir: str | os.PathLike | None, prog_ids: set[int],
                      attach_types: set[int]) -> list[int]:
    """Detach the given program ids from a cgroup's hooks; returns those detached."""
    if not cgroup_dir or not prog_ids or not os.path.isdir(cgroup_dir):
        return []
    done = []
    cg_fd = os.open(Path(cgroup_dir), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach_type in attach_types:
            for pid in prog_ids & set(bpf.prog_query(cg_fd, attach_type)):
                try:
                    fd = bpf.prog_fd_by_id(pid)
                except bpf.BpfError:
                    continue  # unloaded meanwhile
                try:
                    cgroup_detach(fd, cg_fd, attach_type)
                    done.append(pid)
                finally:
                    os.close(fd)
    finally:
        os.close(cg_fd)
    return done


# ---- sockhash ------------------------------------------------------------------------------

def sockmap_attach(prog: Program, map_fd: int, attach_type: int) -> None:
    """A verdict program on a sockhash; attaching the one already there replaces it with
    itself (the kernel keeps one program per map and hook)."""
    try:
        bpf.prog_attach(prog.fd, map_fd, attach_type)
    except bpf.BpfError as e:
        raise AttachError(f"attaching {prog.name} to its sockhash: {e.strerror}",
                          e.errno) from None


def sockmap_detach(prog_fd: int, map_fd: int, attach_type: int) -> None:
    try:
        bpf.prog_detach(prog_fd, map_fd, attach_type)
    except bpf.BpfError as e:
        if e.errno != errno.ENOENT:
            raise


# ---- XDP -----------------------------------------------------------------------------------

def xdp_attach(ifname: str, prog_fd: int, flags: int, ipr=None) -> None:
    """Attach (or replace ours with) an XDP program; raises AttachError with the kernel's
    errno (EOPNOTSUPP: no native XDP in this driver)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise AttachError(f"no interface {ifname}", errno.ENODEV)
        ipr.link("set", index=idx[0], xdp={"attrs": [("IFLA_XDP_FD", prog_fd),
                                                     ("IFLA_XDP_FLAGS", flags)]})
    except NetlinkError as e:
        raise AttachError(f"XDP on {ifname}: {os.strerror(e.code)}", e.code) from None
    finally:
        if own:
            ipr.close()


def xdp_detach(ifname: str, flags: int) -> bool:
    """Remove whatever XDP program runs in that mode; False when there was none (or no
    interface)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        try:
            ipr.link("set", index=idx[0], xdp={"attrs": [("IFLA_XDP_FD", -1),
                                                         ("IFLA_XDP_FLAGS", flags)]})
        except NetlinkError:
            return False
    return True


def xdp_prog_id(ifname: str) -> int:
    """The id of the XDP program on an interface now (0: none)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return 0
        link = ipr.get_links(idx[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0


# ---- tc ------------------------------------------------------------------------------------

def tc_attach(ipr, index: int, prog_fd: int, name: str, parent: str, prio: int,
              handle: int = 1) -> None:
    """Our bpf filter (direct action) on a clsact hook, the qdisc added if missing."""
    from pyroute2.netlink.exceptions import NetlinkError

    made = False
    try:
        ipr.tc("add", "clsact", index=index)
        made = True
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise AttachError(f"clsact on ifindex {index}: {os.strerror(e.code)}",
                              e.code) from None
    try:
        ipr.tc("replace-filter", "bpf", index=index, handle=handle, fd=prog_fd, name=name,
               parent=parent, prio=prio, classid=1, direct_action=True)
    except NetlinkError as e:
        if made:
            _drop_clsact_if_empty(ipr, index)
        raise AttachError(f"tc filter {name} on ifindex {index}: {os.strerror(e.code)}",
                          e.code) from None


def tc_detach(ipr, index: int, parent: str, prio: int, handle: int = 1) -> bool:
    """Remove our filter, and the clsact qdisc when nothing is left on it. False when the
    filter (or the interface) was gone already."""
    from pyroute2.netlink.exceptions import NetlinkError

    gone = (errno.ENOENT, errno.ENODEV, errno.EINVAL)
    try:
        ipr.tc("del-filter", "bpf", index=index, handle=handle, parent=parent, prio=prio)
        removed = True
    except NetlinkError as e:
        if e.code not in gone:
            raise
        removed = False
    _drop_clsact_if_empty(ipr, index)
    return removed


def _drop_clsact_if_empty(ipr, index: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        filters = (ipr.get_filters(index=index, parent=TC_EGRESS)
                   + ipr.get_filters(index=index, parent=TC_INGRESS))
        if not [f for f in filters if f.get_attr("TCA_KIND")]:
            ipr.tc("del", "clsact", index=index)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            raise
