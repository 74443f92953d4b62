"""The edge in front of Docker containers on Docker's own bridge (docker0), their veths
exactly as dockerd made them (no GRO, no XDP on the container end): at both hooks (native
XDP, which cannot redirect into them, and tc) the edge enters each container's namespace
with bpf_redirect_peer, replies go back past the host's netfilter (Docker masquerades
its subnet), and an outside client's 200 connections land on both."""

from __future__ import annotations

import collections
import secrets
import shutil
import subprocess

import pytest

pytest.importorskip("bcc")
from pyroute2 import IPRoute

from accel.datapath.edge import EdgeDatapath
from accel.kernel import netdev
from accel.kernel.netns import in_netns
from accel.lab import Outside
from accel.model import Endpoint, Service, ServiceTable
from tests.conftest_docker import docker_api
from tests.test_edge_lab import Client

__all__ = ["docker_api"]  # fixture used below

pytestmark = [pytest.mark.kernel, pytest.mark.docker]

VIP = "10.96.80.1"
NET = "10.204.0"
SERVER = (
    "import socket,threading\n"
    "name=socket.gethostname()\n"
    "s=socket.create_server(('0.0.0.0',8080),backlog=128)\n"
    "def h(c):\n"
    "    f=c.makefile('rb')\n"
    "    for line in f:\n"
    "        c.sendall(f'{name}:{line.decode().strip()}\\n'.encode())\n"
    "    c.close()\n"
    "while True:\n"
    "    c,_=s.accept(); threading.Thread(target=h,args=(c,),daemon=True).start()\n"
)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def untouched(pid: int) -> None:
    def read():
        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
        return netdev.gro_on("eth0"), link.get_attr("IFLA_XDP")
    gro, xdp = in_netns(f"/proc/{pid}/ns/net", read)
    assert gro is False and (xdp is None or not xdp.get_attr("IFLA_XDP_PROG_ID"))


def test_edge_routes_to_containers_on_dockers_bridge(docker_api):
    # The app image only (compose_images would rebuild the shared images from this tree).
    if not docker_api.images(name="meshaccel/app:local"):
        pytest.skip("no meshaccel/app:local image: compose/build-images.sh builds it")
    uid = secrets.token_hex(3)
    ext, iface = f"hd{uid}-ext", f"hd{uid}e"
    names = [f"edge-{uid}-{i}" for i in range(2)]
    pin = f"/sys/fs/bpf/accel-edge-docker-{uid}"
    dp = None
    outside: Outside | None = None
    try:
        for n in names:
            sh("docker", "run", "-d", "--rm", "--name", n, "--hostname", n,
               "meshaccel/app:local", "python3", "-c", SERVER)
        info = {n: sh("docker", "inspect", "-f",
                      "{{.State.Pid}} {{.NetworkSettings.IPAddress}}", n).split() for n in names}
        # The host's own namespace: dockerd turned forwarding on; nothing else changes.
        outside = Outside(ext, iface, NET, forward=False).up()
        assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == "1"
        for pid, _ in info.values():
            untouched(int(pid))

        dp = EdgeDatapath(iface, pin, 16411, max_vips=4)
        table = ServiceTable.of([Service("web", VIP, 80, "TCP", tuple(
            Endpoint(ip, 8080) for _, ip in info.values()), edge=True)])
        for hook, why in (("native", "a pod's veth"), ("tc", "tc hook")):
            assert dp.attach(hook) == hook
            dp.apply(table)
            dp.refresh()
            vias = [b["via"] for v in dp.status()["vips"] for b in v["backends"]]
            assert len(vias) == 2 and all(v.startswith("tc redirect_peer") and why in v
                                          for v in vias), vias
            before = dp.counters()["global"]
            got: collections.Counter = collections.Counter()
            for _ in range(200):
                c = Client(ext, VIP)
                try:
                    got[c.ask()] += 1
                finally:
                    c.close()
            # Fewer than 60 of 200 on one of two equal backends: p < 1e-8.
            assert set(got) == set(names) and min(got.values()) >= 60, (hook, got)
            after = dp.counters()["global"]
            assert after["fwd_peer"] - before["fwd_peer"] >= 600, hook
            assert after["fwd_fallback"] == before["fwd_fallback"], hook
            # Replies left the containers' veths straight for the edge interface: Docker's
            # masquerade rule for 172.17.0.0/16 never saw them (it would have rewritten
            # their source: the connections would have been reset).
            assert after["reply_direct"] - before["reply_direct"] >= 600, hook
            dp.detach()
            for pid, _ in info.values():
                untouched(int(pid))
    finally:
        if dp is not None:
            dp.close()
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
        if outside is not None:
            outside.down()
        subprocess.run(["ip", "link", "del", iface], capture_output=True)
        shutil.rmtree(pin, ignore_errors=True)
