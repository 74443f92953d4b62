"""`accel bench xds`: the xDS path at scale, controller to kernel maps (a benchmark, not a test).

1. push: a ControllerServer (its own process) pushes S services x E endpoints to an agent
   (`accel agent --xds`, its own process, so its RSS is its own): seconds from the push until
   the agent ACKs the last resource type (an ACK follows the map writes), then the pinned
   kernel maps are read back and must hold every service, slot and endpoint address.
2. change: an Agent + Datapath + XdsClient in this process, on the same controller: one
   endpoint of one service changes, N times. Latency is from the DiscoveryResponse reaching
   the client (XdsClient.last_received) until Runtime.apply returned, i.e. the maps are written;
   p50/p99 against the 10 ms target. The maps are read back and checked at the end.

--delta: the agent and the in-process client speak incremental (Delta) xDS instead of
state of the world.

--shape istio: the controller serves what a sidecar of a large Istio mesh gets from istiod
(accel/xds/shapes/istio.py: a protocol-sniffing listener per ClusterIP:port, mTLS EDS
clusters, Istio's filters) instead of meshaccel's own resources; start and push phases.

Names: cgroup accel-hp-<hex>, pin dirs /sys/fs/bpf/hp-<hex>-*, a TCP port in 18500-18599;
all removed at the end, also after a failure.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import multiprocessing
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from accel.model import Endpoint, Service, ServiceTable
from accel.sources.memory import MemorySource

TARGET_P99_MS = 10.0
PORTS = range(18500, 18600)
REPO = Path(__file__).resolve().parents[2]
# Toggling this bit moves an endpoint between 10.128.0.0/11 (make_table's) and 10.160.0.0/11.
TOGGLE = 1 << 21


def make_table(services: int, endpoints: int) -> ServiceTable:
    """S services at 10.96.0.0+i:80, E endpoints each at 10.128.0.0+..., weights 1..3."""
    vip0 = int(ipaddress.IPv4Address("10.96.0.0"))
    ep0 = int(ipaddress.IPv4Address("10.128.0.0"))
    return ServiceTable(tuple(
        Service(f"svc-{i}", ipaddress.IPv4Address(vip0 + i), 80, "TCP", tuple(
            Endpoint(ipaddress.IPv4Address(ep0 + i * endpoints + j), 8080, 1 + j % 3)
            for j in range(endpoints)))
        for i in range(services)))


def one_endpoint_changed(svc: Service, j: int) -> Service:
    """The service with endpoint j moved to another address (and back, the next time)."""
    eps = list(svc.endpoints)
    eps[j] = replace(eps[j], address=ipaddress.IPv4Address(int(eps[j].address) ^ TOGGLE))
    return replace(svc, endpoints=tuple(eps))


# ---- the controller, in a process of its own ------------------------------------------------


SHAPES = ("mesh", "istio")


def make_shape(shape: str, services: int, endpoints: int) -> ServiceTable:
    """The table a shape's resources mean (what the maps must hold after the push)."""
    if shape == "mesh":
        return make_table(services, endpoints)
    from accel.xds.shapes.istio import sniffed_mesh

    _, want = sniffed_mesh(services, endpoints)
    return ServiceTable(tuple(Service(name, vip, port, endpoints=tuple(
        Endpoint(ip, port) for ip in eps)) for name, (vip, port, eps) in want.items()))


def _controller(conn, listen: str, services: int, endpoints: int, shape: str) -> None:
    """Serve an empty table, then what the parent sends: ("push",) the big table (or the
    shape's resources), ("upsert", service) one changed service, ("acks",) the ACKed
    versions per stream, ("stop",)."""
    from accel.xds.kinds import PUSH_ORDER
    from accel.xds.server import ControllerServer
    from accel.xds.shapes.istio import sniffed_mesh

    table = make_table(services, endpoints)
    source = MemorySource()
    srv = ControllerServer(source, listen).start()
    conn.send(("ok", srv.port))
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "push":
                start = time.monotonic()
                if shape == "istio":
                    res = sniffed_mesh(services, endpoints)[0]
                    srv.publish_resources({t: res.of(t) for t in PUSH_ORDER})
                else:
                    source.push(table)
                conn.send(("ok", start, time.monotonic()))
            elif cmd[0] == "upsert":
                table = table.derive([cmd[1]])
                source.push(table)
                conn.send(("ok",))
            elif cmd[0] == "acks":
                conn.send(("ok", [{t.rsplit(".", 1)[-1]: v["acked_version"]
                                   for t, v in c["types"].items()}
                                  for c in srv.ads.clients() if c["node_id"] == cmd[1]]))
            else:
                break
    finally:
        srv.stop(0)
        conn.close()


class Controller:
    def __init__(self, services: int, endpoints: int, shape: str = "mesh"):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs gRPC
        self.conn, child = ctx.Pipe()
        port = _free_port()
        self.proc = ctx.Process(target=_controller, name="hp-controller", daemon=True,
                                args=(child, f"127.0.0.1:{port}", services, endpoints, shape))
        self.proc.start()
        self.port = self.call(("start",), timeout=120, first=True)[1]

    def call(self, cmd: tuple, timeout: float = 120, first: bool = False) -> tuple:
        if not first:
            self.conn.send(cmd)
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise RuntimeError(f"the controller process exited ({self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"controller did not answer {cmd[0]} within {timeout}s")
        return self.conn.recv()

    def wait_acked(self, node: str, version: str, types: tuple[str, ...],
                   timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            acks = self.call(("acks", node))[1]
            if acks and all(acks[0].get(t) == version for t in types):
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {version} not ACKed by {node} within {timeout}s: "
                                   f"{acks}")
            time.sleep(0.02)

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port in {PORTS.start}-{PORTS.stop - 1}")


# ---- reading pinned maps back ---------------------------------------------------------------


def pinned_entries(path: str) -> int:
    """Entries of a pinned map, counted key by key in the kernel (never unpins it)."""
    from accel.kernel.maps import Map

    with Map.open(path) as m:
        return len(m)


def expected_entries(table: ServiceTable) -> dict[str, int]:
    from accel.datapath.maps import mesh_prefixes
    from accel.datapath.services import service_slots

    return {"services": len(table.services),
            "slots": sum(len(service_slots(s)) for s in table.services),
            "mesh_nets": len(mesh_prefixes(table))}


def capacities_for(table: ServiceTable):
    from accel.datapath.datapath import Capacities

    need = expected_entries(table)
    d = Capacities()
    return Capacities(services=max(d.services, need["services"] + 16),
                      slots=max(d.slots, 2 * need["slots"]),
                      mesh_nets=max(d.mesh_nets, 2 * need["mesh_nets"]))


# ---- the two phases -------------------------------------------------------------------------


def _rss_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def push_phase(ctl: Controller, table: ServiceTable, cgroup: Path, pin_dir: str, node: str,
               say: Callable[[str], None], delta: bool = False) -> dict[str, Any]:
    caps = capacities_for(table)
    cmd = [sys.executable, "-m", "accel.cli", "agent", "--xds", f"127.0.0.1:{ctl.port}",
           "--node-id", node, "--pin-dir", pin_dir, "--cgroup", str(cgroup), "--api-socket", "",
           "--capacity", f"services={caps.services},slots={caps.slots},"
           f"mesh_nets={caps.mesh_nets}"] + (["--xds-delta"] if delta else [])
    log = tempfile.TemporaryFile("w+")  # the agent's output, shown if the phase fails
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        say("push: agent starting (BPF compile) ...")
        ctl.wait_acked(node, "1", ("Cluster", "Listener"), timeout=180)
        before = _rss_mb(agent.pid)
        say(f"push: {len(table.services)} services to the agent ...")
        _, start, published = ctl.call(("push",), timeout=600)
        acked = ctl.wait_acked(node, "2", ("Cluster", "ClusterLoadAssignment", "Listener"),
                               timeout=600)
        after = _rss_mb(agent.pid)
        got = {name: pinned_entries(f"{pin_dir}/accel_{name}")
               for name in ("services", "slots", "mesh_nets")}
        want = expected_entries(table)
        return {
            "controller_snapshot_s": round(published - start, 3),
            "published_to_acked_s": round(acked - published, 3),
            "push_to_maps_complete_s": round(acked - start, 3),
            "agent_rss_mb_empty": before.get("VmRSS"),
            "agent_rss_mb": after.get("VmRSS"),
            "agent_rss_peak_mb": after.get("VmHWM"),
            "maps": got,
            "maps_expected": want,
            "maps_complete": got == want,
        }
    except Exception as e:
        log.seek(0)
        raise RuntimeError(f"{e}; the agent said:\n{log.read()[-2000:]}") from e
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
        log.close()
        shutil.rmtree(pin_dir, ignore_errors=True)


def _percentiles(ms: list[float], prefix: str = "") -> dict[str, float]:
    s = sorted(ms)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 3)

    return {f"{prefix}p50_ms": pct(50), f"{prefix}p90_ms": pct(90), f"{prefix}p99_ms": pct(99),
            f"{prefix}max_ms": round(s[-1], 3), f"{prefix}mean_ms": round(statistics.fmean(s), 3)}


def change_phase(ctl: Controller, table: ServiceTable, cgroup: Path, pin_dir: str, node: str,
                 changes: int, seed: int, say: Callable[[str], None],
                 delta: bool = False) -> dict[str, Any]:
    from accel.datapath.datapath import Datapath
    from accel.runtime import Runtime
    from accel.xds.client import XdsClient

    # One INFO line per applied table would flood the terminal (and the agent's is tested
    # by the push phase); the timing includes the logger's level check only.
    logging.getLogger("accel.agent").setLevel(logging.WARNING)
    dp = Datapath(pin_dir=pin_dir, cgroup_path=str(cgroup),
                  capacities=capacities_for(table)).start()
    agent = Runtime(datapath=dp)
    records: list[tuple[float, float, float]] = []
    applied = threading.Condition()
    box: dict[str, XdsClient] = {}

    def on_update(t: ServiceTable) -> None:
        start = time.perf_counter()
        agent.apply(t)
        done = time.perf_counter()
        with applied:
            records.append((box["client"].last_received, start, done))
            applied.notify_all()

    def wait_records(n: int, timeout: float) -> None:
        with applied:
            if not applied.wait_for(lambda: len(records) >= n, timeout):
                raise TimeoutError(f"the agent applied {len(records)} of {n} tables "
                                   f"within {timeout}s")

    t0 = time.perf_counter()
    client = box["client"] = XdsClient(f"127.0.0.1:{ctl.port}", node, on_update,
                                       backoff_initial=0.1, backoff_max=1.0, delta=delta)
    client.start()
    try:
        say(f"change: in-process agent loads {len(table.services)} services ...")
        wait_records(1, 600)
        initial = records[-1][2] - t0
        gc.collect()
        rng = random.Random(seed)
        expected = table
        gcs = sum(s["collections"] for s in gc.get_stats())
        say(f"change: {changes} one-endpoint changes ...")
        for k in range(changes):
            svc = expected.services[rng.randrange(len(expected.services))]
            new = one_endpoint_changed(svc, rng.randrange(len(svc.endpoints)))
            expected = expected.derive([new])
            ctl.call(("upsert", new))
            wait_records(2 + k, 30)
        gcs = sum(s["collections"] for s in gc.get_stats()) - gcs
        lat = [(done - recv) * 1e3 for recv, _, done in records[1:]]
        client_ms = [(start - recv) * 1e3 for recv, start, _ in records[1:]]
        agent_ms = [(done - start) * 1e3 for _, start, done in records[1:]]
        say("change: reading the maps back ...")
        verified = dp.dump() == _expected_dump(expected)
        out: dict[str, Any] = {"initial_load_s": round(initial, 3), "changes": len(lat),
                               **_percentiles(lat), **_percentiles(client_ms, "client_"),
                               **_percentiles(agent_ms, "agent_"),
                               "gc_collections": gcs, "target_p99_ms": TARGET_P99_MS}
        out["target_met"] = out["p99_ms"] <= TARGET_P99_MS
        out["maps_verified"] = verified
        return out
    finally:
        client.stop()
        dp.close()


def _expected_dump(table: ServiceTable) -> dict[str, Any]:
    """Datapath.dump()'s form, from the table's definition."""
    from accel.datapath.maps import mesh_prefixes
    from accel.datapath.services import weighted_slots

    return {
        "mesh_nets": sorted((str(a), p) for a, p in mesh_prefixes(table)),
        "services": {f"{s.vip}:{s.port}/{s.protocol}": sorted(
            (str(a), p) for a, p in weighted_slots(s.endpoints))
            for s in sorted(table.services, key=lambda s: str(s.key))},
    }


def start_phase(cgroup: Path, pin_dir: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Time to ready of `accel agent --config` (one service): a cold start (compiles), then,
    after SIGTERM --keep, a warm restart over the kept pins (reuses the programs); the
    agent's idle RSS after each. Wall time from spawn to `ready` over its API, and the
    agent's own seconds_to_ready (from its start(), without the interpreter's start-up)."""
    from accel.api import client

    run_dir = Path(tempfile.mkdtemp(prefix="accel-hp-start-"))
    cfg = run_dir / "mesh.yaml"
    cfg.write_text("services:\n  - {name: one, vip: 10.96.0.1, port: 80, endpoints: "
                   "[{address: 10.200.0.1, port: 8080}]}\n")
    sock = str(run_dir / "agent.sock")
    out: dict[str, Any] = {}
    try:
        for phase, extra in (("cold", ["--keep"]), ("warm", [])):
            t0 = time.monotonic()
            agent = subprocess.Popen(
                [sys.executable, "-m", "accel.cli", "agent", "--config", str(cfg), "--pin-dir",
                 pin_dir, "--cgroup", str(cgroup), "--api-socket", sock, *extra],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            try:
                st = client.wait_ready(sock, 180, alive=lambda a=agent: a.poll() is None)
                wall = time.monotonic() - t0
                time.sleep(1.0)  # settled: API threads up, first scrape-free second
                out[phase] = {"spawn_to_ready_s": round(wall, 3),
                              "agent_seconds_to_ready": st["seconds_to_ready"],
                              "compiled": st["compiled"],
                              "rss_mb_idle": _rss_mb(agent.pid).get("VmRSS")}
                say(f"start: {phase} ready in {wall:.2f}s "
                    f"({'compiled' if st['compiled'] else 'pins reused'}), "
                    f"RSS {out[phase]['rss_mb_idle']} MB")
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(60)
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def run(services: int = 10_000, endpoints: int = 10, changes: int = 200, seed: int = 1,
        say: Callable[[str], None] = lambda m: None, delta: bool = False,
        shape: str = "mesh") -> dict[str, Any]:
    from accel.datapath import cgroup as cg

    if services < 1 or endpoints < 1 or changes < 1:
        raise ValueError("--services, --endpoints and --changes must be >= 1")
    if shape not in SHAPES:
        raise ValueError(f"--shape: one of {', '.join(SHAPES)}")
    tag = secrets.token_hex(3)
    table = make_shape(shape, services, endpoints)
    group = cg.cgroup2_mount() / f"accel-hp-{tag}"
    group.mkdir()
    ctl = None
    try:
        start = start_phase(group, f"/sys/fs/bpf/hp-{tag}-s", say)
        ctl = Controller(services, endpoints, shape)
        push = push_phase(ctl, table, group, f"/sys/fs/bpf/hp-{tag}-a", f"hp-{tag}-a", say,
                          delta)
        # One-endpoint changes are timed on meshaccel's own resources (the client's work
        # per change is the same whatever shape the services came in).
        change = change_phase(ctl, table, group, f"/sys/fs/bpf/hp-{tag}-b", f"hp-{tag}-b",
                              changes, seed, say, delta) if shape == "mesh" else None
    finally:
        if ctl is not None:
            ctl.close()
        for name in ("a", "b", "s"):
            shutil.rmtree(f"/sys/fs/bpf/hp-{tag}-{name}", ignore_errors=True)
        group.rmdir()
    return {
        "env": {"kernel": platform.release(), "python": platform.python_version(),
                "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                "services": services, "endpoints_per_service": endpoints, "seed": seed,
                "xds": "delta" if delta else "sotw", "shape": shape,
                "placement": "unpinned: controller and agent processes as the scheduler puts "
                             "them"},
        "start": start,
        "push": push,
        "change": change,
    }
