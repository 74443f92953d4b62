"""`accel bench qos`: a bandwidth limit's accuracy, and what it does to another service's
latency, meshaccel's per-service pacing beside the qdiscs users have (tc tbf, tc htb).

Lab: four pods on one bridge. The meshaccel pair (its processes in a cgroup with the
datapath attached, pod-routed as the agent does by default) dials service VIPs; the
baseline pair (a cgroup with nothing attached: the plain kernel path, as users of tbf and
htb have it, since meshaccel's fast paths would skip a qdisc) dials the server pod's IP.
Each server pod runs two services: `bulk` (iperf3, the limited one) and `rr` (sockperf,
unlimited).

Cases, for each rate (default 50 Mbit/s, 200 Mbit/s, 1 Gbit/s):
    meshaccel  `limits: {bandwidth: RATE}` on bulk: SO_MAX_PACING_RATE from sock_ops
    tbf        `tc qdisc ... root tbf` on the client pod's eth0: a pod egress limit, the
               shape of the CNI bandwidth plugin Kubernetes uses (kubernetes.io/egress-
               bandwidth; it puts tbf on an ifb fed from the host veth: the same single
               queue for all the pod's traffic), latency 25 ms as that plugin sets
    htb        `tc qdisc ... root htb` on the client pod's eth0, a class at RATE for bulk's
               port (a u32 filter) and a default class for the rest: the per-port limit a
               user writes by hand
and once, as the reference, `none`: the same stream unlimited on the kernel path.

Each case: a ping-pong to rr idle (sockperf, 64 B, p50/p99), then one iperf3 stream to bulk
(its first `omit` seconds, slow start, not counted: iperf3 -O) with the same ping-pong run
inside it. The stream and the ping-pong are pinned to CPUs of their own (client and server
of each on one CPU), the same for every case; the case order rotates each repeat; medians
over repeats. Rate accuracy is the receiver's goodput against the configured rate: a
qdisc counts frame bytes, pacing counts segment bytes, so headers alone put goodput 3-5%
below the rate.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accel import __version__
from accel.bench import runner
from accel.bench.modes import POD_SYSCTLS
from accel.bench.workloads import (
    WorkloadError,
    client_argv,
    parse_iperf3,
    pinned,
    run_client,
    start_server,
    tool_versions,
    wait_listening,
)
from accel.lab import Lab, Pod
from accel.model import (
    Endpoint,
    Limits,
    Service,
    ServiceTable,
    ValidationError,
    bandwidth_text,
    parse_bandwidth,
)

MECHANISMS = ("meshaccel", "tbf", "htb")
REFERENCE = "none"
DEFAULT_RATES = "50Mbit,200Mbit,1Gbit"
VIP = "10.96.9.9"
BULK_SVC_PORT, RR_SVC_PORT = 80, 82
BULK_PORT, RR_PORT = 8080, 8082
SUBNET = "10.212.0.0/24"
TBF_LATENCY_MS = 25  # the CNI bandwidth plugin's fixed tbf latency
BURST_MS = 10  # tbf/htb burst: 10 ms at the rate (tc-tbf(8): at least rate/HZ, HZ=100)
HTB_OTHER_RATE = "10gbit"  # the default class: everything but bulk, in effect unlimited
MBIT = 1_000_000
# sockperf 3.7 (ping-pong) sleeps 2 s after connecting and its warm-up messages, then does
# not count the first 0.4 s of its run: its counted window opens ~2.6 s after launch and its
# process takes ~2.3 s more than -t. The ping-pong beside the stream is launched so that its
# window lies inside the stream's counted part; a run where it did not is an error.
SOCKPERF_WINDOW_OPENS_S = 2.6
SOCKPERF_EXTRA_S = 2.3
PLACEMENT_NOTE = ("each tool's client and server pinned with taskset: the stream on one CPU, "
                  "the ping-pong on another where there are two; the same for every case")


def parse_rates(text: str) -> tuple[int, ...]:
    """bit/s from '50Mbit,200Mbit,1Gbit' (mesh.yaml's bandwidth syntax); ValueError names
    the bad item."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"--rates {text!r}: expected a list such as {DEFAULT_RATES}")
    try:
        rates = [parse_bandwidth(x, f"--rates {x!r}") for x in items]
    except ValidationError as e:
        raise ValueError(str(e)) from None
    if any(r > 40 * 1000**3 for r in rates):
        raise ValueError(f"--rates {text!r}: at most 40Gbit (a pod pair on this host "
                         "carries less; the limit would not be what is measured)")
    return tuple(dict.fromkeys(rates))


def burst_bytes(rate: int) -> int:
    return max(16 * 1024, rate // 8 * BURST_MS // 1000)


def qdisc_commands(mechanism: str, rate: int) -> list[list[str]]:
    """The tc commands a user writes for the baseline, on the client pod's eth0."""
    burst = str(burst_bytes(rate))
    if mechanism == "tbf":
        return [["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", f"{rate}bit",
                 "burst", burst, "latency", f"{TBF_LATENCY_MS}ms"]]
    if mechanism == "htb":
        cls = ["tc", "class", "add", "dev", "eth0", "parent", "1:", "classid"]
        return [
            ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default",
             "20"],
            [*cls, "1:10", "htb", "rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", burst,
             "cburst", burst, "quantum", "60000"],
            [*cls, "1:20", "htb", "rate", HTB_OTHER_RATE, "ceil", HTB_OTHER_RATE,
             "quantum", "60000"],
            ["tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio",
             "1", "u32", "match", "ip", "dport", str(BULK_PORT), "0xffff", "flowid", "1:10"],
        ]
    return []


def qdisc_stats(pod: Pod) -> list[dict[str, Any]]:
    """The client eth0's qdiscs and classes with their counters (tc -s -j)."""
    out = []
    for what in ("qdisc", "class"):
        r = pod.run(["tc", "-s", "-j", what, "show", "dev", "eth0"], check=False)
        try:
            entries = json.loads(r.stdout or "[]")
        except ValueError:
            continue
        for e in entries:
            out.append({"type": what, "kind": e.get("kind") or e.get("class"),
                        "handle": e.get("handle"), "parent": e.get("parent"),
                        **{k: e.get(k) for k in ("bytes", "packets", "drops", "overlimits",
                                                 "requeues")}})
    return out


class QosLab:
    """`with QosLab(...) as q:` the pods, cgroups, datapath, pod routing and servers; all of
    it removed on exit, and recorded so that a killed bench is cleaned by the next one
    (runner.cleanup_stale reads the same state file)."""

    def __init__(self, stream_cpu: int, rr_cpu: int, say: Callable[[str], None]):
        self.prefix = "bq" + secrets.token_hex(3)
        self.stream_cpu, self.rr_cpu, self.say = stream_cpu, rr_cpu, say
        self.pin_dir = f"/sys/fs/bpf/accel-bench-{self.prefix}"
        self.parent: Path | None = None
        self.cgroups: dict[str, Path] = {}
        self.lab: Lab | None = None
        self.dp: Any = None  # accel.datapath.datapath.Datapath
        self.router: Any = None  # accel.datapath.podroute.PodRouter
        self.procs: list[subprocess.Popen] = []
        self.state_file = runner.STATE_DIR / f"{self.prefix}.json"
        self.installed: Pod | None = None  # a client whose eth0 carries our qdisc

    def __enter__(self) -> QosLab:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pods(self) -> dict[str, tuple[Pod, Pod]]:
        """'accel' and 'plain': (client, server)."""
        assert self.lab is not None
        p = self.lab.pods
        return {"accel": (p[0], p[1]), "plain": (p[2], p[3])}

    def _setup(self) -> None:
        from accel.datapath import cgroup as cg
        from accel.datapath.datapath import Datapath
        from accel.datapath.podroute import PodRouter

        stale = runner.cleanup_stale()
        if stale:
            self.say(f"removed leftovers of killed benches: {', '.join(stale)}")
        self.parent = cg.cgroup2_mount() / f"accel-bench-{self.prefix}"
        self.cgroups = {k: self.parent / k for k in ("accel", "plain")}
        runner.STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({
            "pid": os.getpid(), "lab_prefix": self.prefix, "cgroup_parent": str(self.parent),
            "cgroups": [str(p) for p in self.cgroups.values()], "pin_dir": self.pin_dir,
            "processes": []}))
        self.parent.mkdir()
        for path in self.cgroups.values():
            path.mkdir()
        self.say(f"lab {self.prefix}: 4 pods (meshaccel client+server, kernel client+server)")
        self.lab = Lab(4, prefix=self.prefix, subnet=SUBNET).up()
        for kind, pair in self.pods.items():
            for pod in pair:
                pod.cgroup = str(self.cgroups[kind])
                pod.run(["sysctl", "-qw", *POD_SYSCTLS])
        self.dp = Datapath(pin_dir=self.pin_dir, cgroup_path=str(self.cgroups["accel"])).start()
        self.apply_limit(None)
        client, server = self.pods["accel"]
        # Pod routing as the agent does it (--pod-iface): meshaccel's default path.
        self.router = PodRouter(self.pin_dir, (client.host_ifname, server.host_ifname),
                                netns=self.lab.node)
        self.router.refresh()
        for _, server in self.pods.values():
            self.procs.append(start_server("stream", server, "0.0.0.0", BULK_PORT,
                                           self.stream_cpu))
            self.procs.append(start_server("rr", server, "0.0.0.0", RR_PORT, self.rr_cpu))
        for _, server in self.pods.values():
            wait_listening(server, BULK_PORT, self.procs)
            wait_listening(server, RR_PORT, self.procs)

    def apply_limit(self, rate: int | None) -> None:
        """The meshaccel pair's two services; bulk limited to `rate` bit/s (None: unlimited)."""
        _, server = self.pods["accel"]
        assert self.lab is not None
        self.dp.apply(ServiceTable(
            (Service("bulk", VIP, BULK_SVC_PORT, endpoints=(Endpoint(server.ip, BULK_PORT),),
                     limits=Limits(bandwidth=rate or 0)),
             Service("rr", VIP, RR_SVC_PORT, endpoints=(Endpoint(server.ip, RR_PORT),))),
            mesh_cidrs=(ipaddress.ip_network(self.lab.subnet),)))

    def install(self, mechanism: str, rate: int) -> list[list[str]]:
        client, _ = self.pods["plain"]
        cmds = qdisc_commands(mechanism, rate)
        self.installed = client
        for argv in cmds:
            r = client.run(argv, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
        return cmds

    def uninstall(self) -> None:
        if self.installed is not None:
            self.installed.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
            self.installed = None

    def close(self) -> None:
        try:
            self.uninstall()
        except Exception:  # noqa: BLE001 - the namespace goes below, and the qdisc with it
            pass
        for p in self.procs:
            runner.stop_process(p, timeout=5)
        self.procs.clear()
        if self.router is not None:
            self.router.close()
            self.router = None
        if self.dp is not None:
            self.dp.close()
            self.dp = None
        for path in self.cgroups.values():
            runner.kill_cgroup(path)
        if self.lab is not None:
            self.lab.down()
            self.lab = None
        for path in self.cgroups.values():
            runner.remove_cgroup(path)
        if self.parent is not None:
            runner.remove_cgroup(self.parent)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)


def _stream(pod: Pod, addr: str, cpu: int, omit: int, duration: int) -> subprocess.Popen:
    # -O runs `omit` seconds more before the counted `duration` (iperf3 3.12: -t is counted).
    argv = client_argv("stream", addr, BULK_SVC_PORT if addr == VIP else BULK_PORT,
                       duration, 64)
    return pod.popen(pinned(cpu, [*argv, "-O", str(omit)]), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise WorkloadError("iperf3 did not finish") from None
    try:
        figures = parse_iperf3(out)
    except WorkloadError as e:
        raise WorkloadError(f"stream (exit {proc.returncode}): {e}: {err.strip()[-300:]}") \
            from None
    return figures


def _pingpong(pod: Pod, addr: str, cpu: int, seconds: int) -> dict[str, Any]:
    port = RR_SVC_PORT if addr == VIP else RR_PORT
    r = run_client("rr", pod, addr, port, cpu, seconds)
    return {k: r[k] for k in ("p50_us", "p99_us", "p999_us", "avg_us", "observations")}


def pingpong_seconds(duration: int) -> int:
    """sockperf's -t for a stream of `duration` counted seconds (>= 3): launched with the
    stream, it must end before it."""
    return max(1, int(duration - SOCKPERF_EXTRA_S))


def one_case(q: QosLab, mechanism: str, rate: int | None, omit: int, duration: int,
             repeat: int) -> dict[str, Any]:
    accel = mechanism == "meshaccel"
    client, server = q.pods["accel" if accel else "plain"]
    addr = VIP if accel else str(server.ip)
    pp_seconds = pingpong_seconds(duration)
    row: dict[str, Any] = {"mechanism": mechanism, "rate_bps": rate, "repeat": repeat}
    before: dict[str, Any] = {}
    try:
        if accel:
            q.apply_limit(rate)
            before = {"qos": q.dp.qos_counters().get("bulk", {}), "dp": q.dp.counters()}
        elif rate is not None:
            row["tc"] = [" ".join(c) for c in q.install(mechanism, rate)]
        row["idle"] = _pingpong(client, addr, q.rr_cpu, pp_seconds)
        stream = _stream(client, addr, q.stream_cpu, omit, duration)
        try:
            # Its counted window past slow start (omit) and closed before the stream ends.
            time.sleep(max(0.0, omit + 0.2 - SOCKPERF_WINDOW_OPENS_S))
            row["loaded"] = _pingpong(client, addr, q.rr_cpu, pp_seconds)
            if stream.poll() is not None:
                raise WorkloadError("the ping-pong outlasted the stream: raise --duration")
        finally:
            figures = _finish(stream, omit + duration + 30)
        row["mbit_s"] = round(figures["gbps"] * 1000, 2)
        row["stream_seconds"] = figures["seconds"]
        row["retransmits"] = figures["retransmits"]
        if rate:
            row["error_pct"] = round(100 * (figures["gbps"] * 1e9 - rate) / rate, 2)
        if accel:
            qos, dp = q.dp.qos_counters().get("bulk", {}), q.dp.counters()
            row["meshaccel_counters"] = {
                **{k: qos.get(k, 0) - before["qos"].get(k, 0) for k in ("paced", "repaced")},
                **{k: dp.get(k, 0) - before["dp"].get(k, 0)
                   for k in ("connect_balanced", "pod_redirects", "msg_redirects")}}
        elif rate is not None:
            row["qdisc_stats"] = qdisc_stats(client)
    except (WorkloadError, RuntimeError) as e:
        row["error"] = str(e)
    finally:
        if not accel:
            q.uninstall()
    return row


def cases(rates: tuple[int, ...]) -> list[tuple[str, int | None]]:
    return [(m, r) for r in rates for m in MECHANISMS] + [(REFERENCE, None)]


def aggregate(runs: list[dict[str, Any]], rates: tuple[int, ...]) -> list[dict[str, Any]]:
    out = []
    for mechanism, rate in cases(rates):
        rows = [r for r in runs if r["mechanism"] == mechanism and r["rate_bps"] == rate]
        ok = [r for r in rows if "error" not in r]

        def med(get: Callable[[dict[str, Any]], float | None], ok: list = ok) -> float | None:
            vals = [v for v in map(get, ok) if v is not None]
            return round(statistics.median(vals), 2) if vals else None

        case: dict[str, Any] = {
            "mechanism": mechanism, "rate": bandwidth_text(rate) if rate else None,
            "rate_bps": rate, "repeats": len(ok),
            "mbit_s": med(lambda r: r["mbit_s"]),
            "retransmits": med(lambda r: r["retransmits"]),
        }
        for side in ("idle", "loaded"):
            for key in ("p50_us", "p99_us", "p999_us", "avg_us", "observations"):
                case[f"{side}_{key}"] = med(lambda r, s=side, k=key: r[s][k])
        m = case["mbit_s"]
        case["error_pct"] = round(100 * (m * MBIT - rate) / rate, 2) if rate and m else None
        idle, loaded = case["idle_p99_us"], case["loaded_p99_us"]
        case["p99_loaded_over_idle"] = round(loaded / idle, 2) if idle and loaded else None
        case["errors"] = [r["error"] for r in rows if "error" in r]
        out.append(case)
    return out


def environment(rates: tuple[int, ...], omit: int, duration: int, repeats: int,
                stream_cpu: int, rr_cpu: int) -> dict[str, Any]:
    from accel.datapath.qos import mechanisms

    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return {
        "kernel": platform.release(), "arch": platform.machine(), "cpu_model": cpu_model,
        "cpus_online": os.cpu_count(), "python": platform.python_version(),
        "meshaccel": __version__, "tools": tool_versions(),
        "placement": {"stream": stream_cpu, "pingpong": rr_cpu},
        "placement_note": PLACEMENT_NOTE,
        "rates_bps": list(rates), "omit_s": omit, "duration_s": duration,
        "pingpong_s": pingpong_seconds(duration), "repeats": repeats,
        "interleave": "each repeat runs every case in turn, the order rotated by one each "
                      "repeat; each case reports the median over repeats",
        "workloads": {
            "stream": "iperf3, one TCP stream, 64 KiB writes, to bulk; the receiver's goodput "
                      "over the counted seconds (-O omit: slow start not counted)",
            "pingpong": "sockperf ping-pong --tcp, 64 B, --full-rtt, to rr (another service "
                        "on the same server pod, unlimited): idle, then inside the stream "
                        "(launched with it: sockperf sleeps 2 s after connecting and does not "
                        "count its first 0.4 s, so its counted window lies inside the "
                        "stream's counted part; checked each run)"},
        "mechanisms": {
            "meshaccel": {"path": "client pod -> VIP (connect-time balancing) -> server pod, "
                                  "pod-routed (bpf_redirect_peer) as the agent does",
                          "limit": "limits: {bandwidth: RATE} on bulk only", **mechanisms()},
            "tbf": {"path": "client pod -> server pod IP, kernel path (no meshaccel programs)",
                    "placement": "root qdisc of the client pod's eth0 egress: a pod egress "
                                 "limit over all its traffic, as Kubernetes' CNI bandwidth "
                                 "plugin applies (it uses an ifb fed from the host veth; "
                                 "the same single queue)",
                    "latency_ms": TBF_LATENCY_MS, "burst": f"{BURST_MS} ms at the rate, "
                                                           ">= 16 KiB"},
            "htb": {"path": "client pod -> server pod IP, kernel path (no meshaccel programs)",
                    "placement": "root qdisc of the client pod's eth0 egress; class 1:10 at "
                                 f"the rate (ceil = rate) for dport {BULK_PORT} (u32 filter), "
                                 f"default class 1:20 at {HTB_OTHER_RATE} for the rest; "
                                 "leaf queues the default pfifo",
                    "burst": f"{BURST_MS} ms at the rate, >= 16 KiB"},
            "none": {"path": "kernel path, no limit: the stream's own effect, for reference"}},
        "rate_note": "error_pct is goodput against the configured rate; frame and segment "
                     "headers (what a qdisc and pacing count) are not goodput",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def run(rates: tuple[int, ...], duration: int = 3, repeats: int = 3, omit: int = 1,
        cpus: tuple[int, ...] = (), say: Callable[[str], None] = lambda m: None
        ) -> dict[str, Any]:
    allowed = sorted(os.sched_getaffinity(0))
    cpus = cpus or (allowed[0], allowed[-1])
    stream_cpu, rr_cpu = cpus[0], cpus[-1]
    env = environment(rates, omit, duration, repeats, stream_cpu, rr_cpu)
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    todo = cases(rates)
    with runner.sigterm_as_interrupt(), QosLab(stream_cpu, rr_cpu, say) as q:
        # One unlimited stream per path first: neighbours resolved, pod routes learned.
        for kind, addr in (("accel", VIP), ("plain", str(q.pods["plain"][1].ip))):
            _finish(_stream(q.pods[kind][0], addr, stream_cpu, 0, 1), 30)
        for rep in range(repeats):
            k = rep % len(todo)
            for mechanism, rate in todo[k:] + todo[:k]:
                runner.check_interrupted()
                row = one_case(q, mechanism, rate, omit, duration, rep)
                runs.append(row)
                say(f"{rep + 1}/{repeats} {mechanism:<9} "
                    f"{bandwidth_text(rate) if rate else 'unlimited':<9} " + brief(row))
    env["measure_s"] = round(time.monotonic() - started, 1)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"env": env, "cases": aggregate(runs, rates), "runs": runs}


def brief(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    return (f"{row['mbit_s']:.1f} Mbit/s; ping-pong p99 idle {row['idle']['p99_us']:.1f} us, "
            f"loaded {row['loaded']['p99_us']:.1f} us")


# ---- outputs ---------------------------------------------------------------------------------

HEADER = ["mechanism", "limit", "Mbit/s", "error %", "retrans", "p50 idle", "p99 idle",
          "p99.9 idle", "mean idle", "p50 load", "p99 load", "p99.9 load", "mean load",
          "p99 x"]


def _cell(v: float | None, digits: int = 1, sign: bool = False) -> str:
    return "-" if v is None else f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    env = result["env"]
    rows = [[c["mechanism"], c["rate"] or "unlimited", _cell(c["mbit_s"]),
             _cell(c["error_pct"], 1, True), _cell(c["retransmits"], 0),
             *(_cell(c[f"{side}_{k}_us"]) for side in ("idle", "loaded")
               for k in ("p50", "p99", "p999", "avg")),
             _cell(c["p99_loaded_over_idle"], 2)]
            for c in result["cases"]]
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [f"kernel {env['kernel']}, {env['cpu_model']}; stream on CPU "
             f"{env['placement']['stream']}, ping-pong on CPU {env['placement']['pingpong']}; "
             f"median of {env['repeats']} interleaved repeats of {env['duration_s']} s "
             f"(+{env['omit_s']} s omitted); ping-pong round trips in us (closed loop: a "
             "stall delays the samples after it, so the mean shows time lost that p99 hides)"]
    for r in [HEADER, *rows]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for c in result["cases"]:
        if c["errors"]:
            lines.append(f"  {c['mechanism']} {c['rate']}: {len(c['errors'])} failed runs: "
                         f"{c['errors'][0]}")
    load = env.get("loadavg_end")
    if load and load[0] > 2.5:  # the bench itself keeps about two CPUs busy under a stream
        lines.append(f"  NOTE: load {load[0]:.1f} at the end: other work shared the CPUs")
    return "\n".join(lines)


COLOURS = {"meshaccel": "#2ca02c", "tbf": "#1f77b4", "htb": "#ff7f0e", "none": "#7f7f7f"}


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = result["env"]
    limited = [c for c in result["cases"] if c["rate_bps"]]
    rates = list(dict.fromkeys(c["rate"] for c in limited))
    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(14, 5.6))
    width = 0.8 / len(MECHANISMS)
    for i, mech in enumerate(MECHANISMS):
        mine = {c["rate"]: c for c in limited if c["mechanism"] == mech}
        xs = [j + (i - (len(MECHANISMS) - 1) / 2) * width for j in range(len(rates))]
        err = [mine[r]["error_pct"] if r in mine else None for r in rates]
        bars = ax_rate.bar(xs, [e or 0 for e in err], width, label=mech, color=COLOURS[mech])
        for bar, r, e in zip(bars, rates, err, strict=True):
            if e is not None:
                ax_rate.annotate(f"{mine[r]['mbit_s']:.0f}", (bar.get_x() + bar.get_width() / 2,
                                 e), ha="center", va="bottom" if e >= 0 else "top", fontsize=7)
        loaded = [mine[r]["loaded_p99_us"] if r in mine else None for r in rates]
        ax_lat.bar(xs, [v or 0 for v in loaded], width, color=COLOURS[mech],
                   label=f"{mech}: p99 beside the stream")
        for key, marker, label in (("idle_p99_us", "_", "p99 idle"),
                                   ("loaded_p999_us", "x", "p99.9 beside the stream")):
            ax_lat.scatter(xs, [mine[r][key] or float("nan") if r in mine else float("nan")
                                for r in rates], marker=marker, s=120, color="black", zorder=3,
                           label=label if i == 0 else None)
        for x, v in zip(xs, loaded, strict=True):
            if v:
                ax_lat.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=7)
    ax_rate.axhline(0, color="black", linewidth=0.8)
    ax_rate.set_xticks(range(len(rates)), rates)
    ax_rate.set_ylabel("goodput - limit, % of the limit (labels: Mbit/s)")
    ax_rate.set_title("rate accuracy (iperf3, one stream, after slow start)")
    ax_rate.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=3)
    ax_rate.margins(y=0.15)
    ax_lat.set_xticks(range(len(rates)), rates)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("ping-pong round trip, us (log)")
    ax_lat.set_title("another service's round trip (sockperf 64 B) beside the stream")
    ax_lat.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=3)
    ax_lat.margins(y=0.2)
    fig.suptitle(f"meshaccel bench qos: kernel {env['kernel']}; stream CPU "
                 f"{env['placement']['stream']}, ping-pong CPU {env['placement']['pingpong']}; "
                 f"median of {env['repeats']} interleaved repeats", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
