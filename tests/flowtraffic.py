"""Connections with known byte counts each way and half-closes in both orders, for the
connection-record tests: the client sends a 4-byte reply size and a payload; the server
answers with that many bytes."""

from __future__ import annotations

import random
import socket
import struct
import threading
from dataclasses import dataclass

from accel.lab import Pod


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(1 << 16, n - len(out)))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def _drain(s: socket.socket) -> int:
    n = 0
    while chunk := s.recv(1 << 16):
        n += len(chunk)
    return n


class SizedServer:
    """Reads the reply size R; `client_first` connections: reads to EOF, then sends R bytes
    and closes. Otherwise: sends R bytes, shuts its side, then reads to EOF."""

    def __init__(self, pod: Pod, port: int, family: int = socket.AF_INET):
        self.sock = pod.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(pod.ip if family == socket.AF_INET else pod.ip6), port))
        self.sock.listen(256)
        self.received: list[int] = []
        self.errors: list[str] = []
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(30)
                reply, server_first = struct.unpack("!IB", _recv_exact(conn, 5))
                data = random.Random(reply).randbytes(reply)
                if server_first:
                    conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                    self.received.append(_drain(conn) + 5)
                else:
                    self.received.append(_drain(conn) + 5)
                    conn.sendall(data)
        except OSError as e:
            self.errors.append(str(e))

    def close(self) -> None:
        self.sock.close()


@dataclass
class Sent:
    src: str  # client ip:port
    sent: int
    received: int


def sized_call(pod: Pod, host: str, port: int, send: int, reply: int,
               server_first: bool, seed: int, family: int = socket.AF_INET) -> Sent:
    rng = random.Random(seed)
    s = pod.socket(family)
    s.settimeout(30)
    with s:
        s.connect((host, port))
        ip, cport = s.getsockname()[:2]
        ip = ip if family == socket.AF_INET else f"[{ip}]"
        s.sendall(struct.pack("!IB", reply, int(server_first)))
        payload = rng.randbytes(send)
        if server_first:
            got = _drain(s)  # the server half-closed first
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            _drain(s)
        else:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = _drain(s)
        if got != reply:
            raise AssertionError(f"got {got} of {reply} bytes")
    return Sent(f"{ip}:{cport}", send + 5, reply)
