"""`accel bench` (mesh): a quick run writes a valid JSON and PNG, the accelerated modes are
proven accelerated by the agent's counters and the others untouched, usage errors exit 2,
and nothing is left behind, after success, SIGTERM or SIGKILL.

Figures are not asserted against the targets here: benchmarks are not tests, and CI
shares its two CPUs. What is asserted is that every figure exists and is sane."""

from __future__ import annotations

import json
import secrets
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accel.bench import runner
from accel.bench.workloads import WorkloadError, parse_crr, parse_iperf3, parse_sockperf
from tests.leftovers import leftovers

REPO = Path(__file__).resolve().parents[1]
MODES = ("kernel", "accel", "accel+redirect", "sidecar", "sidecar+accel", "iptables-dnat")
APPLIES = {"rr": ("p50_us", "p90_us", "p99_us", "p999_us"), "stream": ("gbps",),
           "crr": ("conn_per_s",)}
ALL_METRICS = ("p50_us", "p90_us", "p99_us", "p999_us", "gbps", "conn_per_s")


def accel(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accel.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def prefix():
    p = "hb" + secrets.token_hex(2)
    yield p
    # Whatever a failed test left, the bench's own recovery removes.
    runner.cleanup_stale()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.kernel
def test_quick_bench_writes_json_and_png(tmp_path, prefix):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    t0 = time.monotonic()
    r = accel("bench", "--quick", "--repeats", "1", "--prefix", prefix,
              "--json", str(out_json), "--plot", str(out_png))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert time.monotonic() - t0 < 180

    doc = json.loads(out_json.read_text())
    env = doc["env"]
    for key in ("kernel", "cpu_model", "tools", "placement", "modes", "repeats"):
        assert env[key], key
    assert env["tools"]["sockperf"] and env["tools"]["iperf3"] and env["tools"]["haproxy"]
    assert set(env["placement"]) == {"client", "server", "client_proxy", "server_proxy"}
    assert env["modes"]["sidecar"]["capture"] == "redirect"
    assert env["modes"]["sidecar+accel"]["capture"] == "ports"

    cases = {(c["mode"], c["workload"]): c for c in doc["cases"]}
    assert set(cases) == {(m, w) for m in MODES for w in APPLIES}
    for (mode, workload), case in cases.items():
        assert case["repeats"] == 1 and not case["errors"], case
        for metric in ALL_METRICS:
            value = case[metric]
            if metric in APPLIES[workload]:
                assert isinstance(value, float) and value > 0, (mode, workload, metric)
            else:
                assert value is None, (mode, workload, metric)
        if workload == "rr":
            assert case["p50_us"] <= case["p90_us"] <= case["p99_us"] <= case["p999_us"]
        (run,) = case["runs"]
        counters = run.get("accel_counters")
        if mode in ("accel+redirect", "sidecar+accel"):
            # Proven accelerated: messages handed socket to socket, none left unpaired.
            assert counters["msg_redirects"] > 0, (mode, workload, counters)
            assert counters["msg_peer_unknown"] == 0, (mode, workload, counters)
        if mode == "accel":
            # The default: balanced at connect(), pod-routed, and plain TCP to the sockets.
            assert counters["sockhash_inserts"] == 0 and counters["socks_routed"] > 0
            assert counters["pod_redirects"] > 0, (mode, workload, counters)
        if mode in ("accel", "accel+redirect"):
            assert counters["connect_balanced"] >= 1
        if mode in ("kernel", "sidecar", "iptables-dnat"):
            assert counters is None

    # The terminal table and the targets, one line each.
    assert "accel+redirect p50 <= 0.55x kernel" in r.stdout and "sidecar+accel" in r.stdout
    assert {t["target"] for t in doc["targets"]} >= {"accel+redirect p50 <= 0.55x kernel",
                                                      "accel+redirect throughput >= 1.7x kernel"}
    width, height = png_size(out_png)
    assert width > 800 and height > 300
    assert leftovers(prefix) == []


@pytest.mark.kernel
def test_sigterm_tears_down(prefix):
    proc = subprocess.Popen(
        # Long enough that the signal always lands mid-run, never after a finished bench.
        [sys.executable, "-m", "accel.cli", "bench", "--quick", "--prefix", prefix,
         "--modes", "accel,sidecar", "--workloads", "rr", "--repeats", "4", "--seconds", "3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # wait for the first measurement: everything is up
            lines.append(line)
            if "1/4 " in line:
                break
        assert leftovers(prefix), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert leftovers(prefix) == []


@pytest.mark.kernel
def test_killed_bench_is_cleaned_by_the_next(prefix):
    proc = subprocess.Popen(
        [sys.executable, "-m", "accel.cli", "bench", "--quick", "--prefix", prefix,
         "--modes", "sidecar+accel", "--workloads", "rr"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "1/2 " in line:  # --quick: two rounds
                break
        proc.kill()  # no teardown at all: agent, haproxy, servers, lab, cgroups stay
        proc.wait()
        assert any(x.startswith("process") for x in leftovers(prefix))
        assert prefix in runner.cleanup_stale()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while leftovers(prefix) and time.monotonic() < deadline:
        time.sleep(0.2)  # the orphaned agent is gone; its pins go with cleanup
    assert leftovers(prefix) == []


@pytest.mark.parametrize("args, message", [
    (["--modes", "kernel,envoy"], "unknown 'envoy'"),
    (["--workloads", "udp"], "unknown 'udp'"),
    (["--cpus", "9999"], "not usable"),
    (["--seconds", "0.5"], "whole number"),
    (["--repeats", "0"], "at least 1"),
    (["--prefix", "much-too-long"], "1-9 letters"),
])
def test_usage_errors_exit_2_and_touch_nothing(args, message):
    r = accel("bench", *args, timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


def test_parsers_reject_what_they_cannot_read():
    with pytest.raises(WorkloadError):
        parse_sockperf("sockperf: ERROR: Can`t connect socket (errno=111 Connection refused)")
    with pytest.raises(WorkloadError):
        parse_iperf3('{"error": "unable to connect to server: Connection refused"}')
    with pytest.raises(WorkloadError):
        parse_iperf3("iperf3: error")
    with pytest.raises(WorkloadError):
        parse_crr('{"connections": 0, "errors": 5, "first_error": "Connection refused"}')


@pytest.mark.parametrize("args, message", [
    (["--rates", "50mbps"], "expected a rate in bit/s"),
    (["--rates", "50Mbit,fast"], "'fast'"),
    (["--rates", ","], "expected a list"),
    (["--rates", "100Gbit"], "at most 40Gbit"),
    (["--duration", "2"], "--duration must be >= 3"),
    (["--repeats", "0"], "--repeats >= 1"),
    (["--cpus", "9999"], "not usable"),
    (["--cpus", "0,0,0"], "one or two CPUs"),
])
def test_qos_bench_usage_errors_exit_2(args, message):
    """`accel bench qos` refuses bad input before it builds anything."""
    r = accel("bench", "qos", *args, timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


def test_qos_bench_rates_parse_as_mesh_yaml_writes_them():
    from accel.bench.qos import parse_rates, qdisc_commands

    assert parse_rates("50Mbit, 200Mbit,1Gbit,50Mbit") == (50_000_000, 200_000_000,
                                                          1_000_000_000)
    # The baselines shape at exactly the rate asked, htb only the bulk port.
    (tbf,) = qdisc_commands("tbf", 200_000_000)
    assert tbf[tbf.index("rate") + 1] == "200000000bit"
    htb = qdisc_commands("htb", 50_000_000)
    assert any("dport" in c and "8080" in c for c in htb)
    assert qdisc_commands("meshaccel", 50_000_000) == []
