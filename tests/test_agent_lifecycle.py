"""`accel agent` as users run it: starts, accelerates, stops leaving nothing behind;
refuses bad input and a second instance; `accel uninstall` cleans up after a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accel.datapath.datapath import CGROUP_PROGRAMS, lock_file, state_file
from accel.kernel import bpf as bpfsys
from accel.kernel.loader import bpf_dir
from tests.traffic import EchoServer, roundtrip

pytestmark = pytest.mark.kernel

ACCEL = [sys.executable, "-m", "accel.cli"]


def attached(cgroup_dir: Path) -> list[int]:
    from accel.datapath import cgroup as cg

    fd = cg.open_dir(cgroup_dir)
    try:
        return [pid for t in {t for _, _, t in CGROUP_PROGRAMS} for pid in bpfsys.prog_query(fd, t)]
    finally:
        os.close(fd)


def write_config(tmp_path: Path, pods) -> Path:
    path = tmp_path / "mesh.yaml"
    eps = "\n".join(f"      - {{address: {p.ip}, port: 8080}}" for p in pods)
    path.write_text(f"services:\n  - name: echo\n    vip: 10.96.0.1\n    port: 80\n"
                    f"    fastpath: redirect\n    endpoints:\n{eps}\n")
    return path


def api_socket(pin_dir: str) -> str:
    return f"/run/accel/test-{os.path.basename(pin_dir)}.sock"


def start_agent(cfg: Path, pin_dir: str, cgroup_dir: Path, *extra: str,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """An agent, returned once it says it is ready (its API: programs attached, the table
    applied); its status is in `proc.status`."""
    from accel.api import client

    sock = api_socket(pin_dir)
    proc = subprocess.Popen(
        [*ACCEL, "agent", "--config", str(cfg), "--pin-dir", pin_dir, "--cgroup",
         str(cgroup_dir), "--api-socket", sock, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        proc.status = client.wait_ready(sock, 60, alive=lambda: proc.poll() is None)
    except client.AgentUnavailable as e:
        if proc.poll() is None:
            proc.kill()
        raise AssertionError(f"agent not ready ({e}): {proc.communicate()[0]}") from None
    return proc


def stats(pin_dir: str) -> dict:
    out = subprocess.run([*ACCEL, "stats", "--json", "--pin-dir", pin_dir],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def assert_no_trace(pin_dir: str, cgroup_dir: Path) -> None:
    assert not os.path.exists(pin_dir), os.listdir(pin_dir)
    assert attached(cgroup_dir) == []
    assert not state_file(os.path.abspath(pin_dir)).exists()
    assert not lock_file(os.path.abspath(pin_dir)).exists()


def test_agent_runs_and_leaves_no_trace(lab, pin_dir, test_cgroup, tmp_path):
    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    agent = start_agent(cfg, pin_dir, test_cgroup)
    try:
        payload = os.urandom(100_000)
        with EchoServer(server, 8080):
            # Through the VIP: balanced at connect() and redirected.
            assert roundtrip(client, "10.96.0.1", 80, payload) == payload
        s = stats(pin_dir)
        for key in ("sockhash_inserts", "sockhash_insert_failures", "msg_redirects",
                    "msg_passthrough", "redirected_bytes"):
            assert isinstance(s[key], int)
        assert s["connect_balanced"] == 1 and s["sockhash_inserts"] == 2
        assert s["redirected_bytes"] == 2 * len(payload)

        second = subprocess.run(
            [*ACCEL, "agent", "--config", str(cfg), "--pin-dir", pin_dir, "--cgroup",
             str(test_cgroup), "--api-socket", ""], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "another agent" in second.stderr and "is running on pin dir" in second.stderr
    finally:
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=30)[0]
    assert agent.returncode == 0, out
    assert_no_trace(pin_dir, test_cgroup)
    # Traffic still flows, now on the plain kernel path.
    with EchoServer(server, 8080):
        assert roundtrip(client, str(server.ip), 8080, b"plain") == b"plain"


@pytest.mark.parametrize("bad,needle", [
    ("services: [{name: a, vip: 10.0.0.300, port: 80}]", "services[a].vip"),
    ("services: [{name: a, vip: 10.0.0.1, port: 70000}]", "services[a].port"),
    ("services: [{name: a, vip: 10.0.0.1}]", "services[a].port: missing"),
    ("services: [{name: a, vip: 10.0.0.1, port: 80, endpoints: [{address: 10.1.1.1, port: 0}]}]",
     "services[a].endpoints[0].port"),
    ("services: [{name: a, vip: 10.0.0.1, port: 80}, {name: a, vip: 10.0.0.2, port: 80}]",
     "duplicate service name"),
    ("services: [{name: a, vip: 10.0.0.1, port: 80}, {name: b, vip: 10.0.0.1, port: 80}]",
     "already used by service 'a'"),
])
def test_invalid_config_exits_2_and_loads_nothing(tmp_path, pin_dir, test_cgroup, bad, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(bad)
    r = subprocess.run([*ACCEL, "agent", "--config", str(cfg), "--pin-dir", pin_dir,
                        "--cgroup", str(test_cgroup), "--api-socket", ""],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert not os.path.exists(pin_dir)
    assert attached(test_cgroup) == []


def test_sigkill_then_uninstall_removes_everything(lab, pin_dir, test_cgroup, tmp_path):
    cfg = write_config(tmp_path, lab.pods[1:])
    agent = start_agent(cfg, pin_dir, test_cgroup)
    agent.kill()
    agent.wait(timeout=10)
    # A killed agent leaves its programs attached: traffic is still accelerated.
    assert attached(test_cgroup)
    r = subprocess.run([*ACCEL, "uninstall", "--pin-dir", pin_dir], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert_no_trace(pin_dir, test_cgroup)
    assert not lock_file(os.path.abspath(pin_dir)).exists()


def test_keep_then_restart_adopts(lab, pin_dir, test_cgroup, tmp_path):
    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    first = start_agent(cfg, pin_dir, test_cgroup, "--keep")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    kept = attached(test_cgroup)
    assert len(kept) == len(CGROUP_PROGRAMS)
    # Same build (sources, switches, kernel): the kept programs are adopted as they are.
    second = start_agent(cfg, pin_dir, test_cgroup, "--keep")
    try:
        assert sorted(attached(test_cgroup)) == sorted(kept)
        # Nothing compiled: ready within a second of starting (0.1-0.2 s measured here;
        # a compile takes 5 s), the table applied and connects balanced.
        assert second.status["compiled"] is False and first.status["compiled"] is True
        assert second.status["seconds_to_ready"] < 1.0, second.status
        payload = os.urandom(10_000)
        with EchoServer(server, 8080):
            assert roundtrip(client, "10.96.0.1", 80, payload) == payload
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    # Another build (a source changed): compiled afresh, attached, and only then are the kept
    # programs taken off (make-before-break).
    src = tmp_path / "bpf"
    shutil.copytree(bpf_dir(), src)
    with open(src / "connect.c", "a") as f:
        f.write("\n/* another build */\n")
    third = start_agent(cfg, pin_dir, test_cgroup, env={**os.environ,
                                                         "ACCEL_BPF_DIR": str(src)})
    try:
        now = attached(test_cgroup)
        assert len(now) == len(CGROUP_PROGRAMS)
        # sockops.c did not change, but the unit is built as one: every program is new.
        assert not set(now) & set(kept)
        with EchoServer(server, 8080):
            assert roundtrip(client, "10.96.0.1", 80, payload) == payload
    finally:
        third.send_signal(signal.SIGTERM)
        third.wait(timeout=30)
    assert_no_trace(pin_dir, test_cgroup)


def with_rejected_helper(tmp_path: Path, source: str, entry: str) -> Path:
    """A copy of bpf/ where the program opening with `entry` calls a helper its program type
    may not use: the kernel rejects it as an older kernel would a newer helper."""
    import shutil

    from accel.kernel.loader import bpf_dir

    broken = tmp_path / "bpf"
    shutil.copytree(bpf_dir(), broken)
    text = (broken / source).read_text()
    assert entry in text
    (broken / source).write_text(
        text.replace(entry, entry + "\n\tbpf_msg_apply_bytes((void *)0, 1);"))
    return broken


def _xdp_prog(iface: str) -> str | None:
    out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", iface],
                         capture_output=True, text=True, check=True).stdout
    xdp = json.loads(out)[0].get("xdp") or {}
    progs = [a.get("prog", {}) for a in xdp.get("attached", [])] or [xdp.get("prog", {})]
    return next((p.get("name") for p in progs if p), None)


@pytest.mark.parametrize("hook", ["native", "tc"])
def test_uninstall_after_sigkill_removes_the_edge_too(pin_dir, test_cgroup, tmp_path, uid, hook):
    e0, e1 = f"ax{uid}e0", f"ax{uid}e1"
    subprocess.run(["ip", "link", "add", e0, "type", "veth", "peer", "name", e1], check=True)
    agents: list[subprocess.Popen] = []
    try:
        for dev in (e0, e1):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        cfg = tmp_path / "edge.yaml"
        cfg.write_text("services:\n  - {name: web, vip: 10.96.9.1, port: 80, edge: true, "
                       "endpoints: [{address: 10.200.9.11, port: 8080}]}\n")
        agent = start_agent(cfg, pin_dir, test_cgroup, "--edge-iface", e0, "--edge-hook", hook)
        agents.append(agent)
        ingress = "edge_ingress" if hook == "native" else "edge_tc_balance"

        def attached() -> tuple[str | None, str]:
            tc = subprocess.run(["tc", "filter", "show", "dev", e0, "ingress"],
                                capture_output=True, text=True).stdout
            return _xdp_prog(e0), tc

        want_xdp = "edge_xdp" if hook == "native" else None
        deadline = time.time() + 30
        while attached()[1].count(ingress) == 0 and time.time() < deadline:
            time.sleep(0.1)
        xdp, tc = attached()
        assert xdp == want_xdp and ingress in tc, (xdp, tc)
        agent.kill()
        agent.wait(timeout=10)
        assert attached() == (xdp, tc)  # a killed agent leaves its datapath in place
        r = subprocess.run([*ACCEL, "uninstall", "--pin-dir", pin_dir], capture_output=True,
                           text=True, timeout=60)
        said = "xdp on" if hook == "native" else "tc ingress filter on"
        assert r.returncode == 0 and said in r.stdout, r.stdout + r.stderr
        xdp, tc = attached()
        assert xdp is None and "edge_" not in tc, (xdp, tc)
        tc = subprocess.run(["tc", "filter", "show", "dev", e0, "egress"], capture_output=True,
                            text=True).stdout
        assert "edge_tc" not in tc
        assert_no_trace(pin_dir, test_cgroup)
    finally:
        for a in agents:  # a failed assertion must not leave an agent running
            if a.poll() is None:
                a.terminate()
                a.wait(timeout=30)
        subprocess.run(["ip", "link", "del", e0], capture_output=True)


def test_missing_kernel_feature_doctor_names_it_agent_refuses(lab, pin_dir, test_cgroup,
                                                              tmp_path):
    """A program this kernel rejects (here: connect4 calling a helper sock_addr programs may
    not use, as an older kernel would reject a newer helper): doctor names it, the agent
    refuses to start, undoes what it attached, and traffic is unaffected."""
    broken = with_rejected_helper(tmp_path, "connect.c",
                                  "int accel_connect4(struct bpf_sock_addr *ctx) {")
    env = {**os.environ, "ACCEL_BPF_DIR": str(broken)}
    doctor = subprocess.run([*ACCEL, "doctor", "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert doctor.returncode == 1
    report = json.loads(doctor.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["cgroup sock_addr"], failed
    assert "accel_connect4" in failed[0]["detail"]

    cfg = write_config(tmp_path, [lab.pods[1]])
    r = subprocess.run([*ACCEL, "agent", "--config", str(cfg), "--pin-dir", pin_dir, "--cgroup",
                        str(test_cgroup), "--api-socket", ""], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and "cannot load the datapath" in r.stderr, r.stderr
    assert "accel doctor" in r.stderr
    assert_no_trace(pin_dir, test_cgroup)
    client, server = lab.pods
    with EchoServer(server, 8080):
        assert roundtrip(client, str(server.ip), 8080, b"still here") == b"still here"


def test_uninstall_after_sigkill_removes_pod_routing(lab, pin_dir, test_cgroup, tmp_path):
    """A killed agent leaves its tc filters on the pods' veths (traffic still flows, routed
    past the bridge); `accel uninstall` removes exactly those, qdisc included."""
    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    agent = start_agent(cfg, pin_dir, test_cgroup, "--pod-netns", lab.node,
                        "--pod-iface", f"{lab.prefix}p*")

    def filters() -> str:
        return "".join(subprocess.run(
            ["ip", "netns", "exec", lab.node, "tc", "filter", "show", "dev", p.host_ifname,
             "ingress"], capture_output=True, text=True).stdout for p in lab.pods)

    try:
        assert filters().count("accel_pod_tc#") == 2  # one filter per pod veth
    finally:
        agent.kill()
        agent.wait(timeout=10)
    with EchoServer(server, 8080):
        assert roundtrip(client, "10.96.0.1", 80, b"after" * 100) == b"after" * 100
    assert stats(pin_dir)["pod_redirects"] > 0
    r = subprocess.run([*ACCEL, "uninstall", "--pin-dir", pin_dir], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "tc ingress filter on" in r.stdout, r.stdout + r.stderr
    assert "accel_pod_tc" not in filters()
    qdiscs = subprocess.run(["ip", "netns", "exec", lab.node, "tc", "qdisc", "show"],
                            capture_output=True, text=True).stdout
    assert "clsact" not in qdiscs
    assert_no_trace(pin_dir, test_cgroup)


def test_pod_routing_that_cannot_load_fails_open(lab, pin_dir, test_cgroup, tmp_path):
    """Pod routing's program rejected by the kernel: the agent still balances and splices,
    pod traffic keeps the bridge, and status says why."""
    broken = with_rejected_helper(tmp_path, "pod_tc.c",
                                  "int accel_pod_tc(struct __sk_buff *skb)\n{")
    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    os.environ["ACCEL_BPF_DIR"] = str(broken)
    try:
        agent = start_agent(cfg, pin_dir, test_cgroup, "--pod-netns", lab.node,
                            "--pod-iface", f"{lab.prefix}p*")
    finally:
        del os.environ["ACCEL_BPF_DIR"]
    try:
        before = stats(pin_dir)
        with EchoServer(server, 8080):
            assert roundtrip(client, "10.96.0.1", 80, b"open" * 100) == b"open" * 100
        after = stats(pin_dir)
        assert after["connect_balanced"] > before["connect_balanced"]
        assert after["msg_redirects"] > before["msg_redirects"]
        assert after["pod_redirects"] == 0
        assert agent.poll() is None
    finally:
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=30)[0]
    assert agent.returncode == 0
    assert "pod routing unavailable" in out
    assert_no_trace(pin_dir, test_cgroup)
