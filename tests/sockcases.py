"""Every way applications use a TCP socket, as cases whose observable results (bytes,
errors, readiness events, flow control) can be compared between a mesh connection and
plain TCP. Each case gets a connected pair (client end, server end) and returns what an
application would see; the matrix in test_transparency.py runs each on both paths.

The sockets are blocking with no timeout unless a case says otherwise (that is how C,
classic Java and Python without a timeout use them); a case that could hang runs its
blocking part in a thread that the runner abandons after a deadline."""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import socket
import struct
import tempfile
import termios
import threading
import time
from collections.abc import Callable

from tests.traffic import digest

Pair = tuple[socket.socket, socket.socket]
Result = dict[str, object]

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
TCP_INQ = 36  # also the control message's type (TCP_CM_INQ)


def payload(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def sender(s: socket.socket, data: bytes, shut: bool = True) -> threading.Thread:
    def run() -> None:
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def read_to_eof(s: socket.socket, chunk: int = 65536) -> tuple[bytes, str]:
    """All bytes until EOF, and the error that ended it ("" for a clean EOF)."""
    got = bytearray()
    while True:
        try:
            b = s.recv(chunk)
        except OSError as e:
            return bytes(got), type(e).__name__
        if not b:
            return bytes(got), ""
        got += b


def wait_readable(s: socket.socket, timeout: float) -> bool:
    p = select.poll()
    p.register(s, select.POLLIN)
    return bool(p.poll(timeout * 1000))


# ---- the cases ----------------------------------------------------------------------------

def recv_variants(pair: Pair) -> Result:
    """recv, recv_into, recvmsg, recvmsg_into (readv), read: blocking, until EOF."""
    cl, sv = pair
    data = payload(300_000)
    t = sender(cl, data)
    got, err, i = bytearray(), "", 0
    while True:
        try:
            kind = i % 5
            if kind == 0:
                b = sv.recv(7000)
            elif kind == 1:
                buf = bytearray(5000)
                b = bytes(buf[: sv.recv_into(buf)])
            elif kind == 2:
                b = sv.recvmsg(9000)[0]
            elif kind == 3:
                a, c = bytearray(100), bytearray(3000)
                n = sv.recvmsg_into([a, c])[0]
                b = bytes((a + c)[:n])
            else:
                b = os.read(sv.fileno(), 4096)
        except OSError as e:
            err = type(e).__name__
            break
        if not b:
            break
        got += b
        i += 1
    t.join(10)
    return {"digest": digest(bytes(got)), "len": len(got), "error": err}


def nonblocking_reads(pair: Pair) -> Result:
    cl, sv = pair
    sv.setblocking(False)
    try:
        sv.recv(10)
        first = "data"
    except BlockingIOError:
        first = "EAGAIN"
    data = payload(100_000, 2)
    t = sender(cl, data)
    got, eof, deadline = bytearray(), False, time.time() + 10
    while not eof and time.time() < deadline:
        wait_readable(sv, 1)
        try:
            b = sv.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        eof = not b
        got += b
    t.join(10)
    return {"empty": first, "digest": digest(bytes(got)), "eof": eof}


def peek_waitall(pair: Pair) -> Result:
    cl, sv = pair
    cl.sendall(b"hello world")
    peeked = sv.recv(5, socket.MSG_PEEK | socket.MSG_WAITALL)

    def late() -> None:
        time.sleep(0.05)
        cl.sendall(b"!!!")
    t = threading.Thread(target=late, daemon=True)
    t.start()
    whole = sv.recv(14, socket.MSG_WAITALL)
    t.join(5)
    return {"peek": peeked, "waitall": whole}


def urgent(pair: Pair) -> Result:
    """MSG_OOB: the urgent byte is read apart, the stream stays intact."""
    cl, sv = pair
    cl.sendall(b"abc")
    cl.send(b"!", socket.MSG_OOB)
    cl.sendall(b"def")
    cl.shutdown(socket.SHUT_WR)
    _, _, x = select.select([], [], [sv], 2)
    oob = b""
    deadline = time.time() + 2
    while x and time.time() < deadline:
        try:
            oob = sv.recv(1, socket.MSG_OOB)
            break
        except OSError:  # EINVAL/EAGAIN until the urgent byte is in
            time.sleep(0.01)
    stream, err = read_to_eof(sv)
    return {"exceptional": bool(x), "oob": oob, "stream": stream, "error": err}


def urgent_inline(pair: Pair) -> Result:
    cl, sv = pair
    sv.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    cl.sendall(b"abc")
    cl.send(b"!", socket.MSG_OOB)
    cl.sendall(b"def")
    cl.shutdown(socket.SHUT_WR)
    stream, err = read_to_eof(sv)
    return {"stream": stream, "error": err}


def rcvlowat(pair: Pair) -> Result:
    cl, sv = pair
    sv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1000)
    cl.sendall(b"x" * 500)
    time.sleep(0.05)
    early = wait_readable(sv, 0.2)
    cl.sendall(b"y" * 600)
    late = wait_readable(sv, 2)
    return {"readable_below_lowat": early, "readable_at_lowat": late,
            "read": len(sv.recv(4096))}


def inq(pair: Pair) -> Result:
    """FIONREAD / SIOCINQ and TCP_INQ's control message."""
    cl, sv = pair
    sv.setsockopt(socket.IPPROTO_TCP, TCP_INQ, 1)
    cl.sendall(b"z" * 3000)
    buf = bytearray(4)
    deadline, n = time.time() + 2, 0
    while time.time() < deadline:
        fcntl.ioctl(sv.fileno(), termios.FIONREAD, buf)
        n = struct.unpack("i", buf)[0]
        if n == 3000:
            break
        time.sleep(0.005)
    data, anc, _, _ = sv.recvmsg(1000, socket.CMSG_SPACE(4))
    left = [struct.unpack("i", d[:4])[0] for lvl, typ, d in anc
            if lvl == socket.IPPROTO_TCP and typ == TCP_INQ]
    fcntl.ioctl(sv.fileno(), termios.FIONREAD, buf)
    return {"fionread": n, "read": len(data), "tcp_inq": left,
            "fionread_after": struct.unpack("i", buf)[0]}


def splice_reader(pair: Pair) -> Result:
    """splice(socket -> pipe): what haproxy and Go's io.Copy do."""
    cl, sv = pair
    data = payload(1 << 20, 3)
    t = sender(cl, data)
    r, w = os.pipe()
    got = bytearray()
    try:
        while True:
            n = os.splice(sv.fileno(), w, 65536)
            if n == 0:
                break
            got += os.read(r, n)
    finally:
        os.close(r)
        os.close(w)
    t.join(10)
    return {"digest": digest(bytes(got)), "len": len(got)}


def sendfile_writer(pair: Pair) -> Result:
    cl, sv = pair
    data = payload(1 << 20, 4)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()

        def run() -> None:
            off = 0
            while off < len(data):
                off += os.sendfile(cl.fileno(), f.fileno(), off, len(data) - off)
            cl.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        got, err = read_to_eof(sv)
        t.join(10)
    return {"digest": digest(got), "len": len(got), "error": err}


def zerocopy(pair: Pair) -> Result:
    cl, sv = pair
    cl.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    data = payload(200_000, 5)
    sent = 0
    while sent < len(data):
        sent += cl.send(data[sent:], MSG_ZEROCOPY)
    cl.shutdown(socket.SHUT_WR)
    got, err = read_to_eof(sv)
    notified, deadline = False, time.time() + 2
    while not notified and time.time() < deadline:
        try:
            _, anc, _, _ = cl.recvmsg(0, 256, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            notified = bool(anc)
        except BlockingIOError:
            time.sleep(0.01)
    return {"digest": digest(got), "error": err, "completion_notified": notified}


def cork_more(pair: Pair) -> Result:
    cl, sv = pair
    cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    for piece in (b"GET ", b"/ ", b"HTTP/1.1\r\n"):
        cl.send(piece)
    cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    cl.send(b"Host: x\r\n", socket.MSG_MORE)
    cl.send(b"\r\n")
    for i in range(20):
        cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, i % 2)
        cl.send(bytes([65 + i]) * (i + 1))
    cl.shutdown(socket.SHUT_WR)
    got, err = read_to_eof(sv)
    return {"stream": digest(got), "len": len(got), "error": err}


def half_close(pair: Pair) -> Result:
    """shutdown(SHUT_WR) each way: EOF arrives after the data, the other way stays open."""
    cl, sv = pair
    cl.sendall(b"request")
    cl.shutdown(socket.SHUT_WR)
    req, err1 = read_to_eof(sv)
    sv.sendall(b"response")
    sv.shutdown(socket.SHUT_WR)
    resp, err2 = read_to_eof(cl)
    return {"request": req, "response": resp, "errors": (err1, err2)}


def _epoll_trace(cl: socket.socket, sv: socket.socket, edge: bool) -> list[object]:
    sv.setblocking(False)
    ep = select.epoll()
    ep.register(sv.fileno(), select.EPOLLIN | (select.EPOLLET if edge else 0))
    trace: list[object] = []
    try:
        trace.append(bool(ep.poll(0.1)))  # nothing yet
        cl.sendall(b"a" * 100)
        trace.append(bool(ep.poll(2)))  # data
        trace.append(bool(ep.poll(0.1)))  # still unread: LT says so again, ET does not
        trace.append(len(sv.recv(50)))
        trace.append(bool(ep.poll(0.1)))  # half read
        trace.append(len(sv.recv(100)))
        trace.append(bool(ep.poll(0.1)))  # drained
        cl.sendall(b"b" * 10)
        trace.append(bool(ep.poll(2)))  # new data
        cl.shutdown(socket.SHUT_WR)
        trace.append(len(sv.recv(100)))
        trace.append(bool(ep.poll(2)))  # EOF is readable
    finally:
        ep.close()
    return trace


def epoll_level(pair: Pair) -> Result:
    return {"trace": _epoll_trace(*pair, edge=False)}


def epoll_edge(pair: Pair) -> Result:
    return {"trace": _epoll_trace(*pair, edge=True)}


def close_unread(pair: Pair) -> Result:
    """Closing with unread data sends a reset: the peer's next read fails."""
    cl, sv = pair
    cl.sendall(b"q" * 100)
    time.sleep(0.05)
    sv.close()
    time.sleep(0.05)
    _, err = read_to_eof(cl)
    return {"peer_error": err}


def linger_zero(pair: Pair) -> Result:
    cl, sv = pair
    sv.sendall(b"bye")
    time.sleep(0.05)
    sv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sv.close()
    time.sleep(0.05)
    got, err = read_to_eof(cl)
    return {"got": got, "peer_error": err}


def sndbuf_backpressure(pair: Pair) -> Result:
    """A receiver with a small SO_RCVBUF that never reads: a non-blocking sender with a small
    SO_SNDBUF sees EAGAIN, and poll says not writable until the receiver reads."""
    cl, sv = pair
    sv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    cl.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    cl.setblocking(False)
    total = fill(cl, 64 << 20)
    p = select.poll()
    p.register(cl, select.POLLOUT)
    writable_full = bool(p.poll(100))
    drained, deadline = 0, time.time() + 10
    while drained < total and time.time() < deadline:
        if wait_readable(sv, 1):
            drained += len(sv.recv(1 << 20, socket.MSG_DONTWAIT))
    writable_after = bool(p.poll(2000))
    return {"stopped": total < 64 << 20, "under_1mb": total < (1 << 20),
            "writable_when_full": writable_full, "drained_all": drained == total,
            "writable_after_drain": writable_after}


def fill(s: socket.socket, limit: int) -> int:
    """Bytes a non-blocking socket accepts before EAGAIN (stops at `limit`)."""
    chunk, total, idle_since = b"\0" * 65536, 0, None
    while total < limit:
        try:
            total += s.send(chunk)
            idle_since = None
        except BlockingIOError:
            # TCP may still be moving bytes out of the send queue: EAGAIN that lasts.
            if idle_since is None:
                idle_since = time.time()
            elif time.time() - idle_since > 0.5:
                break
            time.sleep(0.01)
    return total


CASES: dict[str, Callable[[Pair], Result]] = {
    f.__name__: f for f in (
        recv_variants, nonblocking_reads, peek_waitall, urgent, urgent_inline, rcvlowat, inq,
        splice_reader, sendfile_writer, zerocopy, cork_more, half_close, epoll_level,
        epoll_edge, close_unread, linger_zero, sndbuf_backpressure,
    )
}

# What the kernel's socket redirect (tcp_bpf) does not give, measured by this matrix on
# 6.18: why `fastpath: redirect` is opt-in (README lists them). Every other case matches
# TCP in redirect mode too; a gap that closes fails the matrix, so this list stays true.
REDIRECT_GAPS = {
    "splice_reader": "splice() reads only the TCP receive queue: redirected bytes are lost",
    "urgent": "MSG_OOB is ignored by the redirect: the urgent byte lands in the stream",
    "peek_waitall": "MSG_WAITALL returns what the queue holds instead of waiting",
    "rcvlowat": "poll/epoll readiness of the redirect queue ignores SO_RCVLOWAT",
    "inq": "no TCP_INQ control message for redirected bytes (FIONREAD is right)",
    "zerocopy": "a MSG_ZEROCOPY send gets no completion notification",
    "close_unread": "closing with unread redirected bytes sends FIN, not RST",
}
