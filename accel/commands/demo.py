"""`accel demo`: meshaccel at work on this machine, start to finish, then nothing left.

1. set up what is missing (tools, bpffs), 2. build a small mesh (3 services over 5 server
pods and a client pod, network namespaces on a bridge), 3. start the embedded controller
and an agent fed by it over xDS, 4. send traffic through the service VIPs and check every
byte, 5. show the agent's counters proving the connects were balanced in the kernel and
the bytes went socket to socket, 6. run the quick side-by-side comparison (accel bench
--quick), 7. tear everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from accel.commands.common import fail, print_json

SUBNET = "10.212.0.0/24"
APP_PORT = 9080
# (service, VIP, [(server pod index, weight)]): pod 0 is the client.
SERVICES = (
    ("productpage", "10.96.0.10", [(1, 1)]),
    ("reviews", "10.96.0.11", [(2, 1), (3, 2)]),
    ("ratings", "10.96.0.12", [(4, 1), (5, 1)]),
)
# Services whose apps read with recv() only, so they may take the socket redirect; the
# others keep the default (route: TCP as it is, balanced at connect() and pod-routed).
REDIRECTED = {"ratings"}
CONNECTIONS = 30  # per service
PAYLOAD = 16384  # bytes each connection sends and gets back
TOOLS = {"sockperf": "sockperf", "iperf3": "iperf3", "haproxy": "haproxy",
         "iptables": "iptables", "cc": "gcc", "bpftool": "bpftool"}

# A pod's app: tells who it is, then echoes the request back.
SERVER = r"""
import socket, socketserver, sys
service, pod, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        f = self.request.makefile("rb")
        n = int(f.readline().split()[1])
        data = f.read(n)
        self.request.sendall(f"{service} {pod} {len(data)}\n".encode() + data)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server(("0.0.0.0", port), Handler).serve_forever()
"""

# The client pod's traffic: CONNECTIONS per VIP, every echoed byte checked.
CLIENT = r"""
import json, os, socket, sys
targets, count, size = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = {}
for name, vip, port in targets:
    seen, bad = {}, 0
    for i in range(count):
        payload = os.urandom(size)
        with socket.create_connection((vip, port), timeout=5) as s:
            s.sendall(b"HELLO %d\n" % size + payload)
            f = s.makefile("rb")
            svc, pod, n = f.readline().decode().split()
            back = f.read(size)
            peer = s.getpeername()[0]
        if svc != name or back != payload or peer != vip:
            bad += 1
        seen[pod] = seen.get(pod, 0) + 1
    out[name] = {"pods": seen, "bad": bad}
print(json.dumps(out))
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a small mesh, show meshaccel at work, compare, "
                       "clean up (about 2 minutes)")
    p.add_argument("--out", default="/tmp/accel-demo",
                   help="where the comparison's JSON and plot go (default %(default)s)")
    p.add_argument("--no-compare", action="store_true", help="skip the quick comparison")
    p.add_argument("--no-setup", action="store_true",
                   help="do not install what is missing; fail instead")
    p.add_argument("--cpus", default=None, metavar="LIST",
                   help="CPU placement of the comparison (see accel bench --cpus)")
    p.add_argument("--prefix", default=None, help="name prefix (default ad<hex>)")
    p.add_argument("--json", action="store_true",
                   help="print the report (steps, traffic, counters, checks, comparison) as "
                   "one JSON document on stdout; the running commentary goes to stderr")
    p.set_defaults(func=run)


class Progress:
    """The human commentary (stdout, or stderr under --json) and the report --json prints."""

    def __init__(self, steps: int, out: Any = None):
        self.steps = steps
        self.n = 0
        self.t0 = time.monotonic()
        self.out = out or sys.stdout
        self.report: dict[str, Any] = {"ok": False, "error": None, "steps": []}

    def step(self, title: str) -> None:
        self.n += 1
        self.report["steps"].append({"n": self.n, "of": self.steps, "title": title,
                                     "at_s": round(self.elapsed(), 1)})
        print(f"\n[{self.n}/{self.steps}] {title}  (+{self.elapsed():.0f}s)", file=self.out,
              flush=True)

    def say(self, line: str) -> None:
        print(f"      {line}", file=self.out, flush=True)

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def run(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    progress = Progress(4 if args.no_compare else 5, out=sys.stderr if as_json else sys.stdout)
    if not as_json:
        return _run(args, progress)
    # Only the report on stdout: whatever else writes to it meanwhile (this process, or the
    # tools and servers it starts) goes to stderr.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        code = _run(args, progress)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    progress.report["ok"] = code == 0
    progress.report["elapsed_s"] = round(progress.elapsed(), 1)
    print_json(progress.report)
    return code


def _failed(progress: Progress, message: str, code: int = 1) -> int:
    progress.report["error"] = message
    return fail(message, code=code)


def _run(args: argparse.Namespace, progress: Progress) -> int:
    if os.geteuid() != 0:
        return _failed(progress, "demo: run as root (network namespaces, cgroups and BPF "
                       "need it)", code=2)
    prefix = args.prefix or "ad" + secrets.token_hex(2)
    if len(prefix) > 7 or not prefix.isalnum():
        return _failed(progress, "demo: --prefix must be 1-7 letters or digits", code=2)
    cpus: tuple[int, ...] = ()
    if args.cpus:
        from accel.bench.runner import parse_cpus

        try:
            cpus = parse_cpus(args.cpus)
        except ValueError as e:
            return _failed(progress, f"demo: {e}", code=2)
    from accel.bench.runner import check_interrupted, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            progress.step("checking this machine")
            setup(progress, install=not args.no_setup)
            progress.step("a mesh of 3 services over 5 pods, the controller, an agent on xDS")
            with Mesh(prefix, progress) as mesh:
                check_interrupted()
                progress.step("traffic through the service VIPs")
                mesh.traffic()
                check_interrupted()
                progress.step("the agent's counters")
                mesh.show_counters()
            check_interrupted()
            if not args.no_compare:
                progress.step("quick comparison: kernel, accel, sidecars, iptables DNAT")
                code = compare(prefix, args.out, cpus, progress)
                if code:
                    return code
    except KeyboardInterrupt:
        progress.report["error"] = "interrupted"
        print("\naccel demo: interrupted; everything it made was removed", file=sys.stderr)
        return 130
    except DemoError as e:
        return _failed(progress, f"demo: {e}")
    progress.print(f"\ndone in {progress.elapsed():.0f}s; everything the demo made is removed.")
    return 0


class DemoError(RuntimeError):
    pass


# ---- 1. setup --------------------------------------------------------------------------------


def setup(progress: Progress, install: bool) -> None:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        if not install:
            raise DemoError(f"missing {', '.join(missing)}; run deploy/setup.sh")
        script = Path(__file__).resolve().parents[2] / "deploy" / "setup.sh"
        if script.exists():
            progress.say(f"missing {', '.join(missing)}: running {script}")
            cmd = [str(script)]
        else:
            pkgs = sorted({TOOLS[t] for t in missing})
            progress.say(f"missing {', '.join(missing)}: apt-get install {' '.join(pkgs)}")
            subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
            cmd = ["apt-get", "install", "-y", "-q", *pkgs]
        r = subprocess.run(cmd, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        still = [t for t in TOOLS if not shutil.which(t)]
        if r.returncode != 0 or still:
            raise DemoError(f"could not install {', '.join(still or missing)}")
    else:
        progress.say("tools: " + ", ".join(TOOLS) + " present")
    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
        progress.say("mounted bpffs on /sys/fs/bpf")
    from accel.datapath import cgroup

    try:
        mount = cgroup.cgroup2_mount()
    except cgroup.CgroupError as e:
        raise DemoError(str(e)) from None
    progress.say(f"kernel {os.uname().release}; cgroup2 at {mount}; bpffs at /sys/fs/bpf")
    progress.report["machine"] = {"kernel": os.uname().release, "cgroup2": str(mount),
                                  "bpffs": "/sys/fs/bpf", "installed": missing}
    from accel.bench.runner import cleanup_stale

    stale = cleanup_stale()
    if stale:
        progress.say(f"removed leftovers of interrupted runs: {', '.join(stale)}")


# ---- 2-5. the mesh ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mesh_doc(pods: list[Any]) -> dict[str, Any]:
    return {
        "services": [
            {"name": name, "vip": vip, "port": APP_PORT, "protocol": "TCP",
             "fastpath": "redirect" if name in REDIRECTED else "route",
             "endpoints": [{"address": str(pods[i].ip), "port": APP_PORT, "weight": w}
                           for i, w in eps]}
            for name, vip, eps in SERVICES
        ],
        "mesh_cidrs": [SUBNET],
    }


class Mesh:
    def __init__(self, prefix: str, progress: Progress):
        self.prefix = prefix
        self.progress = progress
        self.stack = ExitStack()
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"accel-demo-{prefix}-"))
        self.pin_dir = f"/sys/fs/bpf/accel-demo-{prefix}"
        self.api_socket = str(self.run_dir / "agent.sock")
        self.counters_before: dict[str, int] = {}
        self.lab: Any = None

    def __enter__(self) -> Mesh:
        try:
            self._build()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.say("tearing the mesh down: agent, controller, pods, cgroup, pins")
        self.stack.close()

    def _build(self) -> None:
        from accel.bench import runner
        from accel.datapath import cgroup as cg
        from accel.lab import Lab

        say = self.progress.say
        self.stack.callback(shutil.rmtree, self.run_dir, ignore_errors=True)
        group = cg.cgroup2_mount() / f"accel-demo-{self.prefix}"
        state = runner.STATE_DIR / f"{self.prefix}.json"
        processes: list[list[Any]] = []

        def record() -> None:
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps({
                "pid": os.getpid(), "lab_prefix": self.prefix, "cgroups": [str(group)],
                "pin_dir": self.pin_dir, "run_dir": str(self.run_dir), "processes": processes,
            }))

        record()
        self.stack.callback(state.unlink, missing_ok=True)
        group.mkdir()
        self.stack.callback(runner.remove_cgroup, group)
        self.stack.callback(shutil.rmtree, self.pin_dir, ignore_errors=True)

        self.lab = Lab(6, prefix=self.prefix, subnet=SUBNET, cgroup=str(group))
        self.lab.up()
        self.stack.callback(self.lab.down)
        self.stack.callback(runner.kill_cgroup, group)  # runs before lab.down: apps first
        pods = self.lab.pods
        say(f"pods: {', '.join(f'{p.name} {p.ip}' for p in pods)} (bridge in {self.lab.node})")
        report = self.progress.report
        report["pods"] = {p.name: str(p.ip) for p in pods}
        report["services"] = [
            {"name": name, "vip": vip, "port": APP_PORT,
             "fastpath": "redirect" if name in REDIRECTED else "route",
             "endpoints": [{"pod": pods[i].name, "address": str(pods[i].ip), "weight": w}
                           for i, w in eps]}
            for name, vip, eps in SERVICES]
        for name, vip, eps in SERVICES:
            for i, _ in eps:
                pods[i].popen([sys.executable, "-c", SERVER, name, pods[i].name, str(APP_PORT)],
                              stdout=subprocess.DEVNULL, start_new_session=True)
            say(f"service {name:<12} VIP {vip}:{APP_PORT} -> "
                + ", ".join(f"{pods[i].name} (weight {w})" for i, w in eps))
        from accel.bench.workloads import wait_listening

        for _, _, eps in SERVICES:
            for i, _ in eps:
                wait_listening(pods[i], APP_PORT)

        mesh_yaml = self.run_dir / "mesh.yaml"
        import yaml

        mesh_yaml.write_text(yaml.safe_dump(mesh_doc(pods), sort_keys=False))
        cli = [sys.executable, "-m", "accel.cli"]
        xds = f"127.0.0.1:{free_port()}"
        have_controller = _has_module("accel.commands.controller")
        if have_controller:
            ctl_log = self.run_dir / "controller.log"
            with open(ctl_log, "w") as out:
                controller = subprocess.Popen(
                    [*cli, "controller", "--config", str(mesh_yaml), "--listen", xds],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            processes.append([controller.pid, xds])
            record()
            self.stack.callback(runner.stop_process, controller)
            say(f"controller: serving {mesh_yaml.name} over xDS (ADS) on {xds}")
            source = ["--xds", xds, "--node-id", f"demo-{self.prefix}"]
        else:
            source = ["--config", str(mesh_yaml)]
            say("controller: not in this build; the agent reads mesh.yaml itself")
        agent_log = self.run_dir / "agent.log"
        with open(agent_log, "w") as out:
            agent = subprocess.Popen(
                [*cli, "agent", *source, "--pin-dir", self.pin_dir, "--cgroup", str(group),
                 "--api-socket", self.api_socket,
                 # Every lab pod is a mesh pod: their packets may skip the bridge.
                 "--pod-netns", self.lab.node, "--pod-iface", f"{self.lab.prefix}p*"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append([agent.pid, self.pin_dir])
        record()
        self.stack.callback(runner.stop_process, agent, 30)
        t0 = time.monotonic()
        try:
            st = runner.wait_agent(agent, agent_log, self.api_socket)
        except RuntimeError as e:
            raise DemoError(str(e)) from None
        if st["services"] != len(SERVICES):
            raise DemoError(f"the agent is ready with {st['services']} services, not "
                            f"{len(SERVICES)}: {st.get('last_error') or '?'}")
        say(f"agent: programs attached to {group} in {time.monotonic() - t0:.1f}s, "
            f"{len(SERVICES)} services applied"
            + (" from the controller" if have_controller else ""))
        report["agent"] = {"source": "xds" if have_controller else "file",
                           "controller": xds if have_controller else None,
                           "services_applied": len(SERVICES),
                           "ready_s": round(time.monotonic() - t0, 1)}
        from accel.datapath import counters

        self.counters_before = counters.read(self.pin_dir)

    def traffic(self) -> None:
        client = self.lab.pods[0]
        targets = [[name, vip, APP_PORT] for name, vip, _ in SERVICES]
        self.progress.say(f"from {client.name}: {CONNECTIONS} connections to each VIP, "
                          f"{PAYLOAD} B out and echoed back on each, every byte compared")
        r = client.run([sys.executable, "-c", CLIENT, json.dumps(targets), str(CONNECTIONS),
                        str(PAYLOAD)], check=False, timeout=120)
        if r.returncode != 0:
            raise DemoError(f"traffic through the VIPs failed: {r.stderr.strip()[-600:]}")
        result = json.loads(r.stdout)
        pods = {p.name: p for p in self.lab.pods}
        bad = 0
        for name, _vip, eps in SERVICES:
            seen = result[name]["pods"]
            bad += result[name]["bad"]
            weights = {self.lab.pods[i].name: w for i, w in eps}
            spread = ", ".join(f"{pod} ({pods[pod].ip}, weight {weights.get(pod, '?')}): {n}"
                               for pod, n in sorted(seen.items()))
            self.progress.say(f"{name:<12} {spread}")
        n = CONNECTIONS * len(SERVICES)
        self.progress.report["traffic"] = {
            "connections_per_service": CONNECTIONS, "payload_bytes": PAYLOAD,
            "connections": n, "correct": n - bad,
            "services": {name: {"pods": result[name]["pods"], "bad": result[name]["bad"]}
                         for name, _, _ in SERVICES}}
        if bad:
            raise DemoError(f"{bad} connections got a wrong answer")
        self.progress.say(f"all {n} answers complete and correct; "
                          "getpeername() reported the VIP on every one")

    def show_counters(self) -> None:
        from accel.datapath import counters

        now = counters.read(self.pin_dir)
        d = {k: now[k] - self.counters_before.get(k, 0) for k in now}
        r = subprocess.run([sys.executable, "-m", "accel.cli", "stats", "--pin-dir", self.pin_dir,
                            "--api-socket", self.api_socket], capture_output=True, text=True)
        self.progress.say(f"$ accel stats --pin-dir {self.pin_dir} --api-socket ...")
        for line in (r.stdout or r.stderr).splitlines():
            self.progress.say("  " + line)
        n = CONNECTIONS * len(SERVICES)
        self.progress.say(
            f"this traffic: {d['connect_balanced']} of {n} connects balanced at connect() "
            f"(no NAT); {d['socks_routed']} sockets kept on TCP (fastpath: route: "
            f"{', '.join(s for s, _, _ in SERVICES if s not in REDIRECTED)}), "
            f"{d['sockhash_inserts']} paired (fastpath: redirect: {', '.join(REDIRECTED)}) "
            f"and {d['msg_redirects']} messages ({d['redirected_bytes']} bytes) handed socket "
            f"to socket past TCP/IP, {d['msg_peer_unknown']} left on TCP; "
            f"{d.get('pod_redirects', 0)} packets passed pod to pod past the bridge")
        checks = {"every_connect_balanced": d["connect_balanced"] >= n,
                  "redirect_service_redirected": d["msg_redirects"] > 0,
                  "pods_routed_past_the_bridge": d.get("pod_redirects", 0) > 0,
                  "route_services_on_tcp": d["socks_routed"] > 0}
        self.progress.report["counters"] = d
        self.progress.report["checks"] = checks
        if not all(checks.values()):
            raise DemoError("the counters do not show the traffic accelerated: see above")


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# ---- 6. the comparison -----------------------------------------------------------------------


def compare(prefix: str, out_dir: str, cpus: tuple[int, ...], progress: Progress) -> int:
    from accel.bench import report, runner
    from accel.bench.workloads import WorkloadError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = runner.BenchConfig(quick=True, repeats=2, seconds=1, cpus=cpus,
                                prefix=f"{prefix}b", progress=progress.say)
    missing = runner.missing_prerequisites(config)
    if missing:
        raise DemoError("cannot compare: missing " + "; ".join(missing))
    try:
        results = runner.run(config)
    except (WorkloadError, RuntimeError, OSError) as e:
        raise DemoError(f"comparison failed: {e}") from None
    results["targets"] = report.check_targets(results["cases"])
    progress.print()
    progress.print(report.table(results))
    json_path, png_path = out / "bench.json", out / "bench.png"
    report.write_json(results, json_path)
    report.plot(results, png_path)
    progress.report["comparison"] = {"json": str(json_path), "plot": str(png_path),
                                     "cases": len(results["cases"]),
                                     "targets": results["targets"]}
    progress.print(f"\nplot: {png_path}\nraw figures and environment: {json_path}")
    progress.print("a longer, steadier run: accel bench --json bench.json --plot bench.png")
    return 0
