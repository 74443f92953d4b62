"""A BPF ring buffer (BPF_MAP_TYPE_RINGBUF) read through mmap of its map fd: no libbpf, no
bcc. `RingBuffer.open(path).read()` returns the records committed since the last read.

The kernel's layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (ours to
write), page 1 the producer position (read only), then the data area, mapped twice in a row
so a record that wraps reads as one slice. Each record starts with an 8-byte header: its
length with a busy bit (still being written) and a discard bit, and a page offset; records
are 8-byte aligned. Positions only grow; the data offset is the position modulo the size.
"""

from __future__ import annotations

import mmap
import os
import struct

from accel.kernel import bpf

MAP_RINGBUF = 27  # enum bpf_map_type
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8


class RingBuffer:
    """The consumer side of one ring. Not thread safe: one reader per ring."""

    def __init__(self, fd: int, name: str = ""):
        info = bpf.map_info(fd)
        if info.type != MAP_RINGBUF:
            os.close(fd)
            raise ValueError(f"{name or 'map'}: not a ring buffer (map type {info.type})")
        self.fd = fd
        self.name = name or info.name.decode()
        self.size = info.max_entries  # bytes of data, a power of two
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Producer page + the data area twice (the kernel maps it so).
        self._prod = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._data_off = page

    @classmethod
    def open(cls, path: str | os.PathLike) -> RingBuffer:
        return cls(bpf.obj_get(path), os.path.basename(os.fspath(path)))

    def pending(self) -> int:
        """Bytes committed or being written that we have not consumed."""
        return self._producer() - self._consumer()

    def _consumer(self) -> int:
        return struct.unpack_from("<Q", self._cons, 0)[0]

    def _producer(self) -> int:
        return struct.unpack_from("<Q", self._prod, 0)[0]

    def read(self, limit: int = 1 << 30) -> list[bytes]:
        """Every committed record up to the first one still being written (at most
        `limit`), consumed: their room goes back to the producers."""
        out: list[bytes] = []
        cons, prod = self._consumer(), self._producer()
        while cons < prod and len(out) < limit:
            at = self._data_off + (cons & self._mask)
            (hdr,) = struct.unpack_from("<I", self._prod, at)
            if hdr & BUSY_BIT:
                break  # reserved, not yet submitted: later records wait behind it
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            if not hdr & DISCARD_BIT:
                out.append(self._prod[at + HDR_SIZE: at + HDR_SIZE + length])
            cons += (length + HDR_SIZE + 7) & ~7
        struct.pack_into("<Q", self._cons, 0, cons)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            self._cons.close()
            self._prod.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
