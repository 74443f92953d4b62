"""gRPC's own proxyless xDS client resolves xds:///<service> through the controller.

The client runs in a subprocess: gRPC reads its xDS bootstrap once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from accel.sources.file import FileSource
from accel.xds.server import ControllerServer

CONTROLLER = 18190
BACKENDS = {"a": 18191, "b": 18192}

CLIENT = textwrap.dedent("""
    import collections, json, os, sys, time
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch = grpc.insecure_channel("xds:///reviews")
    who = ch.unary_unary("/hx.Who/Name")
    # Phase 1: balanced over both endpoints.
    seen = collections.Counter(who(b"", timeout=10).decode() for _ in range(20))
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    print(json.dumps({"phase": 1, "seen": seen, "health": status.status}), flush=True)
    sys.stdin.readline()
    # Phase 2: after the mesh.yaml edit, only `a` may answer.
    deadline, streak = time.monotonic() + 10, 0
    while streak < 20 and time.monotonic() < deadline:
        streak = streak + 1 if who(b"", timeout=5).decode() == "a" else 0
    print(json.dumps({"phase": 2, "streak": streak}), flush=True)
""")


def mesh(healthy_b: bool) -> str:
    return textwrap.dedent(f"""
        services:
          - name: reviews
            vip: 10.96.0.10
            port: 9080
            endpoints:
              - {{address: 127.0.0.1, port: {BACKENDS['a']}}}
              - {{address: 127.0.0.1, port: {BACKENDS['b']}, healthy: {str(healthy_b).lower()}}}
    """)


def backend(name: str, port: int) -> grpc.Server:
    s = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("hx.Who", {
        "Name": grpc.unary_unary_rpc_method_handler(lambda req, ctx: name.encode())}),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), s)
    assert s.add_insecure_port(f"127.0.0.1:{port}")
    s.start()
    return s


def test_grpc_proxyless_client_resolves_and_follows_changes(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh(True))
    servers = [backend(n, p) for n, p in BACKENDS.items()]
    ctl = ControllerServer(FileSource(path, poll_interval=0.05), f"127.0.0.1:{CONTROLLER}")
    ctl.start()
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=json.dumps({
        "xds_servers": [{"server_uri": f"127.0.0.1:{CONTROLLER}",
                         "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": "hx-grpc", "cluster": "hx", "locality": {"zone": "z"}}}))
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.wait(timeout=5) is not None else ""
        phase1 = json.loads(line)
        assert set(phase1["seen"]) == {"a", "b"} and phase1["health"] == 1  # SERVING
        assert [c["node_id"] for c in ctl.ads.clients()] == ["hx-grpc"]
        path.write_text(mesh(False))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        phase2 = json.loads(proc.stdout.readline())
        assert phase2["streak"] >= 20
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        # gRPC ACKed every type it asked for (no NACK: the resources pass its validation).
        types = ctl.ads.clients()[0]["types"] if ctl.ads.clients() else {}
        assert ctl.ads.nacks == 0 and all(s["nack_error"] is None for s in types.values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ctl.stop()
        for s in servers:
            s.stop(0)
