"""Real traffic for tests: an echo server in a pod, clients with awkward write/read
patterns, and a CPU hog. Plain sockets and threads, nothing mocked."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import selectors
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from accel.lab import Pod


@dataclass
class EchoServer:
    """Echo every byte back; close after the peer's EOF (or first, with close_first)."""

    pod: Pod
    port: int
    host: str | None = None
    family: int = socket.AF_INET
    close_first_after: int | None = None  # server closes after echoing this many bytes
    reply_prefix: bytes = b""
    accepted: int = 0
    received: list[bytes] = field(default_factory=list)
    keep: bool = False

    def __post_init__(self) -> None:
        self.sock = self.pod.socket(self.family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host = self.host or (str(self.pod.ip) if self.family == socket.AF_INET else "::")
        self.sock.bind((host, self.port))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        state: dict[socket.socket, dict] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.1):
                if key.data is None:
                    while True:
                        try:
                            conn, _ = self.sock.accept()
                        except BlockingIOError:
                            break
                        conn.setblocking(False)
                        self.accepted += 1
                        state[conn] = {"out": bytearray(self.reply_prefix), "in": 0,
                                       "eof": False, "kept": bytearray()}
                        sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
                    continue
                conn = key.data
                st = state[conn]
                try:
                    data = conn.recv(1 << 16)
                except BlockingIOError:
                    data = None
                except ConnectionError:
                    data = b""
                if data:
                    st["out"] += data
                    st["in"] += len(data)
                    if self.keep:
                        st["kept"] += data
                elif data == b"":
                    st["eof"] = True
                if st["out"]:
                    try:
                        n = conn.send(st["out"])
                        del st["out"][:n]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except ConnectionError:
                        st["out"].clear()
                        st["eof"] = True
                done_early = (self.close_first_after is not None
                              and st["in"] >= self.close_first_after and not st["out"])
                if (st["eof"] and not st["out"]) or done_early:
                    sel.unregister(conn)
                    if self.keep:
                        self.received.append(bytes(st["kept"]))
                    conn.close()
                    del state[conn]
        for conn in state:
            conn.close()
        sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(pod: Pod, host: str, port: int, family: int = socket.AF_INET,
            bind: tuple[str, int] | None = None, timeout: float = 10) -> socket.socket:
    s = pod.socket(family)
    s.settimeout(timeout)
    if bind:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(bind)
    s.connect((host, port))
    return s


def send_chunked(s: socket.socket, payload: bytes, rng: random.Random) -> None:
    view = memoryview(payload)
    while view:
        n = min(len(view), rng.choice((1, 7, 100, 1460, 4096, 65536, 1 << 20)))
        s.sendall(view[:n])
        view = view[n:]


def recv_all(s: socket.socket, rng: random.Random, expect: int | None = None) -> bytes:
    """Read until EOF with random small and large reads (partial reads on purpose)."""
    out = bytearray()
    while True:
        n = rng.choice((1, 13, 512, 4096, 1 << 16))
        chunk = s.recv(n)
        if not chunk:
            return bytes(out)
        out += chunk
        if expect is not None and len(out) > expect:
            return bytes(out)


def roundtrip(pod: Pod, host: str, port: int, payload: bytes, seed: int = 0,
              family: int = socket.AF_INET) -> bytes:
    """Write all (randomly chunked) at once after connect, SHUT_WR, read the echo to EOF."""
    rng = random.Random(seed)
    with connect(pod, host, port, family) as s:
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(recv_all(s, rng)))
        reader.start()
        send_chunked(s, payload, rng)
        s.shutdown(socket.SHUT_WR)
        reader.join(timeout=60)
        return result[0] if result else b""


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _spin(stop) -> None:
    while not stop.is_set():
        pass


@contextmanager
def cpu_hog(n: int | None = None):
    """Busy processes on every CPU: the scheduler contention that exposes ordering bugs."""
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
             for _ in range(n or os.cpu_count() or 2)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def named_servers(pods, port: int = 8080) -> list[EchoServer]:
    """Echo servers that answer "<pod name>|" first: who() tells which endpoint answered."""
    return [EchoServer(p, port, reply_prefix=p.name.encode() + b"|") for p in pods]


def who(pod: Pod, host: str, port: int = 80, family: int = socket.AF_INET,
        timeout: float = 10) -> str:
    """Connect, send a byte, read to EOF: the name of the pod whose named server answered."""
    with connect(pod, host, port, family, timeout=timeout) as s:
        s.sendall(b"?")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"|")[0].decode()
