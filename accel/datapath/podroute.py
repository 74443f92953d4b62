"""Pod routing: packets between local mesh pods skip the bridge or the host's routing
(accel/bpf/pod_tc.c).

The agent is told which host-side veths belong to mesh pods (`--pod-iface` names or globs,
in `--pod-netns`, the namespace holding them): bridge ports, or routed veths without a
bridge (a /32 route per pod, as Calico and Cilium's veth mode do). For each such port it
reads the pod's addresses and MAC from the pod's own namespace, which it finds through the
veth's peer link: the kernel's truth, never learnt from packets. It writes them to
accel_pod_eps and attaches the tc program to the port's ingress. refresh() follows pods
coming and going; close() removes exactly the filters (and clsact qdiscs) it made;
detach_from() does the same for an agent that died.

A port that cannot be read or attached stays on the bridge: fail open, logged, reported.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel.datapath.maps import get_addr16, set_addr16
from accel.kernel import attach, loader
from accel.kernel.maps import Map
from accel.kernel.netns import NsidPaths

POD_PROGRAM = loader.Program("pod_tc.c", "accel_pod_tc", "sched_cls")
POD_MAPS = ("accel_pod_eps", "accel_pod_flows")  # lib/podroute.h: this unit's own

log = logging.getLogger(__name__)

TC_INGRESS = attach.TC_INGRESS
TC_PRIO = 0xAC1D  # our filter's priority on the ingress hook: finds it again to delete
TC_HANDLE = 0xAC1D
FILTER_NAME = "accel_pod_tc"
# Addresses are re-read from every known pod this often (refresh calls, about seconds); a
# new port, or one whose peer changed, at once. Pods rarely renumber in place.
REREAD_EVERY = 30


class PodRouteError(RuntimeError):
    pass


def netns_path(name: str | None) -> str | None:
    """A namespace as `ip netns` names it, or a path (/proc/PID/ns/net, /run/docker/netns/X)."""
    if not name:
        return None
    return name if name.startswith("/") else f"/run/netns/{name}"


def _ipr(path: str | None):
    from pyroute2 import IPRoute

    return IPRoute(netns=path) if path else IPRoute()


@dataclass(frozen=True)
class PodPort:
    ifname: str  # host side of the veth, in the router's namespace
    ifindex: int
    bridge: int  # master's ifindex; 0 for a routed veth
    host_mac: str  # the host side's MAC: a routed pod's gateway
    peer_netns: str  # path of the pod's namespace
    peer_ifindex: int
    mac: str  # the pod side's MAC
    addresses: tuple[str, ...]


@dataclass
class PodRouter:
    pin_dir: str
    patterns: tuple[str, ...]
    netns: str | None = None
    defines: dict[str, int | str] = field(default_factory=dict)
    capacity: int = 16384  # pod addresses
    flows: int = 131072  # pod-to-pod TCP connections handed over (LRU)

    def __post_init__(self) -> None:
        if not self.patterns:
            raise PodRouteError("pod routing needs at least one --pod-iface")
        self._path = netns_path(self.netns)
        if self._path and not os.path.exists(self._path):
            raise PodRouteError(f"--pod-netns {self.netns}: no such network namespace")
        defines = {**self.defines, "ACCEL_POD_EPS_MAX": self.capacity,
                   "ACCEL_POD_FLOWS_MAX": self.flows}
        unit = loader.Unit("pods", (POD_PROGRAM,), defines)
        try:
            loaded = loader.ensure(unit, self.pin_dir)
        except loader.LoadError as e:
            # Maps a build with other layouts kept (--keep, then an upgrade) fail the
            # verifier (bcc opens a pinned map whatever its layout): ours start afresh,
            # once; the next refresh() writes the pods again, and a handed-over connection
            # whose entry is gone takes the kernel's path.
            kept = [m for m in POD_MAPS if os.path.exists(os.path.join(self.pin_dir, m))]
            if not kept:
                raise
            log.warning("pod routing: programs do not load over the maps pinned in %s (%s): "
                        "an older build's? recreating %s", self.pin_dir, e, ", ".join(kept))
            for m in kept:
                os.unlink(os.path.join(self.pin_dir, m))
            loader.forget(self.pin_dir, unit.name, [POD_PROGRAM.function])
            loaded = loader.ensure(unit, self.pin_dir)
        self.prog = attach.Program(loaded.programs[POD_PROGRAM.function])
        self.table = Map.open(os.path.join(self.pin_dir, "accel_pod_eps"))
        self.prog_id = self.prog.id
        self.ports: dict[int, PodPort] = {}  # by ifindex: exactly the ports carrying our filter
        # address -> (ifindex, bridge, mac); a kept map's entries are adopted, so the first
        # refresh drops those no pod holds any more.
        self.written: dict[str, tuple[int, int, str, str]] = {
            str(get_addr16(k)): (v.ifindex, v.bridge, bytes(v.mac).hex(":"),
                                 bytes(v.host_mac).hex(":"))
            for k, v in self.table.items()
        }
        self.conflicts: list[str] = []
        self.failures: dict[str, str] = {}  # ifname -> why it stays on the bridge
        self._ticks = 0
        self._node = _ipr(self._path)
        self._nsids = NsidPaths(self._node)

    # ---- discovery ---------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[Any, str | None]]:
        """Veths matching a pattern whose other end is in another namespace (a pod's), each
        with why it must stay on the bridge, if it must."""
        links = self._node.get_links()
        by_index = {link["index"]: link for link in links}
        out = []
        for link in links:
            name = link.get("ifname") or ""
            if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "veth":
                continue
            if link.get("link_netnsid") is None:
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
                out.append((link, _l2_isolation(link, by_index.get(link.get("master")))))
        return out

    def _read_port(self, link: dict[str, Any]) -> PodPort:
        name = link.get("ifname")
        nsid, peer = link.get("link_netnsid"), link.get("link")
        path = self._nsids.path(nsid)
        if path is None:
            raise PodRouteError(f"{name}: the pod's namespace (nsid {nsid}) was not found")
        with _ipr(path) as ipr:
            links = ipr.get_links(peer)
            if not links:
                raise PodRouteError(f"{name}: the pod side (ifindex {peer}) is gone")
            mac = links[0].get("address")
            addrs = []
            for a in ipr.get_addr(index=peer):
                ip = ipaddress.ip_address(a.get("address"))
                # Link-local addresses repeat across links: they do not name a pod.
                if not ip.is_link_local:
                    addrs.append(str(ip))
        return PodPort(ifname=name, ifindex=link["index"], bridge=link.get("master") or 0,
                       host_mac=link.get("address"), peer_netns=path, peer_ifindex=peer, mac=mac,
                       addresses=tuple(sorted(addrs)))

    # ---- attach and write --------------------------------------------------------------------

    def _attach(self, ifindex: int) -> None:
        attach.tc_attach(self._node, ifindex, self.prog.fd, filter_name(self.prog_id),
                         TC_INGRESS, TC_PRIO, TC_HANDLE)

    def refresh(self) -> None:
        """Bring ports, filters and accel_pod_eps in line with the pods there are now."""
        self._ticks += 1
        reread = self._ticks % REREAD_EVERY == 0
        current: dict[int, PodPort] = {}
        failures: dict[str, str] = {}
        for link, unroutable in self._candidates():
            idx = link["index"]
            known = self.ports.get(idx)
            same = (known is not None and known.peer_ifindex == link.get("link")
                    and known.bridge == (link.get("master") or 0)
                    and known.host_mac == link.get("address"))
            try:
                if unroutable:
                    raise PodRouteError(unroutable)
                port = known if same and not reread else self._read_port(link)
                if idx not in self.ports:
                    self._attach(idx)
                current[idx] = port
            except Exception as e:  # this pod stays on the bridge; the others go on
                failures[link.get("ifname")] = str(e)
        for idx in set(self.ports) - set(current):
            try:
                _remove_filter(self._node, idx)
            except Exception as e:
                log.debug("pod routing: detach ifindex %d: %s", idx, e)
        self.ports = current
        for name, why in failures.items():
            if self.failures.get(name) != why:
                log.warning("pod routing: %s stays on the bridge: %s", name, why)
        self.failures = failures
        self._write(current.values())

    def _write(self, ports: Iterable[PodPort]) -> None:
        owners: dict[str, list[PodPort]] = {}
        for p in ports:
            for a in p.addresses:
                owners.setdefault(a, []).append(p)
        # An address two pods claim names neither: both stay on the bridge.
        self.conflicts = sorted(a for a, ps in owners.items() if len(ps) > 1)
        want = {a: (ps[0].ifindex, ps[0].bridge, ps[0].mac, ps[0].host_mac)
                for a, ps in owners.items() if len(ps) == 1}
        for addr in [a for a in self.written if a not in want]:
            try:
                del self.table[self._key(addr)]
            except KeyError:
                pass
            del self.written[addr]
        full = 0
        for addr, val in want.items():
            if self.written.get(addr) == val:
                continue
            try:
                self.table[self._key(addr)] = self._leaf(*val)
                self.written[addr] = val
            except Exception:  # map full: that pod stays on the bridge
                full += 1
        if full:
            log.warning("pod routing: accel_pod_eps is full; %d addresses stay on the bridge",
                        full)

    def _key(self, addr: str):
        k = self.table.Key()
        set_addr16(k, ipaddress.ip_address(addr))
        return k

    def _leaf(self, ifindex: int, bridge: int, mac: str, host_mac: str):
        v = self.table.Leaf()
        v.ifindex, v.bridge = ifindex, bridge
        for field_, text in ((v.mac, mac), (v.host_mac, host_mac)):
            for i, b in enumerate(bytes.fromhex(text.replace(":", ""))):
                field_[i] = b
        return v

    # ---- reporting and teardown --------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        return {"used": len(self.written), "capacity": self.capacity}

    def status(self) -> dict[str, Any]:
        return {
            "netns": self.netns or "",
            "patterns": list(self.patterns),
            "ports": [{"iface": p.ifname, "addresses": list(p.addresses),
                       "bridge": p.bridge or None}
                      for p in sorted(self.ports.values(), key=lambda p: p.ifname)],
            "addresses": len(self.written),
            "conflicts": list(self.conflicts),
            "failures": dict(self.failures),
        }

    def close(self) -> None:
        for idx in self.ports:
            try:
                _remove_filter(self._node, idx)
            except Exception as e:
                log.warning("pod routing: detach ifindex %d: %s", idx, e)
        self.ports = {}
        for addr in list(self.written):
            try:
                del self.table[self._key(addr)]
            except KeyError:
                pass
        self.written.clear()
        self._node.close()
        self.table.close()
        self.prog.close()


@dataclass
class Unavailable:
    """Pod routing asked for but not possible here (the program does not load on this
    kernel, the namespace went away): the agent runs on without it, traffic keeps the
    bridge, and status says why."""

    patterns: tuple[str, ...]
    netns: str | None
    error: str

    def usage(self) -> dict[str, int]:
        return {"used": 0, "capacity": 0}

    def status(self) -> dict[str, Any]:
        return {"netns": self.netns or "", "patterns": list(self.patterns), "ports": [],
                "addresses": 0, "conflicts": [], "failures": {}, "error": self.error}

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _l2_isolation(port: dict[str, Any], bridge: dict[str, Any] | None) -> str | None:
    """Why the bridge would keep this port from other pods where same-bridge routing would
    not: an isolated port, or a VLAN-filtering bridge (ports in different VLANs). Such
    ports stay with the bridge, which enforces it."""
    if bridge is None:
        return None
    slave = port.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA")
    if slave is not None and slave.get_attr("IFLA_BRPORT_ISOLATED"):
        return "an isolated bridge port: left to the bridge"
    if bridge.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_BR_VLAN_FILTERING"):
        return f"bridge {bridge.get('ifname')} filters VLANs: left to the bridge"
    return None


def _remove_filter(ipr, ifindex: int) -> bool:
    """Delete our ingress filter (and the clsact qdisc once nothing is left on it)."""
    return attach.tc_detach(ipr, ifindex, TC_INGRESS, TC_PRIO, TC_HANDLE)


def filter_name(prog_id: int) -> str:
    # The program id in the filter's name: pyroute2 does not decode TCA_BPF_ID, and an
    # uninstall must tell a dead agent's filters from a live one's.
    return f"{FILTER_NAME}#{prog_id}"


def carries(ipr, ifindex: int, prog_id: int) -> bool:
    """Does this interface's ingress run program `prog_id` at our priority?"""
    for f in ipr.get_filters(index=ifindex, parent=TC_INGRESS):
        if (f["info"] >> 16 == TC_PRIO
                and f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == filter_name(prog_id)):
            return True
    return False


def detach_from(netns: str | None, prog_id: int) -> list[str]:
    """Remove the ingress filters running `prog_id` (an agent's that died, or --keep) from
    every interface of `netns`; another agent's filters stay. The clsact qdisc goes too when
    nothing else is left on it."""
    path = netns_path(netns)
    if path and not Path(path).exists():
        return []
    done = []
    with _ipr(path) as ipr:
        for link in ipr.get_links():
            idx = link["index"]
            try:
                if carries(ipr, idx, prog_id) and _remove_filter(ipr, idx):
                    done.append(f"tc ingress filter on {link.get('ifname')}")
            except Exception as e:
                log.debug("pod routing: %s: %s", link.get("ifname"), e)
    return done
