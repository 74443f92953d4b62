"""Restart and upgrade without traffic loss: established connections keep flowing, byte
exact and still redirected, through SIGTERM (--keep) and SIGKILL of the agent, and the
next agent adopts the pinned datapath."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import pytest

from accel.datapath import counters
from tests.test_agent_lifecycle import assert_no_trace, attached, start_agent, write_config
from tests.traffic import EchoServer, connect

pytestmark = [pytest.mark.kernel, pytest.mark.reliability]


class Pump:
    """One connection sending random-sized messages and checking each echo, until stopped."""

    def __init__(self, sock: socket.socket, seed: int, prefixed: bool = False):
        self.sock = sock
        self.prefixed = prefixed  # the server starts with "<name>|": who answered
        self.rng = random.Random(seed)
        self.bytes = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.prefixed:
                self.sock.sendall(b"hi")
                got = b""
                while not got.endswith(b"|hi"):
                    chunk = self.sock.recv(1)
                    if not chunk:
                        raise ConnectionError("EOF before the greeting")
                    got += chunk
                self.server = got[:-3].decode()
            while not self._stop.is_set():
                msg = self.rng.randbytes(self.rng.choice((1, 100, 4096, 65536, 200_000)))
                self.sock.sendall(msg)
                got = bytearray()
                while len(got) < len(msg):
                    chunk = self.sock.recv(len(msg) - len(got))
                    if not chunk:
                        raise ConnectionError("EOF mid-message")
                    got += chunk
                if got != msg:
                    raise AssertionError("echo differs")
                self.bytes += len(msg)
        except Exception as e:  # reported by the test
            self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def redirects(pin_dir: str) -> int:
    return counters.read(pin_dir)["msg_redirects"]


def test_connections_survive_sigterm_keep_and_sigkill(lab, pin_dir, test_cgroup, tmp_path):
    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    agent = start_agent(cfg, pin_dir, test_cgroup, "--keep")
    with EchoServer(server, 8080):
        pumps = [Pump(connect(client, "10.96.0.1", 80, timeout=30), i) for i in range(20)]
        try:
            time.sleep(0.5)
            # 1. SIGTERM with --keep: programs and maps stay; traffic stays redirected.
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0
            r0 = redirects(pin_dir)
            time.sleep(0.5)
            assert redirects(pin_dir) > r0, "no redirects while no agent runs"
            # 2. A new agent adopts the pinned datapath, then is SIGKILLed.
            agent = start_agent(cfg, pin_dir, test_cgroup, "--keep")
            r1 = redirects(pin_dir)
            time.sleep(0.5)
            assert redirects(pin_dir) > r1
            agent.kill()
            agent.wait(timeout=10)
            r2 = redirects(pin_dir)
            time.sleep(0.5)
            assert redirects(pin_dir) > r2, "no redirects after SIGKILL"
            # 3. A third agent adopts again; new connections work through the VIP too.
            agent = start_agent(cfg, pin_dir, test_cgroup)
            with connect(client, "10.96.0.1", 80) as s:
                s.sendall(b"new")
                assert s.recv(3) == b"new"
            time.sleep(0.5)
            errors = [p.error for p in pumps if p.error]
            assert not errors, errors
            assert all(p.bytes > 0 for p in pumps)
        finally:
            for p in pumps:
                p.stop()
            for p in pumps:
                p.sock.close()
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
    assert_no_trace(pin_dir, test_cgroup)


def test_stop_without_keep_falls_back_to_tcp_without_loss(lab, pin_dir, test_cgroup, tmp_path):
    """Uninstalling under load: connections continue on TCP, nothing lost, nothing reset."""
    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    agent = start_agent(cfg, pin_dir, test_cgroup)
    with EchoServer(server, 8080):
        pumps = [Pump(connect(client, "10.96.0.1", 80, timeout=30), 100 + i) for i in range(10)]
        try:
            time.sleep(0.5)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0
            assert not os.path.exists(pin_dir) and attached(test_cgroup) == []
            moved = [p.bytes for p in pumps]
            time.sleep(1.0)
            assert all(p.bytes > m for p, m in zip(pumps, moved, strict=True)), "stalled"
            errors = [p.error for p in pumps if p.error]
            assert not errors, errors
        finally:
            for p in pumps:
                p.stop()
                p.sock.close()


def test_upgrade_leaves_no_window_for_new_connections(lab, pin_dir, test_cgroup, tmp_path):
    """Agents replaced one after another (--keep each): every connect() to the VIP made
    meanwhile is balanced (a moment without the connect program would send it to a VIP
    nobody answers) and paired."""
    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    agent = start_agent(cfg, pin_dir, test_cgroup, "--keep")
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def dial() -> None:
        while not stop.is_set():
            try:
                with connect(client, "10.96.0.1", 80, timeout=2) as s:
                    s.sendall(b"ping")
                    if s.recv(4) != b"ping":
                        failures.append("bad echo")
                done[0] += 1
            except OSError as e:
                failures.append(repr(e))

    with EchoServer(server, 8080):
        t = threading.Thread(target=dial)
        t.start()
        try:
            for _ in range(3):
                agent.send_signal(signal.SIGTERM)
                assert agent.wait(timeout=30) == 0
                agent = start_agent(cfg, pin_dir, test_cgroup, "--keep")
                time.sleep(0.3)
        finally:
            stop.set()
            t.join(timeout=30)
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
            subprocess_uninstall(pin_dir)
    assert not failures, failures[:5]
    assert done[0] > 50
    assert_no_trace(pin_dir, test_cgroup)


def subprocess_uninstall(pin_dir: str) -> None:
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "accel.cli", "uninstall", "--pin-dir", pin_dir],
                   check=True, capture_output=True, timeout=60)


def test_kept_pins_of_another_layout_are_started_afresh(pin_dir, test_cgroup):
    """An agent kept its datapath (--keep) and a build whose maps have another layout starts
    on it: bcc opens the old pinned map as it is and the verifier refuses the programs.
    The new agent starts afresh (as `accel uninstall` and a start would) instead of
    failing, and leaves nothing behind (the scratch pins it proved the build with)."""
    import ctypes
    import os

    from bcc import BPF

    from accel.datapath.datapath import Datapath

    os.makedirs(pin_dir)
    old = BPF(text=f'BPF_TABLE_PINNED("array", u32, u64, accel_qos_state, 16384, '
                   f'"{pin_dir}/accel_qos_state");')
    old["accel_qos_state"]  # pinned with an 8-byte value (struct qos_state is 48)
    old.cleanup()
    dp = Datapath(pin_dir=pin_dir, cgroup_path=str(test_cgroup)).start()
    try:
        assert ctypes.sizeof(dp.map("accel_qos_state").Leaf) == 48
        assert dp.compiled
    finally:
        dp.close()
    assert not os.path.exists(pin_dir)
    assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith(os.path.basename(pin_dir))]
