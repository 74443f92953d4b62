"""A mesh connection behaves as plain TCP: every case of tests/sockcases.py runs on plain
TCP between two lab pods and then through a service VIP with the agent's programs loaded,
and the two results must be the same. In the default mode (`fastpath: route`) that holds
for every case; in `fastpath: redirect` for every case but the kernel's known gaps, which
README lists (and this test keeps honest: a gap that closes shows up as a failure)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from accel.bench.workloads import wait_listening
from accel.model import Endpoint, Service, ServiceTable
from tests import sockcases
from tests.sockcases import CASES, REDIRECT_GAPS, Result, fill
from tests.traffic import EchoServer

VIP4, VIP6 = "10.96.0.50", "fd00:96::50"
BASE_PORT = 8100


def mesh_table(server, family: int, mode: str, ports) -> ServiceTable:
    vip = VIP4 if family == socket.AF_INET else VIP6
    ip = server.ip if family == socket.AF_INET else server.ip6
    return ServiceTable(tuple(
        Service(f"case-{p}", vip, p, endpoints=(Endpoint(ip, p),), fastpath=mode)
        for p in ports))


def run_case(case, client, server, host: str, port: int, family: int) -> Result:
    lst = server.socket(family)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((str(server.ip) if family == socket.AF_INET else "::", port))
    lst.listen(8)
    lst.settimeout(5)
    cl = client.socket(family)
    cl.settimeout(5)
    cl.connect((host, port))
    cl.settimeout(None)
    sv, _ = lst.accept()
    sv.settimeout(None)
    lst.close()
    out: list[Result] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            out.append(case((cl, sv)))
        except BaseException as e:  # noqa: BLE001 - reported as the case's result
            failure.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    for s in (cl, sv):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
    if t.is_alive():
        return {"hung": True}
    if failure:
        return {"raised": f"{type(failure[0]).__name__}: {failure[0]}"}
    return out[0]


def run_all(client, server, host: str, family: int) -> dict[str, Result]:
    return {name: run_case(case, client, server, host, BASE_PORT + i, family)
            for i, (name, case) in enumerate(CASES.items())}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("mode", ["route", "redirect"])
def test_every_socket_call_as_on_tcp(lab, datapath, mode, family):
    client, server = lab.pods
    direct = str(server.ip) if family == socket.AF_INET else str(server.ip6)
    datapath.apply(ServiceTable())  # the pods are no mesh addresses: plain TCP
    plain = run_all(client, server, direct, family)
    ports = [BASE_PORT + i for i in range(len(CASES))]
    datapath.apply(mesh_table(server, family, mode, ports))
    before = datapath.counters()
    mesh = run_all(client, server, VIP4 if family == socket.AF_INET else VIP6, family)
    after = datapath.counters()

    def delta(name: str) -> int:
        return after[name] - before[name]

    n = len(CASES)
    assert delta("connect_balanced") == n  # every case went through its VIP
    if mode == "route":
        assert delta("sockhash_inserts") == 0 and delta("socks_routed") == 2 * n
    else:
        assert delta("sockhash_inserts") == 2 * n and delta("msg_redirects") > n
    for name, result in plain.items():
        assert "hung" not in result and "raised" not in result, (name, result)
    differ = {name for name in CASES if plain[name] != mesh[name]}
    detail = {name: {"tcp": plain[name], "mesh": mesh[name]} for name in sorted(differ)}
    if mode == "route":
        assert not differ, detail
    else:
        assert differ <= set(REDIRECT_GAPS), {k: detail[k] for k in differ - set(REDIRECT_GAPS)}


def test_route_is_the_default(tmp_path):
    """A service that names no fast path, and a table that names none, take `route`."""
    from accel import config

    t = config.load_text("services: [{name: a, vip: 10.96.0.1, port: 80, "
                         "endpoints: [{address: 10.0.0.1, port: 80}]}]")
    assert t.fastpath == "route" and t.services[0].fastpath == "route"


# ---- the cases, counted as users met them ------------------------------------------

def vip_table(server, mode: str, port: int = 8080) -> ServiceTable:
    return ServiceTable((Service("echo", VIP4, 80, endpoints=(Endpoint(server.ip, port),),
                                 fastpath=mode),))


def vip_pair(client, server, rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(client end, server end) of one connection through VIP4:80 to server:8080."""
    lst = server.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    lst.bind((str(server.ip), 8080))
    lst.listen(1)
    cl = client.socket()
    cl.connect((VIP4, 80))
    sv, _ = lst.accept()
    lst.close()
    return cl, sv


@pytest.mark.parametrize("mode", ["route", "redirect"])
def test_receiver_that_never_reads_stops_the_sender(lab, datapath, mode):
    """TCP stops a non-blocking sender once the receiver's buffer is full (0.8 MB here);
    the kernel's redirect alone queued 1.5 GB. Both modes must stop it within 16 MB, with
    the receiver's default buffer and with a small SO_RCVBUF, and then deliver every byte."""
    client, server = lab.pods
    datapath.apply(vip_table(server, mode))
    for rcvbuf in (None, 65536):
        cl, sv = vip_pair(client, server, rcvbuf)
        try:
            cl.setblocking(False)
            before = datapath.counters()
            total = fill(cl, 64 << 20)
            assert total < 16 << 20, f"{mode}, rcvbuf {rcvbuf}: sender queued {total} bytes"
            if mode == "redirect":
                c = datapath.counters()
                assert c["msg_redirects"] > before["msg_redirects"]  # it did start redirected
                assert c["msg_backpressure"] == before["msg_backpressure"] + 1
            got = 0
            sv.settimeout(5)
            cl.setblocking(True)
            cl.shutdown(socket.SHUT_WR)
            while True:
                b = sv.recv(1 << 20)
                if not b:
                    break
                got += len(b)
            assert got == total
        finally:
            cl.close()
            sv.close()


def test_blocking_readers_never_see_eagain(lab, datapath):
    """200 connections through the VIP in the default mode, each read with a blocking recv()
    (no timeout): not one EAGAIN, in Python and in C."""
    client, server = lab.pods
    datapath.apply(vip_table(server, "route"))
    eagain = 0
    with EchoServer(server, 8080):
        for _ in range(200):
            s = client.socket()
            s.connect((VIP4, 80))
            s.settimeout(None)
            s.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                try:
                    b = s.recv(100)
                except BlockingIOError:
                    eagain += 1
                    break
                got += b
            s.close()
        out = client.run([str(c_tool()), "client", VIP4, "80", "200", "1000"],
                         timeout=60).stdout
    assert eagain == 0
    assert out.split() == ["ok=200", "eagain=0", "errors=0"], out


def test_splice_reader_and_splicing_proxy_get_every_byte(lab_factory, datapath, tmp_path):
    """A server reading with splice() (C), and haproxy splicing in TCP mode in front of a
    server, get every byte through the VIP in the default mode."""
    lab = lab_factory(3)
    client, proxy, server = lab.pods
    datapath.apply(ServiceTable((
        Service("splice", VIP4, 80, endpoints=(Endpoint(server.ip, 9000),)),
        Service("proxied", VIP4, 81, endpoints=(Endpoint(proxy.ip, 9001),)),
    )))
    data = sockcases.payload(3 << 20, 9)
    for _ in range(3):
        srv = server.popen([str(c_tool()), "splice-server", str(server.ip), "9000"],
                           stdout=subprocess.PIPE, text=True)
        try:
            wait_listening(server, 9000, [srv])
            s = client.socket()
            s.connect((VIP4, 80))
            s.sendall(data)
            s.close()
            out, _ = srv.communicate(timeout=30)
        finally:
            srv.kill()
            srv.wait()
        assert out.split() == [f"bytes={len(data)}", sockcases.digest(data), "-"], out
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
  maxconn 100
defaults
  mode tcp
  option splice-auto
  option splice-request
  option splice-response
  timeout connect 5s
  timeout client 30s
  timeout server 30s
listen fwd
  bind {proxy.ip}:9001
  server s1 {server.ip}:9002
""")
    hap = proxy.popen(["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    try:
        with EchoServer(server, 9002):
            wait_listening(proxy, 9001, [hap])
            for _ in range(3):
                s = client.socket()
                s.settimeout(30)
                s.connect((VIP4, 81))
                t = sockcases.sender(s, data)
                got, err = sockcases.read_to_eof(s, 1 << 20)
                t.join(10)
                s.close()
                assert err == "" and sockcases.digest(got) == sockcases.digest(data)
    finally:
        hap.terminate()
        hap.wait(10)


_TOOL = Path(__file__).with_name("csock.c")


def c_tool() -> Path:
    """tests/csock.c, built once per run."""
    out = Path("/tmp") / f"accel-csock-{_TOOL.stat().st_mtime_ns}"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-o", str(tmp), str(_TOOL)], check=True)
        tmp.replace(out)
    return out


def test_paused_redirect_resumes_in_order(lab, datapath):
    """A redirected connection whose receiver stops reading pauses on TCP (the sender is
    held as on TCP); once the receiver has read every byte, it is handed socket to socket
    again, and the receiver reads one stream in the order it was sent, three times over."""
    client, server = lab.pods
    datapath.apply(vip_table(server, "redirect"))
    cl, sv = vip_pair(client, server)
    try:
        sv.settimeout(10)
        sent = bytearray()
        before = datapath.counters()
        for rnd in range(3):
            cl.setblocking(False)
            chunk, n = sockcases.payload(65536, rnd), 0
            while True:  # the receiver does not read: fill until the sender is held
                try:
                    n = cl.send(chunk)
                except BlockingIOError:
                    break
                sent += chunk[:n]
                assert len(sent) < 64 << 20
            cl.setblocking(True)
            got = bytearray()
            while len(got) < len(sent):  # now read everything
                got += sv.recv(1 << 20)
            assert got == sent, f"round {rnd}: stream out of order or short"
            sent.clear()
            # TCP drained (once its last ACK is in): messages go socket to socket again.
            mid, deadline = datapath.counters(), time.time() + 2
            while datapath.counters()["msg_redirects"] == mid["msg_redirects"]:
                assert time.time() < deadline, f"round {rnd}: never resumed"
                cl.sendall(b"after the pause")
                assert sv.recv(100) == b"after the pause"
                time.sleep(0.01)
        after = datapath.counters()
        assert after["msg_backpressure"] - before["msg_backpressure"] == 3
        assert after["msg_resumed"] - before["msg_resumed"] == 3
    finally:
        cl.close()
        sv.close()
