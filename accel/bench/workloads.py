"""The three workloads, each with the field's tool where one exists, and their parsers.

    rr      request/response latency: sockperf ping-pong, 64 B, TCP_NODELAY, full round trips
    stream  throughput: iperf3, one TCP stream, 64 KiB writes
    crr     connection rate: accel-crr (crr.c beside this file, netperf TCP_CRR's loop:
            connect, one 64 B request, one response, close), since netperf is not in Debian main

Every process runs pinned (taskset) in its pod; a run returns one flat dict of figures in
which the fields that do not apply to the workload are None.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accel.lab import Pod

WORKLOADS = ("rr", "stream", "crr")
METRICS = ("p50_us", "p90_us", "p99_us", "p999_us", "gbps", "conn_per_s")
TOOLS = {"rr": "sockperf", "stream": "iperf3", "crr": "accel-crr"}
STREAM_WRITE = 65536
CACHE_DIR = Path(os.environ.get("ACCEL_CACHE_DIR", "/var/cache/accel"))
CRR_SOURCE = Path(__file__).with_name("crr.c")


class WorkloadError(RuntimeError):
    """A tool failed or printed nothing we can read: the message carries its output."""


def empty() -> dict[str, Any]:
    return dict.fromkeys(METRICS)


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


# ---- the crr tool ----------------------------------------------------------------------------


def crr_binary() -> Path:
    """accel-crr compiled once per source version into the cache directory."""
    digest = hashlib.sha256(CRR_SOURCE.read_bytes()).hexdigest()[:12]
    target = CACHE_DIR / f"accel-crr-{digest}"
    if target.exists():
        return target
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise WorkloadError("no C compiler (cc) to build the crr client: apt-get install gcc")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    r = subprocess.run([cc, "-O2", "-o", str(tmp), str(CRR_SOURCE)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise WorkloadError(f"building accel-crr failed: {r.stderr.strip()}")
    os.replace(tmp, target)
    return target


# ---- servers ---------------------------------------------------------------------------------


def server_argv(workload: str, bind: str, port: int, msg_size: int) -> list[str]:
    if workload == "rr":
        return ["sockperf", "server", "--tcp", "-i", bind, "-p", str(port)]
    if workload == "stream":
        argv = ["iperf3", "-s", "-p", str(port)]
        return argv if bind in ("0.0.0.0", "::") else [*argv, "-B", bind]
    if workload == "crr":
        return [str(crr_binary()), "server", bind, str(port), str(msg_size)]
    raise ValueError(f"unknown workload {workload!r}")


def start_server(
    workload: str, pod: Pod, bind: str, port: int, cpu: int, msg_size: int = 64
) -> subprocess.Popen:
    # A session of its own: Ctrl-C reaches the bench, which then stops servers in order.
    return pod.popen(pinned(cpu, server_argv(workload, bind, port, msg_size)),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def listening(pod: Pod, port: int, addr: str | None = None) -> bool:
    out = pod.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    locals_ = [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]
    if addr is None:
        return bool(locals_)
    return any(a.rsplit(":", 1)[0].strip("[]") in (addr, "0.0.0.0", "*", "::") for a in locals_)


def wait_listening(pod: Pod, port: int, procs: Sequence[subprocess.Popen] = (),
                   timeout: float = 10.0, addr: str | None = None) -> None:
    """Poll the pod's listening sockets (ss opens no connection the servers would see)."""
    deadline = time.monotonic() + timeout
    while True:
        if listening(pod, port, addr):
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise WorkloadError(f"{' '.join(map(str, dead[0].args))} exited with "
                                f"{dead[0].returncode} before listening on port {port}")
        if time.monotonic() > deadline:
            raise WorkloadError(f"nothing listens on port {port} in {pod.name} after {timeout}s")
        time.sleep(0.05)


# ---- clients ---------------------------------------------------------------------------------


def client_argv(workload: str, addr: str, port: int, seconds: float, msg_size: int) -> list[str]:
    whole = str(max(1, round(seconds)))  # sockperf and iperf3 take whole seconds only
    if workload == "rr":
        return ["sockperf", "ping-pong", "--tcp", "-i", addr, "-p", str(port), "-m",
                str(msg_size), "-t", whole, "--full-rtt"]
    if workload == "stream":
        return ["iperf3", "-c", addr, "-p", str(port), "-t", whole, "-l", str(STREAM_WRITE), "-J"]
    if workload == "crr":
        return [str(crr_binary()), "client", addr, str(port), f"{seconds:g}", str(msg_size)]
    raise ValueError(f"unknown workload {workload!r}")


def run_client(workload: str, pod: Pod, addr: str, port: int, cpu: int, seconds: float,
               msg_size: int = 64) -> dict[str, Any]:
    argv = pinned(cpu, client_argv(workload, addr, port, seconds, msg_size))
    try:
        r = pod.run(argv, check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired as e:
        raise WorkloadError(f"{workload}: {' '.join(argv)} did not finish") from e
    parse = {"rr": parse_sockperf, "stream": parse_iperf3, "crr": parse_crr}[workload]
    try:
        figures = parse(r.stdout + "\n" + r.stderr if workload == "rr" else r.stdout)
    except WorkloadError as e:
        tail = (r.stderr or r.stdout).strip()[-400:]
        raise WorkloadError(f"{workload} (exit {r.returncode}): {e}: {tail}") from None
    if r.returncode != 0:
        raise WorkloadError(f"{workload}: exit {r.returncode}: {(r.stderr or r.stdout)[-400:]}")
    return figures


# ---- parsers ---------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PCT = re.compile(r"---> percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_OBS = re.compile(r"Total (\d+) observations")
_AVG = re.compile(r"avg-(?:rtt|latency)=([\d.]+)")
_RUNTIME = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec")


def parse_sockperf(text: str) -> dict[str, Any]:
    """sockperf ping-pong's percentile lines (--full-rtt: round trips, in usec)."""
    text = _ANSI.sub("", text)
    pcts = {float(p): float(v) for p, v in _PCT.findall(text)}
    wanted = {50.0: "p50_us", 90.0: "p90_us", 99.0: "p99_us", 99.9: "p999_us"}
    if not all(p in pcts for p in wanted):
        raise WorkloadError("no percentiles in sockperf's output")
    out = empty()
    for p, key in wanted.items():
        out[key] = pcts[p]
    obs, avg, runtime = _OBS.search(text), _AVG.search(text), _RUNTIME.search(text)
    out["observations"] = int(obs.group(1)) if obs else None
    out["avg_us"] = float(avg.group(1)) if avg else None
    out["valid_seconds"] = float(runtime.group(1)) if runtime else None
    if 99.99 in pcts:
        out["p9999_us"] = pcts[99.99]
    return out


def parse_iperf3(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise WorkloadError("iperf3 printed no JSON") from None
    if doc.get("error"):
        raise WorkloadError(f"iperf3: {doc['error']}")
    end = doc.get("end", {})
    received = end.get("sum_received", {})
    sent = end.get("sum_sent", {})
    if "bits_per_second" not in received:
        raise WorkloadError("iperf3's JSON has no end.sum_received")
    out = empty()
    out["gbps"] = received["bits_per_second"] / 1e9
    out["bytes"] = received.get("bytes")
    out["seconds"] = received.get("seconds")
    out["retransmits"] = sent.get("retransmits")
    return out


def parse_crr(text: str) -> dict[str, Any]:
    line = next((ln for ln in text.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise WorkloadError("accel-crr printed no result")
    doc = json.loads(line)
    if not doc.get("connections"):
        raise WorkloadError(f"no connection completed ({doc.get('first_error') or 'no error'})")
    out = empty()
    out["conn_per_s"] = float(doc["conn_per_s"])
    for key in ("connections", "errors", "first_error", "seconds", "conn_p50_us", "conn_p90_us",
                "conn_p99_us"):
        out[key] = doc.get(key)
    return out


# ---- versions for the record -----------------------------------------------------------------


def tool_versions() -> dict[str, str | None]:
    def first_line(argv: list[str]) -> str | None:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = _ANSI.sub("", (r.stdout or r.stderr)).strip()
        return text.splitlines()[0] if text else None

    return {
        "sockperf": first_line(["sockperf", "--version"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "iptables": first_line(["iptables", "--version"]),
        "cc": first_line(["cc", "--version"]),
        "bpftool": first_line(["bpftool", "version"]),
        "accel-crr": f"crr.c sha256 {hashlib.sha256(CRR_SOURCE.read_bytes()).hexdigest()[:12]}",
    }
