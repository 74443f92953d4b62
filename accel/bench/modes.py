"""The compared datapaths, each on its own pair of pods on the same bridge.

    kernel         client -> server pod IP; no meshaccel, no proxy
    accel          client -> service VIP, balanced at connect(), pod-routed past the bridge:
                   plain TCP to the applications (the default `fastpath: route`)
    accel+redirect the same with `fastpath: redirect`: every send handed socket to socket
    sidecar        client -> its pod's haproxy -> the server pod's haproxy -> server,
                   as Envoy sidecars; captured by iptables REDIRECT as Istio does (haproxy
                   finds the original destination with SO_ORIGINAL_DST), or by explicit proxy
                   ports (--sidecar-capture ports)
    sidecar+accel  the same three hops over explicit proxy ports, every hop redirected by the
                   agent, as Merbridge does for Istio (a REDIRECTed connection cannot be paired:
                   its two ends see different addresses)
    iptables-dnat  client -> service VIP, DNAT by kube-proxy style rules in the client pod
    accel-noflows, accel+redirect-noflows
                   accel and accel+redirect with connection records switched off (the
                   agent's flag, set before each of their runs): the records' cost, measured
                   in the same run (`accel bench --flows-cost`; not in the default set)

Each mode owns its pods, so one mode's iptables rules and conntrack never touch another's,
and its processes join the accel cgroup (programs attached) or the plain one (none).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel.bench.workloads import start_server, wait_listening
from accel.lab import Pod

MODES = ("kernel", "accel", "accel+redirect", "sidecar", "sidecar+accel", "iptables-dnat")
FLOW_MODES = ("accel", "accel-noflows", "accel+redirect", "accel+redirect-noflows")
ALL_MODES = MODES + ("accel-noflows", "accel+redirect-noflows")
PROXY_UID = 1337  # Istio's proxy uid: the capture rules let the proxy's own traffic pass
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
# Pod sysctls: the crr client closes first (TIME_WAIT on its side) at thousands per second.
POD_SYSCTLS = ("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535")


@dataclass
class Placement:
    """The CPU of each role; the same for every mode of a run."""

    client: int
    server: int
    client_proxy: int
    server_proxy: int

    @classmethod
    def from_cpus(cls, cpus: tuple[int, ...]) -> Placement:
        # A sidecar shares its pod's CPU when there are fewer CPUs than roles.
        pick = [cpus[i % len(cpus)] for i in range(4)]
        return cls(client=pick[0], server=pick[1], client_proxy=pick[2], server_proxy=pick[3])

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class ModeContext:
    client: Pod
    server: Pod
    placement: Placement
    ports: dict[str, int]  # workload -> service port
    vip: str
    run_dir: Path
    msg_size: int = 64


@dataclass
class Mode:
    """Base: plain servers on every address of the server pod, the client dials `target`."""

    name: str
    accel: bool = False
    describe: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    ctx: ModeContext | None = None
    flows: bool = True  # connection records on while it runs (accel modes)

    server_bind = "0.0.0.0"

    def setup(self, ctx: ModeContext) -> None:
        self.ctx = ctx
        for pod in (ctx.client, ctx.server):
            pod.run(["sysctl", "-qw", *POD_SYSCTLS])
        self.setup_path(ctx)
        for workload, port in ctx.ports.items():
            self.procs.append(start_server(workload, ctx.server, self.server_bind, port,
                                           ctx.placement.server, ctx.msg_size))
        for port in ctx.ports.values():
            wait_listening(ctx.server, port, self.procs)
        self.wait_path(ctx)

    def setup_path(self, ctx: ModeContext) -> None:
        """Rules and proxies of the mode, before the servers start."""

    def wait_path(self, ctx: ModeContext) -> None:
        """Wait for the mode's proxies, after the servers listen."""

    def target(self, workload: str) -> tuple[str, int]:
        assert self.ctx is not None
        return str(self.ctx.server.ip), self.ctx.ports[workload]

    def services(self) -> list[dict[str, Any]]:
        """mesh.yaml services this mode needs from the agent."""
        return []

    def record(self) -> dict[str, Any]:
        assert self.ctx is not None
        out = {"describe": self.describe, "accel": self.accel,
               "client_pod": self.ctx.client.name, "server_pod": self.ctx.server.name}
        if self.accel:  # the agent pod-routes these two (runner: --pod-iface)
            out["pod_routing"] = [self.ctx.client.host_ifname, self.ctx.server.host_ifname]
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


class KernelMode(Mode):
    def __init__(self) -> None:
        super().__init__("kernel", describe="client -> server pod IP over the bridge, no meshaccel")


class AccelMode(Mode):
    def __init__(self, fastpath: str = "route", flows: bool = True) -> None:
        how = ("sock_ops/sk_msg redirect socket to socket" if fastpath == "redirect"
               else "TCP as it is (fastpath: route)")
        name = "accel+redirect" if fastpath == "redirect" else "accel"
        super().__init__(name + ("" if flows else "-noflows"), accel=True,
                         describe=f"client -> service VIP; connect-time balancing, {how} "
                         "and pod routing by the agent"
                         + ("" if flows else "; connection records off"), flows=flows)
        self.fastpath = fastpath

    def target(self, workload: str) -> tuple[str, int]:
        assert self.ctx is not None
        return self.ctx.vip, self.ctx.ports[workload]

    def services(self) -> list[dict[str, Any]]:
        assert self.ctx is not None
        return [
            {"name": f"{self.name}-{w}", "vip": self.ctx.vip, "port": port, "protocol": "TCP",
             "fastpath": self.fastpath,
             "endpoints": [{"address": str(self.ctx.server.ip), "port": port, "weight": 1}]}
            for w, port in self.ctx.ports.items()
        ]


class DnatMode(Mode):
    """kube-proxy's iptables mode: KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* -> DNAT."""

    def __init__(self) -> None:
        super().__init__("iptables-dnat",
                         describe="client -> service VIP, DNAT by kube-proxy style iptables "
                         "rules (nat OUTPUT of the client pod)")

    def setup_path(self, ctx: ModeContext) -> None:
        rules = ["-t nat -N KUBE-SERVICES", "-t nat -A OUTPUT -j KUBE-SERVICES"]
        for i, (workload, port) in enumerate(ctx.ports.items()):
            svc, sep = f"KUBE-SVC-BENCH{i}", f"KUBE-SEP-BENCH{i}"
            rules += [
                f"-t nat -N {svc}", f"-t nat -N {sep}",
                f"-t nat -A KUBE-SERVICES -d {ctx.vip}/32 -p tcp --dport {port} "
                f"-m comment --comment bench/{workload} -j {svc}",
                f"-t nat -A {svc} -j {sep}",
                f"-t nat -A {sep} -p tcp -j DNAT --to-destination {ctx.server.ip}:{port}",
            ]
        for rule in rules:
            ctx.client.run(["iptables", *rule.split()])

    def target(self, workload: str) -> tuple[str, int]:
        assert self.ctx is not None
        return self.ctx.vip, self.ctx.ports[workload]


class SidecarMode(Mode):
    """One haproxy per pod (TCP mode, one thread, pinned), like an Envoy sidecar."""

    server_bind = "127.0.0.1"  # the app behind a sidecar listens on loopback

    def __init__(self, accel: bool, capture: str = "redirect") -> None:
        if accel and capture != "ports":
            raise ValueError("sidecar+accel needs explicit proxy ports: a REDIRECTed "
                             "connection's two ends see different addresses and cannot be paired")
        self.capture = capture
        how = ("iptables REDIRECT to 15001/15006 (Istio's capture), original destination "
               "by SO_ORIGINAL_DST" if capture == "redirect"
               else "explicit proxy ports (client dials 127.0.0.1:port, proxies dial peers)")
        super().__init__("sidecar+accel" if accel else "sidecar", accel=accel,
                         describe=f"client -> haproxy -> haproxy -> server; {how}"
                         + ("; every hop redirected by the agent" if accel else ""))

    def setup_path(self, ctx: ModeContext) -> None:
        if self.capture == "redirect":
            for pod in (ctx.client, ctx.server):
                for rule in istio_rules():
                    pod.run(["iptables", *rule.split()])
        for pod, role, cpu in ((ctx.client, "client", ctx.placement.client_proxy),
                               (ctx.server, "server", ctx.placement.server_proxy)):
            cfg = ctx.run_dir / f"haproxy-{self.name}-{role}.cfg"
            cfg.write_text(haproxy_config(self.capture, role, ctx))
            self.procs.append(pod.popen(
                ["taskset", "-c", str(cpu), "haproxy", "-db", "-f", str(cfg)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    def wait_path(self, ctx: ModeContext) -> None:
        if self.capture == "redirect":
            for pod in (ctx.client, ctx.server):
                wait_listening(pod, OUTBOUND_PORT, self.procs)
                wait_listening(pod, INBOUND_PORT, self.procs)
        else:
            for port in ctx.ports.values():
                wait_listening(ctx.client, port, self.procs, addr="127.0.0.1")
                wait_listening(ctx.server, port, self.procs, addr=str(ctx.server.ip))

    def target(self, workload: str) -> tuple[str, int]:
        assert self.ctx is not None
        if self.capture == "redirect":
            return str(self.ctx.server.ip), self.ctx.ports[workload]
        return "127.0.0.1", self.ctx.ports[workload]

    def record(self) -> dict[str, Any]:
        return {**super().record(), "capture": self.capture}


def istio_rules() -> list[str]:
    """Istio's istio-iptables capture, reduced to what a TCP-only pod needs."""
    return [
        "-t nat -N MESH_INBOUND",
        "-t nat -A PREROUTING -p tcp -j MESH_INBOUND",
        f"-t nat -A MESH_INBOUND -p tcp -j REDIRECT --to-ports {INBOUND_PORT}",
        "-t nat -N MESH_OUTPUT",
        "-t nat -A OUTPUT -p tcp -j MESH_OUTPUT",
        f"-t nat -A MESH_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN",
        "-t nat -A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
        f"-t nat -A MESH_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
    ]


def haproxy_config(capture: str, role: str, ctx: ModeContext) -> str:
    head = f"""# meshaccel bench: the {role} pod's sidecar ({capture} capture)
global
    uid {PROXY_UID}
    gid {PROXY_UID}
    nbthread 1
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""
    if capture == "redirect":
        # Address 0.0.0.0 and no port: haproxy dials the original destination
        # (SO_ORIGINAL_DST of the REDIRECTed connection); inbound keeps the original port.
        return head + f"""
frontend outbound
    bind 0.0.0.0:{OUTBOUND_PORT}
    default_backend original_destination

backend original_destination
    server original 0.0.0.0

frontend inbound
    bind 0.0.0.0:{INBOUND_PORT}
    default_backend local_app

backend local_app
    server app 127.0.0.1
"""
    parts = [head]
    for workload, port in ctx.ports.items():
        if role == "client":
            parts.append(f"""
listen outbound_{workload}
    bind 127.0.0.1:{port}
    server peer {ctx.server.ip}:{port}
""")
        else:
            parts.append(f"""
listen inbound_{workload}
    bind {ctx.server.ip}:{port}
    server app 127.0.0.1:{port}
""")
    return "".join(parts)


def make_modes(names: tuple[str, ...], sidecar_capture: str = "redirect") -> list[Mode]:
    makers = {
        "kernel": KernelMode,
        "accel": AccelMode,
        "accel+redirect": lambda: AccelMode("redirect"),
        "sidecar": lambda: SidecarMode(accel=False, capture=sidecar_capture),
        "sidecar+accel": lambda: SidecarMode(accel=True, capture="ports"),
        "iptables-dnat": DnatMode,
        "accel-noflows": lambda: AccelMode(flows=False),
        "accel+redirect-noflows": lambda: AccelMode("redirect", flows=False),
    }
    return [makers[n]() for n in names]
