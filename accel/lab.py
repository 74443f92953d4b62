"""A lab mesh: N pods as network namespaces on a bridge, for tests, the demo and benchmarks.

Everything lives in namespaces named ``<prefix>-*``: a ``node`` namespace holds the bridge
(standing in for the host's pod network, so the root namespace is never touched) and each
pod has one veth into it. ``routed=True`` builds the other common CNI shape instead (as
Calico and Cilium do): no bridge, each pod's address is a /32 (/128) route to its veth in
the node namespace, the pod's default gateway is a link-local address the node holds on
every pod veth, and the node forwards between pods. Deleting the namespaces removes
every link, so ``down`` works after a crash: it only needs the prefix, which is recorded
under /run/accel/labs.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns

from accel.kernel import netns as kernel_netns

log = logging.getLogger(__name__)
STATE_DIR = Path(os.environ.get("ACCEL_RUN_DIR", "/run/accel")) / "labs"
NETNS_DIR = Path("/run/netns")

T = TypeVar("T")


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that has entered netns `name` (accel/kernel/netns.py): setns()
    moves only that thread; sockets fn creates stay in that namespace for life."""
    return kernel_netns.in_netns(str(NETNS_DIR / name), fn)


@dataclass
class Pod:
    name: str  # netns name
    index: int
    ip: ipaddress.IPv4Address
    ip6: ipaddress.IPv6Address
    host_ifname: str  # veth end in the node namespace
    cgroup: str | None = None  # cgroup2 directory its processes join, if any

    def command(self, cmd: str | Sequence[str]) -> list[str]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.name, *argv]

    def _join_cgroup(self) -> None:
        if self.cgroup:
            Path(self.cgroup, "cgroup.procs").write_text(str(os.getpid()))

    def run(
        self, cmd: str | Sequence[str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(
            self.command(cmd), check=check, preexec_fn=self._join_cgroup, **kw
        )

    def popen(self, cmd: str | Sequence[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.command(cmd), preexec_fn=self._join_cgroup, **kw)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket living in this pod's namespace (usable from any thread)."""
        return in_netns(self.name, lambda: socket.socket(family, type))

    def call(self, fn: Callable[[], T]) -> T:
        return in_netns(self.name, fn)


@dataclass
class Lab:
    """`with Lab(3) as lab:` gives lab.pods[0..2]; everything is removed on exit."""

    n_pods: int = 2
    prefix: str = field(default_factory=lambda: "ax" + secrets.token_hex(3))
    subnet: str = "10.200.0.0/24"
    subnet6: str = "fd00:200::/64"
    cgroup: str | None = None
    routed: bool = False
    pods: list[Pod] = field(default_factory=list)

    GATEWAY4 = "169.254.1.1"  # a routed pod's gateway, on each of the node's pod veths
    GATEWAY6 = "fe80::1"

    @property
    def node(self) -> str:
        return f"{self.prefix}-node"

    @property
    def bridge(self) -> str:
        return "br0"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return ipaddress.ip_network(self.subnet)[1]

    @property
    def gateway6(self) -> ipaddress.IPv6Address:
        return ipaddress.ip_network(self.subnet6)[1]

    def route_ipv6(self) -> None:
        """A bridged lab routes IPv4 only (pods reach each other over IPv6 on the bridge):
        the bridge gets `gateway6` and each pod a default route via it, so the node routes
        IPv6 to and from the pods too. A routed lab has that already."""
        if self.routed:
            return
        with IPRoute(netns=self.node) as ipr:
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=br, address=str(self.gateway6), prefixlen=64, flags=0x02)
        for pod in self.pods:
            pod.run(f"ip -6 route add default via {self.gateway6}")

    def pod_ip(self, i: int) -> ipaddress.IPv4Address:
        return ipaddress.ip_network(self.subnet)[11 + i]

    def pod_ip6(self, i: int) -> ipaddress.IPv6Address:
        return ipaddress.ip_network(self.subnet6)[0x11 + i]

    def up(self) -> Lab:
        if len(self.prefix) > 9:
            raise ValueError("lab prefix must be at most 9 characters (link names are 15)")
        self._record()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        net6 = ipaddress.ip_network(self.subnet6)
        netns.create(self.node)
        with IPRoute(netns=self.node) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            br = None
            if self.routed:
                _forwarding_on(self.node)
            else:
                ipr.link("add", ifname=self.bridge, kind="bridge")
                br = ipr.link_lookup(ifname=self.bridge)[0]
                ipr.addr("add", index=br, address=str(self.gateway), prefixlen=net.prefixlen)
                ipr.link("set", index=br, state="up")
            for i in range(self.n_pods):
                pod = Pod(
                    name=f"{self.prefix}-p{i}",
                    index=i,
                    ip=self.pod_ip(i),
                    ip6=self.pod_ip6(i),
                    host_ifname=f"{self.prefix}p{i}",
                    cgroup=self.cgroup,
                )
                netns.create(pod.name)
                ipr.link(
                    "add",
                    ifname=pod.host_ifname,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": pod.name},
                )
                host = ipr.link_lookup(ifname=pod.host_ifname)[0]
                if self.routed:
                    self._route_pod(ipr, host, pod)
                else:
                    ipr.link("set", index=host, master=br, state="up")
                    with IPRoute(netns=pod.name) as pr:
                        self._pod_up(pr, pod, net.prefixlen, net6.prefixlen)
                        pr.route("add", dst="default", gateway=str(self.gateway))
                self.pods.append(pod)

    @staticmethod
    def _pod_up(pr: IPRoute, pod: Pod, plen: int, plen6: int) -> int:
        pr.link("set", index=pr.link_lookup(ifname="lo")[0], state="up")
        eth = pr.link_lookup(ifname="eth0")[0]
        pr.addr("add", index=eth, address=str(pod.ip), prefixlen=plen)
        pr.addr("add", index=eth, address=str(pod.ip6), prefixlen=plen6,
                flags=0x02)  # IFA_F_NODAD: usable at once
        pr.link("set", index=eth, state="up")
        return eth

    def _route_pod(self, ipr: IPRoute, host: int, pod: Pod) -> None:
        """A routed pod: /32 and /128 towards its veth; the node holds the gateway address on
        every pod veth, so it answers the pod's ARP and neighbour solicitations itself."""
        ipr.link("set", index=host, state="up")
        ipr.addr("add", index=host, address=self.GATEWAY4, prefixlen=32)
        ipr.addr("add", index=host, address=self.GATEWAY6, prefixlen=64, flags=0x02)
        ipr.route("add", dst=f"{pod.ip}/32", oif=host)
        ipr.route("add", dst=f"{pod.ip6}/128", oif=host)
        with IPRoute(netns=pod.name) as pr:
            eth = self._pod_up(pr, pod, 32, 128)
            pr.route("add", dst=f"{self.GATEWAY4}/32", oif=eth, scope=253)  # link scope
            pr.route("add", dst="default", gateway=self.GATEWAY4, oif=eth)
            pr.route("add", dst="default", gateway=self.GATEWAY6, oif=eth, family=10)

    def _record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{self.prefix}.json").write_text(
            json.dumps({"prefix": self.prefix, "n_pods": self.n_pods, "subnet": self.subnet})
        )

    def down(self) -> None:
        remove(self.prefix)
        self.pods.clear()

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def describe(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "node": self.node,
            "topology": "routed" if self.routed else "bridge",
            "pods": [
                {"name": p.name, "ip": str(p.ip), "ip6": str(p.ip6), "host_ifname": p.host_ifname}
                for p in self.pods
            ],
        }


@dataclass
class Outside:
    """A client outside the host, as the edge sees one: its own namespace `name`, wired by a
    veth to namespace `node` (None: this one) whose end there, `iface`, is the edge
    interface. Addresses `net4`.2/24 behind gateway `net4`.1 (and `net6`:2/64 behind
    `net6`:1 when given); its frames carry full checksums (tx offload off), as from a wire.
    `forward`: turn on forwarding in `node` (a lab's node namespace; never this one's).
    Named `<lab prefix>-ext`, `remove(prefix)` takes it away after a crash too."""

    name: str
    iface: str
    net4: str  # "10.203.0"
    net6: str | None = None  # "fd00:203:"
    node: str | None = None
    forward: bool = True

    @property
    def ip(self) -> str:
        return f"{self.net4}.2"

    @property
    def ip6(self) -> str | None:
        return f"{self.net6}:2" if self.net6 else None

    def up(self) -> Outside:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        netns.create(self.name)
        with IPRoute(**({"netns": self.node} if self.node else {})) as ipr:
            ipr.link("add", ifname=self.iface, kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": self.name})
            idx = ipr.link_lookup(ifname=self.iface)[0]
            ipr.addr("add", index=idx, address=f"{self.net4}.1", prefixlen=24)
            if self.net6:
                ipr.addr("add", index=idx, address=f"{self.net6}:1", prefixlen=64, flags=0x02)
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=self.name) as pr:
            pr.link("set", index=pr.link_lookup(ifname="lo")[0], state="up")
            eth = pr.link_lookup(ifname="eth0")[0]
            pr.addr("add", index=eth, address=self.ip, prefixlen=24)
            if self.net6:
                pr.addr("add", index=eth, address=self.ip6, prefixlen=64, flags=0x02)
            pr.link("set", index=eth, state="up")
            pr.route("add", dst="default", gateway=f"{self.net4}.1")
            if self.net6:
                pr.route("add", dst="default", gateway=f"{self.net6}:1",
                         family=socket.AF_INET6)
        if self.forward and self.node:
            _forwarding_on(self.node)
        subprocess.run(["ip", "netns", "exec", self.name, "ethtool", "-K", "eth0", "tx", "off"],
                       check=True, capture_output=True)

    def down(self) -> None:
        """The namespace goes, and the veth pair with it."""
        try:
            netns.remove(self.name)
        except OSError:
            pass


def _forwarding_on(ns: str) -> None:
    """IPv4 and IPv6 forwarding in namespace `ns` (a lab's: never the host's own)."""
    in_netns(ns, lambda: _sysctl({"net/ipv4/ip_forward": "1",
                                  "net/ipv6/conf/all/forwarding": "1"}))


def _sysctl(values: dict[str, str]) -> None:
    for key, value in values.items():
        Path("/proc/sys", key).write_text(value)


def remove(prefix: str) -> list[str]:
    """Delete every namespace of lab `prefix` (and with them its links). Idempotent."""
    removed = []
    for name in netns.listnetns():
        if name in (f"{prefix}-node", f"{prefix}-ext") or name.startswith(f"{prefix}-p"):
            # A process still inside the namespace (an agent's housekeeping) can make the
            # removal fail for a moment: retry, and say so if it never goes.
            for attempt in range(5):
                try:
                    netns.remove(name)
                    removed.append(name)
                    break
                except OSError as e:
                    if attempt == 4:
                        log.warning("lab %s: cannot remove namespace %s: %s", prefix, name, e)
                    time.sleep(0.2)
    (STATE_DIR / f"{prefix}.json").unlink(missing_ok=True)
    return removed


def recorded() -> list[str]:
    if not STATE_DIR.is_dir():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json"))
