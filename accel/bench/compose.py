"""`accel bench --compose`: the example mesh on docker-compose, meshaccel vs haproxy sidecars.

Brings up compose/mesh.yml (the apps, the controller, the agent) and then
compose/sidecar.yml (the same apps, a haproxy sidecar each), one at a time, each as its own
compose project, and runs `meshapp bench` in the frontend container against reviews:9080:

  rr      request/response on one connection (latency, transactions per second)
  crr     a new connection per request (each also makes reviews open one to ratings)
  stream  bulk bytes echoed back (throughput)

It prints the median of the repeats side by side. Everything it starts is removed by the
compose project label at the end, even after a failure; the agent's datapath is uninstalled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
VIP_CIDR = "10.96.249.0/24"
WORKLOADS = ("rr", "crr", "stream")
MODES = ("accel", "sidecar")


class BenchError(RuntimeError):
    pass


def _run(cmd: list[str], timeout: float = 300, check: bool = True,
         env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode:
        raise BenchError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def _cgroup2() -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if len(f) > 2 and f[2] == "cgroup2":
            return f[1]
    raise BenchError("no cgroup2 hierarchy is mounted")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_prerequisites() -> list[str]:
    missing = []
    if not COMPOSE_DIR.is_dir():
        missing.append(f"the compose/ directory of a source checkout ({COMPOSE_DIR})")
    if not shutil.which("docker-compose"):
        missing.append("docker-compose")
    if not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True,
                                                     timeout=30).returncode:
        missing.append("a running dockerd")
    return missing


def remove_project(project: str) -> None:
    label = f"label=com.docker.compose.project={project}"
    ids = _run(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split()
    if ids:
        _run(["docker", "rm", "-f", "-v", *ids], check=False)
    nets = _run(["docker", "network", "ls", "-q", "--filter", label], check=False).stdout.split()
    if nets:
        _run(["docker", "network", "rm", *nets], check=False)


@contextmanager
def project(mode: str, workdir: Path, say):
    """One compose project up and serving; yields the frontend container's name."""
    from accel.compose_hosts import render_override

    name = f"accelbench{secrets.token_hex(3)}{mode}"
    quiet = workdir / f"{mode}-bench.yml"  # the frontend idles: the benchmark is the client
    quiet.write_text(yaml.safe_dump({"version": "2.4", "services": {
        "frontend": {"command": ["sleep", "infinity"]}}}))
    env = dict(os.environ)
    pin_dir = f"/sys/fs/bpf/accel-bench-{name}"
    if mode == "accel":
        vips = workdir / "vips.yml"
        vips.write_text(render_override([COMPOSE_DIR / "mesh.yml"], VIP_CIDR))
        files = [COMPOSE_DIR / "mesh.yml", vips]
        probe = _run(["docker", "run", "--rm", "--privileged", "--network", "none",
                      "meshaccel/app:local", "true"], check=False)
        if probe.returncode:
            files.append(COMPOSE_DIR / "agent-caps.yml")
        env.update(ACCEL_VIP_CIDR=VIP_CIDR, ACCEL_XDS_PORT=str(_free_port()),
                   ACCEL_PIN_DIR=pin_dir, ACCEL_CGROUP2=_cgroup2())
    else:
        files = [COMPOSE_DIR / "sidecar.yml"]
    files.append(quiet)
    cmd = ["docker-compose", "-p", name] + [a for f in files for a in ("-f", str(f))]
    route = mode == "accel" and subprocess.run(
        ["ip", "route", "add", "unreachable", VIP_CIDR], capture_output=True).returncode == 0
    try:
        say(f"{mode}: docker-compose up ({name})")
        _run([*cmd, "up", "-d"], env=env)
        frontend = f"{name}_frontend_1"
        _wait_serving(frontend)
        yield frontend
    finally:
        _run([*cmd, "down", "-v", "--remove-orphans", "-t", "5"], check=False, env=env)
        remove_project(name)
        if mode == "accel":
            accel = shutil.which("accel") or str(Path(sys.executable).with_name("accel"))
            _run([accel, "uninstall", "--pin-dir", pin_dir], check=False)
        if route:
            subprocess.run(["ip", "route", "del", "unreachable", VIP_CIDR], capture_output=True)


def _wait_serving(frontend: str, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        r = _run(["docker", "exec", frontend, "meshapp", "call", "reviews:9080", "--count", "30",
                  "--bytes", "16", "--timeout", "1"], check=False, timeout=60)
        try:
            report = json.loads(r.stdout.strip().splitlines()[-1])
            if not report["errors"] and len(report["replicas"]) == 3:
                return
            last = str(report["errors"][:1] or report["replicas"])
        except (ValueError, IndexError, KeyError):
            last = r.stderr.strip()[-300:]
        time.sleep(1)
    raise BenchError(f"{frontend}: reviews did not answer from all 3 replicas ({last})")


def measure(frontend: str, workload: str, seconds: float) -> dict:
    r = _run(["docker", "exec", frontend, "meshapp", "bench", "reviews:9080", "--mode", workload,
              "--duration", str(seconds)], timeout=seconds + 120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(seconds: float = 2.0, repeats: int = 3, workloads: tuple[str, ...] = WORKLOADS,
        modes: tuple[str, ...] = MODES, quiet: bool = False) -> dict:
    def say(msg: str) -> None:
        if not quiet:
            print(f"[bench --compose] {msg}", file=sys.stderr, flush=True)

    say("building images (compose/build-images.sh)")
    _run([str(COMPOSE_DIR / "build-images.sh")], timeout=1200)
    results: dict[str, dict[str, list[dict]]] = {m: {w: [] for w in workloads} for m in modes}
    with tempfile.TemporaryDirectory(prefix="accel-bench-compose-") as tmp:
        for mode in modes:
            with project(mode, Path(tmp), say) as frontend:
                for i in range(repeats):
                    for w in workloads:
                        results[mode][w].append(measure(frontend, w, seconds))
                    say(f"{mode}: round {i + 1}/{repeats} done")
    return {"seconds": seconds, "repeats": repeats, "results": results}


def summary_rows(data: dict) -> list[list[str]]:
    res = data["results"]
    modes = list(res)
    rows = []
    metrics = {"rr": [("ops_per_s", "trans/s"), ("p50_us", "p50 us"), ("p99_us", "p99 us")],
               "crr": [("ops_per_s", "conn/s"), ("p50_us", "p50 us"), ("p99_us", "p99 us")],
               "stream": [("mbit_per_s", "Mbit/s")]}
    workloads = next(iter(res.values())).keys() if res else []
    for w in workloads:
        for key, label in metrics[w]:
            med = [statistics.median(r[key] for r in res[m][w]) if res[m][w] else 0.0
                   for m in modes]
            ratio = f"{med[0] / med[1]:.2f}x" if len(med) == 2 and med[1] else "-"
            rows.append([w, label, *(f"{v:,.0f}" for v in med), ratio])
    return rows


def main(seconds: float | None, repeats: int | None, workloads: str | None, quick: bool,
         json_path: str | None, quiet: bool) -> int:
    from accel.commands.common import fail, print_table

    wl = tuple(workloads.split(",")) if workloads else WORKLOADS
    bad = [w for w in wl if w not in WORKLOADS]
    if bad:
        return fail(f"bench --compose: unknown workload {', '.join(bad)} "
                    f"(choose from {', '.join(WORKLOADS)})", code=2)
    missing = missing_prerequisites()
    if missing:
        return fail("bench --compose: missing " + "; ".join(missing)
                    + " (deploy/setup.sh --docker installs and starts them)")
    try:
        data = run(seconds or (1.0 if quick else 2.0), repeats or (1 if quick else 3), wl,
                   quiet=quiet)
    except (BenchError, subprocess.TimeoutExpired) as e:
        return fail(f"bench --compose: {e}")
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2))
    print_table(summary_rows(data), ["workload", "metric", *data["results"], "accel/sidecar"])
    return 0
