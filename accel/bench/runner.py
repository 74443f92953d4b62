"""The mesh benchmark: one lab, every mode side by side, interleaved, repeated, medians.

Setup: a cgroup pair (`accel`: the agent attached; `plain`: nothing attached), a lab with
two pods per mode, the agent (the real `accel agent` process) when a mode needs it, then
each mode's rules, proxies and servers. Runs: for each repeat, every mode in turn (the
order rotated each repeat), every workload; the report takes medians over repeats.
Teardown undoes all of it in reverse, on success, failure, Ctrl-C or SIGTERM; a bench
killed outright is cleaned up by the next one (its state file names what it made).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from accel import __version__
from accel.bench import report
from accel.bench.modes import (
    ALL_MODES,
    FLOW_MODES,
    MODES,
    Mode,
    ModeContext,
    Placement,
    make_modes,
)
from accel.bench.workloads import (
    METRICS,
    TOOLS,
    WORKLOADS,
    WorkloadError,
    crr_binary,
    empty,
    run_client,
    tool_versions,
)

log = logging.getLogger(__name__)

STATE_DIR = Path(os.environ.get("ACCEL_RUN_DIR", "/run/accel")) / "bench"
WORKLOAD_DOC = {
    "rr": "sockperf ping-pong --tcp, 64 B messages, TCP_NODELAY, --full-rtt: round trips in us",
    "stream": "iperf3, one TCP stream, 64 KiB writes, receiver's Gbit/s",
    "crr": "accel-crr (netperf TCP_CRR's loop in C: connect, 64 B request, 64 B response, "
           "client closes), one connection at a time",
}


@dataclass
class BenchConfig:
    modes: tuple[str, ...] = MODES
    workloads: tuple[str, ...] = WORKLOADS
    repeats: int = 5
    seconds: int = 2
    quick: bool = False
    cpus: tuple[int, ...] = ()
    sidecar_capture: str = "redirect"
    prefix: str = field(default_factory=lambda: "ab" + secrets.token_hex(3))
    subnet: str = "10.211.0.0/24"
    vip: str = "10.97.0.10"
    base_port: int = 18400
    msg_size: int = 64
    pin_dir: str | None = None  # default /sys/fs/bpf/accel-bench-<prefix>
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if not self.cpus:
            self.cpus = (max(os.sched_getaffinity(0)),)
        if self.pin_dir is None:
            self.pin_dir = f"/sys/fs/bpf/accel-bench-{self.prefix}"

    @property
    def ports(self) -> dict[str, int]:
        return {w: self.base_port + 1 + i for i, w in enumerate(WORKLOADS) if w in self.workloads}

    @property
    def needs_agent(self) -> bool:
        return any(m in ("accel", "accel+redirect", "sidecar+accel") for m in self.modes)


def mode_vip(base: str, i: int) -> str:
    """Each mode's own VIP (two accel modes cannot share a VIP:port)."""
    return str(ipaddress.ip_address(base) + i)


def parse_cpus(text: str) -> tuple[int, ...]:
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--cpus {text!r}: expected a list such as 1 or 0,1 or 0-1")
        cpus.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    allowed = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in allowed]
    if bad or not cpus:
        raise ValueError(f"--cpus {text!r}: CPU {bad[0] if bad else '?'} is not usable here "
                         f"(usable: {','.join(map(str, sorted(allowed)))})")
    return tuple(cpus)


def parse_list(text: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not text:
        return allowed
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        raise ValueError(f"--{what}: unknown {unknown[0] if unknown else 'empty list'!r}; "
                         f"choose from {','.join(allowed)}")
    return tuple(x for x in allowed if x in items)  # canonical order


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    repeats = args.repeats if args.repeats is not None else (2 if quick else 5)
    seconds = args.seconds if args.seconds is not None else (1 if quick else 2)
    if repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if seconds < 1 or seconds != int(seconds):
        raise ValueError("--seconds must be a whole number >= 1 (sockperf and iperf3 take "
                         "whole seconds)")
    kw: dict[str, Any] = {}
    if args.prefix:
        if len(args.prefix) > 9 or not args.prefix.isalnum():
            raise ValueError("--prefix must be 1-9 letters or digits")
        kw["prefix"] = args.prefix
    quiet = getattr(args, "quiet", False)
    flows_cost = getattr(args, "flows_cost", False)
    if flows_cost and args.modes:
        raise ValueError("--flows-cost sets the modes itself: drop --modes")
    default_workloads = ("rr", "crr") if flows_cost else WORKLOADS
    return BenchConfig(
        modes=FLOW_MODES if flows_cost else
        parse_list(args.modes, ALL_MODES, "modes") if args.modes else MODES,
        workloads=parse_list(args.workloads, WORKLOADS, "workloads") if args.workloads
        else default_workloads,
        repeats=repeats,
        seconds=int(seconds),
        quick=quick,
        cpus=parse_cpus(args.cpus) if args.cpus else (),
        sidecar_capture=args.sidecar_capture,
        progress=None if quiet else _print_progress,
        **kw,
    )


def _print_progress(line: str) -> None:
    print(f"[bench] {line}", flush=True)


def missing_prerequisites(config: BenchConfig) -> list[str]:
    out = []
    if os.geteuid() != 0:
        out.append("root (network namespaces, cgroups and BPF programs need it)")
    tools = {"taskset", "ss", "ip"}
    tools |= {TOOLS[w] for w in config.workloads} - {"accel-crr"}
    if "crr" in config.workloads:
        tools.add("cc")
    if any(m.startswith("sidecar") for m in config.modes):
        tools.add("haproxy")
    if "iptables-dnat" in config.modes or (
            "sidecar" in config.modes and config.sidecar_capture == "redirect"):
        tools.add("iptables")
    out += [f"the {t} command" for t in sorted(tools) if not shutil.which(t)]
    if config.needs_agent and not os.path.ismount("/sys/fs/bpf"):
        out.append("bpffs on /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")
    return out


# ---- leftovers of a bench that was killed ----------------------------------------------------


def cleanup_recorded(state: dict[str, Any]) -> None:
    from accel import lab

    for pid, marker in state.get("processes", []):
        kill_if(int(pid), marker)
    for cg in state.get("cgroups", []):
        kill_cgroup(Path(cg))
    for cg in state.get("cgroups", []):
        remove_cgroup(Path(cg))
    if state.get("cgroup_parent"):
        remove_cgroup(Path(state["cgroup_parent"]))
    if state.get("pin_dir"):
        from accel.datapath.datapath import uninstall

        uninstall(state["pin_dir"])  # pins, and the agent's state and lock files
    if state.get("lab_prefix"):
        lab.remove(state["lab_prefix"])
    if state.get("run_dir"):
        shutil.rmtree(state["run_dir"], ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Remove what benches whose process is gone left behind; returns their prefixes."""
    done = []
    if not STATE_DIR.is_dir():
        return done
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(state.get("pid", 0))):
            continue
        cleanup_recorded(state)
        path.unlink(missing_ok=True)
        done.append(path.stem)
    return done


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_if(pid: int, marker: str) -> None:
    """SIGKILL pid only if its command line still names `marker` (no stranger after reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return
    if marker in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # Gone (a zombie has closed its files) before its files are removed: a dying agent
        # still holds its pin dir's lock.
        for _ in range(100):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return
            if stat.rpartition(")")[2].split()[0] == "Z":
                return
            time.sleep(0.05)


def kill_cgroup(path: Path) -> None:
    """Kill every process left in one of our own cgroups (cgroup.kill, Linux 5.14+)."""
    if not (path / "cgroup.procs").exists():
        return
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for _ in range(100):
        if not (path / "cgroup.procs").read_text().strip():
            return
        time.sleep(0.02)


def remove_cgroup(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)  # the last killed processes are still leaving
    log.warning("could not remove cgroup %s", path)


# ---- the bench -------------------------------------------------------------------------------


class Bench:
    """`with Bench(config) as b: results = b.run()`."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self.placement = Placement.from_cpus(config.cpus)
        self.modes: list[Mode] = make_modes(config.modes, config.sidecar_capture)
        self.lab: Any = None
        self.agent: subprocess.Popen | None = None
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"accel-bench-{config.prefix}-"))
        self.state_file = STATE_DIR / f"{config.prefix}.json"
        self.cgroup_parent: Path | None = None
        self.cgroups: dict[str, Path] = {}
        self.started = time.time()
        self.loadavg_start = os.getloadavg()
        self.counters_before: dict[str, int] = {}
        self.setup_seconds = 0.0
        self._stats_fd: int | None = None  # BPF run-time stats on (flows cost)
        self._prog_fds: list[int] = []

    def say(self, line: str) -> None:
        if self.config.progress:
            self.config.progress(line)

    # ---- setup -------------------------------------------------------------------------------

    def __enter__(self) -> Bench:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({
            "pid": os.getpid(),
            "lab_prefix": self.config.prefix,
            "cgroup_parent": str(self.cgroup_parent) if self.cgroup_parent else None,
            "cgroups": [str(p) for p in self.cgroups.values()],
            "pin_dir": self.config.pin_dir,
            "run_dir": str(self.run_dir),
            "processes": [[self.agent.pid, str(self.config.pin_dir)]] if self.agent else [],
        }))

    def _setup(self) -> None:
        from accel.datapath import cgroup as cg
        from accel.lab import Lab

        t0 = time.monotonic()
        stale = cleanup_stale()
        if stale:
            self.say(f"removed leftovers of killed benches: {', '.join(stale)}")
        if "crr" in self.config.workloads:
            crr_binary()
        root = cg.cgroup2_mount()
        self.cgroup_parent = root / f"accel-bench-{self.config.prefix}"
        self.cgroups = {"accel": self.cgroup_parent / "accel",
                        "plain": self.cgroup_parent / "plain"}
        self._record_state()
        self.cgroup_parent.mkdir()
        for path in self.cgroups.values():
            path.mkdir()

        self.say(f"lab {self.config.prefix}: {2 * len(self.modes)} pods "
                 f"({len(self.modes)} modes x client+server) on one bridge")
        self.lab = Lab(2 * len(self.modes), prefix=self.config.prefix, subnet=self.config.subnet)
        self.lab.up()
        for i, mode in enumerate(self.modes):
            client, server = self.lab.pods[2 * i], self.lab.pods[2 * i + 1]
            group = str(self.cgroups["accel" if mode.accel else "plain"])
            client.cgroup = server.cgroup = group
            mode.ctx = ModeContext(client=client, server=server, placement=self.placement,
                                   ports=self.config.ports, vip=mode_vip(self.config.vip, i),
                                   run_dir=self.run_dir, msg_size=self.config.msg_size)
        if self.config.needs_agent:
            self._start_agent()
        for mode in self.modes:
            assert mode.ctx is not None
            self.say(f"mode {mode.name}: {mode.describe}")
            mode.setup(mode.ctx)
        self._warm_up()
        self.setup_seconds = time.monotonic() - t0

    def mesh_yaml(self) -> dict[str, Any]:
        services = [s for m in self.modes for s in m.services()]
        # Pod subnet and loopback: the sidecar hops (127.0.0.1 and pod IPs) are mesh sockets.
        # Connections dialed straight to a mesh address are the sidecar hops of sidecar+accel
        # (Merbridge's shape): redirected. Pods of the other modes run outside the agent's
        # cgroup, and each accel mode's services name their own fast path.
        return {"services": services, "mesh_cidrs": [self.config.subnet, "127.0.0.0/8"],
                "fastpath": "redirect"}

    def _start_agent(self) -> None:
        from accel import config as mesh_config

        doc = self.mesh_yaml()
        mesh_config.table_from_dict(doc)  # fail here, with the field named, not in the agent
        path = self.run_dir / "mesh.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        logf = self.run_dir / "agent.log"
        argv = [sys.executable, "-m", "accel.cli", "agent", "--config", str(path),
                "--pin-dir", str(self.config.pin_dir), "--cgroup", str(self.cgroups["accel"]),
                "--api-socket", str(self.run_dir / "agent.sock")]
        # The accelerated modes' pods are the mesh pods whose packets may skip the bridge.
        assert self.lab is not None
        argv += ["--pod-netns", self.lab.node]
        for mode in self.modes:
            if mode.accel and mode.ctx is not None:
                argv += ["--pod-iface", mode.ctx.client.host_ifname,
                         "--pod-iface", mode.ctx.server.host_ifname]
        self.say(f"agent: attaching to {self.cgroups['accel']} (pin dir {self.config.pin_dir})")
        # The agent's own work (reading connection records) on the CPUs the measured
        # processes leave free, where there are any: what it costs is its CPU time
        # (agent_cpu_s per run), not a share of the measured CPU.
        spare = sorted(os.sched_getaffinity(0) - set(self.placement.as_dict().values()))
        if spare:
            argv = ["taskset", "-c", ",".join(map(str, spare)), *argv]
        with open(logf, "w") as out:
            self.agent = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self._record_state()
        wait_agent(self.agent, logf, str(self.run_dir / "agent.sock"))
        self.counters_before = self.counters()
        if any(not m.flows for m in self.modes):
            self._start_bpf_stats()

    # The programs a connection runs through the agent's, timed by the kernel: the cost of
    # connection records in ns, apart from the noise of a shared VM.
    BPF_PROGRAMS = ("accel_sockops", "accel_msg", "accel_connect4")

    def _start_bpf_stats(self) -> None:
        from accel.kernel import bpf

        try:
            self._stats_fd = bpf.enable_stats()
            self._prog_fds = [bpf.obj_get(os.path.join(str(self.config.pin_dir), f"prog_{p}"))
                              for p in self.BPF_PROGRAMS]
        except OSError as e:
            self.say(f"no BPF run-time stats ({e}): the cost is measured by throughput only")

    def bpf_time(self) -> tuple[int, int] | None:
        """(ns, runs) of the agent's socket programs so far, or None without stats."""
        if self._stats_fd is None:
            return None
        from accel.kernel import bpf

        ns = runs = 0
        for fd in self._prog_fds:
            a, b = bpf.prog_run_stats(fd)
            ns, runs = ns + a, runs + b
        return ns, runs

    def counters(self) -> dict[str, int]:
        if self.agent is None:
            return {}
        from accel.datapath import counters

        try:
            return counters.read(str(self.config.pin_dir))
        except (OSError, RuntimeError):
            return {}

    def agent_cpu(self) -> float | None:
        """CPU seconds the agent process has used (user + system), or None."""
        if self.agent is None:
            return None
        try:
            fields = Path(f"/proc/{self.agent.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _warm_up(self) -> None:
        """One short crr per mode: neighbours resolved, proxies connected, paths proven."""
        for mode in self.modes:
            assert mode.ctx is not None
            workload = "crr" if "crr" in self.config.workloads else self.config.workloads[0]
            addr, port = mode.target(workload)
            try:
                run_client(workload, mode.ctx.client, addr, port, self.placement.client,
                           0.3 if workload == "crr" else 1, self.config.msg_size)
            except WorkloadError as e:
                raise WorkloadError(f"mode {mode.name} does not work: {e}") from None

    # ---- runs --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        runs: list[dict[str, Any]] = []
        cfg = self.config
        t0 = time.monotonic()
        for r in range(cfg.repeats):
            k = r % len(self.modes)
            for mode in self.modes[k:] + self.modes[:k]:
                assert mode.ctx is not None
                for workload in cfg.workloads:
                    check_interrupted()
                    runs.append(self._one(mode, workload, r))
        check_interrupted()
        measured = time.monotonic() - t0
        return {
            "env": self.environment(measured),
            "cases": aggregate(runs, self.modes, cfg.workloads),
        }

    def _one(self, mode: Mode, workload: str, repeat: int) -> dict[str, Any]:
        assert mode.ctx is not None
        addr, port = mode.target(workload)
        if mode.accel and self.agent is not None:
            from accel.flows.reader import set_enabled

            set_enabled(str(self.config.pin_dir), mode.flows)
        before = self.counters() if mode.accel else {}
        cpu_before = self.agent_cpu()
        bpf_before = self.bpf_time() if mode.accel else None
        try:
            figures = run_client(workload, mode.ctx.client, addr, port, self.placement.client,
                                 self.config.seconds, self.config.msg_size)
            error = None
        except WorkloadError as e:
            figures, error = empty(), str(e)
        row: dict[str, Any] = {"mode": mode.name, "workload": workload, "repeat": repeat,
                               "target": f"{addr}:{port}", **figures}
        if cpu_before is not None and (cpu_after := self.agent_cpu()) is not None:
            row["agent_cpu_s"] = round(cpu_after - cpu_before, 3)  # the agent's own work
        if bpf_before is not None and (bpf_after := self.bpf_time()) is not None:
            row["bpf_ns"] = bpf_after[0] - bpf_before[0]
            row["bpf_runs"] = bpf_after[1] - bpf_before[1]
        if mode.accel:
            after = self.counters()
            row["accel_counters"] = {k: after.get(k, 0) - before.get(k, 0)
                                     for k in ("msg_redirects", "msg_passthrough",
                                               "connect_balanced", "sockhash_inserts",
                                               "msg_peer_unknown", "pod_redirects",
                                               "socks_routed", "msg_backpressure")}
            ops = row["accel_counters"]["connect_balanced"] if workload == "crr" else (
                row.get("observations") or 0)
            if "bpf_ns" in row and ops:
                row["bpf_ns_per_op"] = round(row["bpf_ns"] / ops, 1)
                row["bpf_runs_per_op"] = round(row["bpf_runs"] / ops, 2)
        if error:
            row["error"] = error
        self.say(f"{repeat + 1}/{self.config.repeats} {mode.name:<14} {workload:<6} "
                 + (f"error: {error}" if error else report.brief(row)))
        return row

    def _bridge_nf(self) -> int | None:
        """net.bridge.bridge-nf-call-iptables in the lab's node namespace (None: no
        br_netfilter)."""
        from accel.lab import in_netns

        if self.lab is None:
            return None
        try:
            return in_netns(self.lab.node, lambda: int(
                Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text()))
        except (OSError, ValueError):
            return None

    def environment(self, measured_s: float) -> dict[str, Any]:
        cpu_model = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        after = self.counters()
        return {
            "kernel": platform.release(),
            "kernel_build": platform.version(),
            "arch": platform.machine(),
            "cpu_model": cpu_model,
            "cpus_online": os.cpu_count(),
            "python": platform.python_version(),
            "meshaccel": __version__,
            "tools": tool_versions(),
            "placement": self.placement.as_dict(),
            "placement_note": "every process pinned with taskset; the same CPUs for every mode",
            # The kernel path's cost depends on it: bridged packets also cross iptables.
            "bridge_nf_call_iptables": self._bridge_nf(),
            "modes": {m.name: m.record() for m in self.modes},
            "workloads": {w: WORKLOAD_DOC[w] for w in self.config.workloads},
            "repeats": self.config.repeats,
            "seconds": self.config.seconds,
            "quick": self.config.quick,
            "msg_size": self.config.msg_size,
            "interleave": "each repeat runs every mode in turn, the order rotated by one "
                          "each repeat; each case reports the median over repeats",
            "sidecar_capture": self.config.sidecar_capture,
            "lab": {"prefix": self.config.prefix, "subnet": self.config.subnet,
                    "vip": self.config.vip, "ports": self.config.ports,
                    "topology": "each mode: a client pod and a server pod (netns) on one "
                                "bridge in a node netns"},
            "foreign_cgroup_programs": foreign_cgroup_programs(self.cgroup_parent),
            "accel_counters": {k: after.get(k, 0) - self.counters_before.get(k, 0)
                               for k in after},
            # Other work on the machine skews every mode: say how busy it was.
            "loadavg_start": [round(x, 2) for x in self.loadavg_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "setup_s": round(self.setup_seconds, 2),
            "measure_s": round(measured_s, 2),
        }

    # ---- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        for fd in [*self._prog_fds, *([self._stats_fd] if self._stats_fd is not None else [])]:
            os.close(fd)
        self._prog_fds, self._stats_fd = [], None
        for mode in reversed(self.modes):
            try:
                mode.close()
            except Exception as e:  # noqa: BLE001 - keep tearing down
                log.warning("stopping mode %s: %s", mode.name, e)
        if self.agent is not None:
            stop_process(self.agent, timeout=30)
            self.agent = None
        for path in self.cgroups.values():
            kill_cgroup(path)
        if self.lab is not None:
            self.lab.down()
            self.lab = None
        for path in self.cgroups.values():
            remove_cgroup(path)
        if self.cgroup_parent is not None:
            remove_cgroup(self.cgroup_parent)
        shutil.rmtree(str(self.config.pin_dir), ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)


def wait_agent(proc: subprocess.Popen, logf: Path, api_socket: str,
               timeout: float = 180.0) -> dict:
    """The agent's status once it is ready (its one readiness signal, over its API)."""
    from accel.api import client

    try:
        return client.wait_ready(api_socket, timeout, alive=lambda: proc.poll() is None)
    except client.AgentUnavailable as e:
        text = logf.read_text() if logf.exists() else ""
        raise RuntimeError(f"the agent is not ready ({e}):\n{text[-2000:]}") from None


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def foreign_cgroup_programs(cgroup_dir: Path | None) -> int:
    """Socket programs attached above our cgroups by others: they could touch our sockets."""
    if cgroup_dir is None:
        return 0
    try:
        from accel.datapath import cgroup as cg
        from accel.datapath.datapath import CGROUP_PROGRAMS
        from accel.kernel import bpf as bpfsys
    except ImportError:
        return 0
    root = cg.cgroup2_mount()
    n = 0
    path = cgroup_dir.parent
    while True:
        try:
            fd = cg.open_dir(path)
        except OSError:
            break
        try:
            for attach_type in {t for _, _, t in CGROUP_PROGRAMS}:
                try:
                    n += len(bpfsys.prog_query(fd, attach_type))
                except OSError:
                    pass
        finally:
            os.close(fd)
        if path == root or path == path.parent:
            break
        path = path.parent
    return n


def aggregate(runs: list[dict[str, Any]], modes: list[Mode],
              workloads: tuple[str, ...]) -> list[dict[str, Any]]:
    cases = []
    for mode in modes:
        for workload in workloads:
            rows = [r for r in runs if r["mode"] == mode.name and r["workload"] == workload]
            ok = [r for r in rows if "error" not in r]
            case: dict[str, Any] = {"mode": mode.name, "workload": workload, "tool":
                                    TOOLS[workload]}
            for metric in METRICS:
                values = [r[metric] for r in ok if r.get(metric) is not None]
                case[metric] = round(statistics.median(values), 3) if values else None
            case["repeats"] = len(ok)
            case["errors"] = [r["error"] for r in rows if "error" in r]
            case["runs"] = rows
            cases.append(case)
    return cases


# ---- entry points ----------------------------------------------------------------------------


_TERMINATED = threading.Event()


def check_interrupted() -> None:
    """Between runs: a SIGTERM whose KeyboardInterrupt was swallowed still stops us."""
    if _TERMINATED.is_set():
        raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so teardown runs, in this process only: a forked
    child (pyroute2 forks to create namespaces) must die as SIGTERM says, not tear down."""
    owner = os.getpid()

    def raise_interrupt(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # Raised inside an at-fork hook (logging's lock release after each subprocess
        # fork) the exception is printed and dropped: check_interrupted() raises it again.
        _TERMINATED.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(config: BenchConfig) -> dict[str, Any]:
    with sigterm_as_interrupt(), Bench(config) as bench:
        return bench.run()


def main(config: BenchConfig, json_path: str | None = None, plot_path: str | None = None) -> int:
    try:
        results = run(config)
    except KeyboardInterrupt:
        print("accel bench: interrupted; everything it made was removed", file=sys.stderr)
        return 130
    except (WorkloadError, RuntimeError, OSError) as e:
        print(f"accel bench: {e}", file=sys.stderr)
        return 1
    results["targets"] = report.check_targets(results["cases"])
    results["flows_cost"] = report.flows_cost(results["cases"])
    print(report.table(results))
    if json_path:
        report.write_json(results, json_path)
        print(f"raw figures and environment: {json_path}")
    if plot_path:
        report.plot(results, plot_path)
        print(f"plot: {plot_path}")
    missing = [c for c in results["cases"] if c["repeats"] == 0]
    if missing:
        print("accel bench: no figure for " + ", ".join(
            f"{c['mode']}/{c['workload']}" for c in missing), file=sys.stderr)
        return 1
    return 0
