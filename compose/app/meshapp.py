#!/usr/bin/env python3
"""The example mesh's app: a TCP service that says who it is, then echoes.

Every connection starts with one greeting line from the server, "<service>/<hostname>" (and
" > <upstream's greeting>" when it has an upstream), then the server echoes every byte back.
That greeting is how a client, a test or a benchmark tells which replica it reached.

  meshapp serve --name reviews --port 9080 [--upstream ratings:9090]
  meshapp check HOST:PORT                       health check: exit 0 if it greets
  meshapp call HOST:PORT [--count N] [--bytes B]   N connections, B bytes echoed each: JSON report
  meshapp hold HOST:PORT --duration S           one long connection, a round trip every --interval
  meshapp bench HOST:PORT --mode rr|crr|stream --duration S     JSON: rate, latency percentiles
  meshapp client HOST:PORT [--interval S]       print a greeting every interval (the demo frontend)

Standard library only: it runs on any image with python3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time

CHUNK = 65536


def parse_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def read_line(sock: socket.socket, limit: int = 4096) -> str:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            raise ConnectionError(f"connection closed before the greeting ended: {bytes(buf)!r}")
        buf += b
        if len(buf) > limit:
            raise ConnectionError("greeting too long")
    return buf[:-1].decode(errors="replace")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = sock.recv(min(CHUNK, n - len(buf)))
        if not b:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} echoed bytes")
        buf += b
    return bytes(buf)


def connect(target: tuple[str, int], timeout: float) -> tuple[socket.socket, str]:
    sock = socket.create_connection(target, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, read_line(sock)


def replica_of(greeting: str) -> str:
    return greeting.split(" > ", 1)[0]


# --- server -------------------------------------------------------------------------------


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = self.server.identity
        if self.server.upstream:
            try:
                up, up_greeting = connect(self.server.upstream, timeout=2)
                up.close()
                greeting += " > " + up_greeting
            except OSError as e:
                greeting += f" > ERR {e}"
        try:
            sock.sendall(greeting.encode() + b"\n")
            while data := sock.recv(CHUNK):
                sock.sendall(data)
        except OSError:
            pass


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, port: int, identity: str, upstream: tuple[str, int] | None):
        self.identity = identity
        self.upstream = upstream
        super().__init__(("0.0.0.0", port), Handler)


def cmd_serve(a: argparse.Namespace) -> int:
    identity = f"{a.name}/{socket.gethostname()}"
    server = Server(a.port, identity, a.upstream)

    def stop() -> None:
        # Like an app draining on SIGTERM: it still accepts for --grace seconds, so whoever
        # still sends it new connections in that time finds out (the mesh should not).
        time.sleep(a.grace)
        server.shutdown()

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop).start())
    print(f"{identity} listening on :{a.port}", flush=True)
    server.serve_forever()
    return 0


# --- clients ------------------------------------------------------------------------------


def cmd_check(a: argparse.Namespace) -> int:
    try:
        sock, _ = connect(a.target, timeout=a.timeout)
        sock.close()
    except OSError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_call(a: argparse.Namespace) -> int:
    payload = os.urandom(a.bytes)
    report: dict = {"ok": 0, "errors": [], "replicas": {}, "bytes": 0, "log": []}
    for i in range(a.count):
        if i and a.interval:
            time.sleep(a.interval)
        started = time.time()  # wall clock: comparable with the caller's events
        try:
            sock, greeting = connect(a.target, timeout=a.timeout)
            with sock:
                sock.sendall(payload)
                if recv_exact(sock, len(payload)) != payload:
                    raise ConnectionError("echoed bytes differ from the bytes sent")
        except OSError as e:
            report["errors"].append(f"{type(e).__name__}: {e}")
            report["log"].append([started, None, str(e)])
            continue
        report["ok"] += 1
        report["bytes"] += len(payload)
        r = replica_of(greeting)
        report["replicas"][r] = report["replicas"].get(r, 0) + 1
        report["log"].append([started, greeting, None])
    if not a.log:
        del report["log"]
    print(json.dumps(report), flush=True)
    return 0 if not report["errors"] else 1


def cmd_hold(a: argparse.Namespace) -> int:
    """One connection kept for --duration: a round trip of --bytes every --interval."""
    report: dict = {"rounds": 0, "errors": [], "replica": None, "bytes": 0}
    try:
        sock, greeting = connect(a.target, timeout=a.timeout)
    except OSError as e:
        report["errors"].append(f"connect: {type(e).__name__}: {e}")
        print(json.dumps(report), flush=True)
        return 1
    report["replica"] = replica_of(greeting)
    print(json.dumps({"connected": report["replica"]}), flush=True)  # lets a caller sync on it
    deadline = time.monotonic() + a.duration
    with sock:
        while time.monotonic() < deadline:
            payload = os.urandom(a.bytes)
            try:
                sock.sendall(payload)
                if recv_exact(sock, len(payload)) != payload:
                    raise ConnectionError("echoed bytes differ from the bytes sent")
            except OSError as e:
                report["errors"].append(f"round {report['rounds']}: {type(e).__name__}: {e}")
                break
            report["rounds"] += 1
            report["bytes"] += len(payload)
            time.sleep(a.interval)
    print(json.dumps(report), flush=True)
    return 0 if not report["errors"] else 1


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e6  # noqa: E731
    return {"p50_us": pick(0.5), "p90_us": pick(0.9), "p99_us": pick(0.99)}


def cmd_bench(a: argparse.Namespace) -> int:
    """rr: request/response on one connection; crr: a new connection per request;
    stream: bulk bytes one way and back (echo), throughput."""
    lat: list[float] = []
    moved = 0
    errors = 0
    end = time.monotonic() + a.duration
    if a.mode == "crr":
        payload = b"x" * a.bytes
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                sock, _ = connect(a.target, timeout=a.timeout)
                with sock:
                    sock.sendall(payload)
                    recv_exact(sock, len(payload))
            except OSError:
                errors += 1
                continue
            lat.append(time.perf_counter() - t)
            moved += len(payload)
    else:
        sock, _ = connect(a.target, timeout=a.timeout)
        size = a.bytes if a.mode == "rr" else max(a.bytes, CHUNK)
        payload = b"x" * size
        with sock:
            while time.monotonic() < end:
                t = time.perf_counter()
                sock.sendall(payload)
                recv_exact(sock, size)
                lat.append(time.perf_counter() - t)
                moved += size
    elapsed = a.duration
    out = {
        "mode": a.mode,
        "ops": len(lat),
        "ops_per_s": len(lat) / elapsed,
        "mbit_per_s": moved * 8 * (2 if a.mode == "stream" else 1) / elapsed / 1e6,
        "errors": errors,
        **percentiles(lat),
    }
    print(json.dumps(out), flush=True)
    return 0


def cmd_client(a: argparse.Namespace) -> int:
    while True:
        try:
            sock, greeting = connect(a.target, timeout=a.timeout)
            sock.close()
            print(greeting, flush=True)
        except OSError as e:
            print(f"ERR {type(e).__name__}: {e}", flush=True)
        time.sleep(a.interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshapp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve")
    s.add_argument("--name", default=os.environ.get("MESHAPP_NAME", "app"))
    s.add_argument("--port", type=int, default=9080)
    s.add_argument("--upstream", type=parse_hostport)
    s.add_argument("--grace", type=float, default=0.0,
                   help="on SIGTERM keep accepting this many seconds before exiting")
    s.set_defaults(func=cmd_serve)

    for name, func in (("check", cmd_check), ("call", cmd_call), ("hold", cmd_hold),
                       ("bench", cmd_bench), ("client", cmd_client)):
        c = sub.add_parser(name)
        c.add_argument("target", type=parse_hostport)
        c.add_argument("--timeout", type=float, default=2.0)
        c.set_defaults(func=func)
        if name in ("call", "hold", "bench"):
            c.add_argument("--bytes", type=int, default=1024 if name != "bench" else 64)
        if name == "call":
            c.add_argument("--count", type=int, default=1)
            c.add_argument("--log", action="store_true",
                           help="also list [start time, greeting, error] per connection")
        if name in ("hold", "bench"):
            c.add_argument("--duration", type=float, default=5.0)
        if name in ("hold", "client", "call"):
            c.add_argument("--interval", type=float,
                           default={"hold": 0.1, "client": 1.0, "call": 0.0}[name])
        if name == "bench":
            c.add_argument("--mode", choices=("rr", "crr", "stream"), default="rr")
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
