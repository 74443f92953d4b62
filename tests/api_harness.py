"""A real `accel agent` subprocess for the API tests, and everything it needs: a cgroup of
its own, a pin dir, an API socket and a metrics port, all named ha-<random> and all removed
afterwards, whatever happened."""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from accel.datapath import cgroup as cg
from accel.datapath.datapath import lock_file, state_file

ACCEL = [sys.executable, "-m", "accel.cli"]
REPO = Path(__file__).resolve().parents[1]
PORTS = range(18300, 18400)  # this helper's share of the machine's ports


_handed_out: collections.deque[int] = collections.deque(maxlen=30)  # the latest few


def free_port(ports: range = PORTS) -> int:
    """A TCP port in `ports` nobody holds now (test suites keep to their own ranges) and not
    handed out before: an Env's metrics port is only bound once its agent starts, so a port
    picked for the test's own server in between could otherwise be the same one."""
    for _ in range(200):
        port = secrets.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.append(port)
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def accel(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*ACCEL, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@dataclass
class Env:
    """Names for one agent; `cleanup()` removes whatever of them exists."""

    uid: str = field(default_factory=lambda: secrets.token_hex(3))

    def __post_init__(self) -> None:
        self.cgroup = cg.cgroup2_mount() / f"ha-{self.uid}"
        self.pin_dir = f"/sys/fs/bpf/ha-{self.uid}"
        self.socket = f"/run/accel/ha-{self.uid}.sock"
        self.metrics_port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ha-{self.uid}-"))
        self.cgroup.mkdir()
        self.agents: list[AgentProc] = []
        self.before = cg.process_cgroup()

    def enter(self) -> None:
        """Run the test process in the agent's cgroup: its sockets are then the agent's."""
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def agent(self, config: Path | None, *extra: str, wait_socket: bool = True,
              socket_path: str | None = None, pin_dir: str | None = None) -> AgentProc:
        """An agent fed by `config` (a mesh.yaml), or by whatever `extra` says if None."""
        a = AgentProc(self, config, extra, socket_path or self.socket, pin_dir or self.pin_dir)
        self.agents.append(a)
        a.start(wait_socket)
        return a

    def cleanup(self) -> None:
        for a in self.agents:
            a.stop()
        (self.before / "cgroup.procs").write_text(str(os.getpid()))
        for proc in (self.cgroup / "cgroup.procs").read_text().split():
            try:
                (self.before / "cgroup.procs").write_text(proc)
            except OSError:
                pass
        self.cgroup.rmdir()  # frees the cgroup: whatever was attached to it goes too
        for a in self.agents:
            shutil.rmtree(a.pin_dir, ignore_errors=True)
            state_file(a.pin_dir).unlink(missing_ok=True)
            lock_file(a.pin_dir).unlink(missing_ok=True)
            Path(a.socket).unlink(missing_ok=True)
        Path(self.socket).unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class AgentProc:
    env: Env
    config: Path | None
    extra: tuple[str, ...]
    socket: str
    pin_dir: str
    proc: subprocess.Popen | None = None
    output: str = ""

    def start(self, wait_socket: bool) -> None:
        log = open(self.env.tmp / f"agent-{len(self.env.agents)}.log", "w+")
        self.proc = subprocess.Popen(
            [*ACCEL, "agent", *(["--config", str(self.config)] if self.config else []),
             "--pin-dir", self.pin_dir,
             "--cgroup", str(self.env.cgroup), "--api-socket", self.socket,
             "--metrics", f"127.0.0.1:{self.env.metrics_port}", *self.extra],
            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )
        self._log = log
        if not wait_socket:
            return
        from accel.api import client

        try:
            client.wait_ready(self.socket, 60, alive=lambda: self.proc.poll() is None)
        except client.AgentUnavailable as e:
            raise AssertionError(f"agent not ready ({e}): {self.read_log()}") from None

    def read_log(self) -> str:
        self._log.seek(0)
        self.output = self._log.read()
        return self.output

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.read_log()
        self._log.close()


def write(tmp: Path, name: str, text: str) -> Path:
    """Atomically (a rename): a watcher polling the file never reads it half written,
    which an empty table would be (seen under load: a controller pushed 0 services)."""
    p = tmp / name
    part = tmp / f".{name}.part"
    part.write_text(text)
    part.replace(p)
    return p


def cert_chain(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a
    self-signed client certificate it did not (openssl CLI, made for each test run)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ha-test-ca")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                 "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (tmp / f"{name}.ext").write_text(ext)
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=ha-{name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2", "-subj", "/CN=ha-rogue",
        "-addext", "extendedKeyUsage=clientAuth")
    return {n: tmp / n for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                                  "client.key", "rogue.pem", "rogue.key")}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
