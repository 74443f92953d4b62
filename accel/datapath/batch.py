"""Many map entries per bpf(2) call (BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH, Linux 5.6+),
with the per-element path's meaning kept.

A full apply writes hundreds of thousands of entries; one syscall and one bcc call each made
that seconds of work. Here the entries of a run are packed into one buffer and handed to the
kernel in few calls. The kernel's generic batch ops write in order and stop at the first
entry they refuse, saying how many went in, so a caller knows exactly which entries are in
the map -- the same knowledge it had element by element, which is what lets the writers keep
make-before-break and report a full map instead of truncating it.

Not every map type has batch ops on every kernel (LPM tries gained them late, per-CPU arrays
have no delete batch): a count-0 call tells, once per map and operation, and where the kernel
says no, the same buffers go in one bpf_update_elem/bpf_delete_elem per entry.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from accel.kernel import addr, bpf

# Entries per call: bounds one syscall's time and nothing else (the kernel reschedules
# between entries anyway).
CHUNK = 65536

_INT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}


addr16 = addr.pack  # struct addr16's bytes, for Layout fields of that type


class Layout:
    """Packs a map's keys or values as bytes, at the offsets bcc's class for them gives.

    `names` are the fields the caller supplies, in offset order; every other byte is zero.
    Integer fields take ints, anything else (struct addr16, arrays) takes its raw bytes. A
    scalar class (a u32 key or value) is one field named "value".
    """

    def __init__(self, cls: type, *names: str):
        self.size = ctypes.sizeof(cls)
        fields = getattr(cls, "_fields_", None)
        parts = ([(f[0], f[1], getattr(cls, f[0]).offset) for f in fields] if fields
                 else [("value", cls, 0)])
        parts.sort(key=lambda p: p[2])
        order = [p[0] for p in parts if p[0] in names]
        if order != list(names):
            raise ValueError(f"{cls.__name__}: fields {names} not all present in offset order "
                             f"{[p[0] for p in parts]}")
        fmt, at = "=", 0
        for name, ftype, offset in parts:
            size = ctypes.sizeof(ftype)
            if offset > at:
                fmt += f"{offset - at}x"
            if name not in names:
                fmt += f"{size}x"
            elif issubclass(ftype, ctypes._SimpleCData) and size in _INT_CODES:
                code = _INT_CODES[size]
                signed = ftype(-1).value == -1
                fmt += code if signed else code.upper()
            else:
                fmt += f"{size}s"
            at = offset + size
        fmt += f"{self.size - at}x" if self.size > at else ""
        self._struct = struct.Struct(fmt)
        if self._struct.size != self.size:
            raise ValueError(f"{cls.__name__}: packed {self._struct.size} bytes, not {self.size}")
        self.pack = self._struct.pack

    def pack_all(self, rows: Iterable[Sequence[Any]]) -> bytes:
        pack = self._struct.pack
        return b"".join([pack(*row) for row in rows])


class BatchMap:
    """One map's batch writes. `batch=False` (or a kernel without them) takes the
    per-element path through the very same buffers."""

    def __init__(self, table: Any, batch: bool = True):
        self.fd = table.map_fd
        self.key_size = ctypes.sizeof(table.Key)
        self.value_size = table.value_bytes  # per-CPU maps: one value for every CPU
        self._update_batch = batch and _probe(bpf.MAP_UPDATE_BATCH, self.fd)
        self._delete_batch = batch and _probe(bpf.MAP_DELETE_BATCH, self.fd)

    @property
    def batched(self) -> bool:
        return self._update_batch

    def update(self, keys: bytes, values: bytes) -> tuple[int, int]:
        """Write the entries in order, stopping at the first the kernel refuses.
        Returns (index of that entry, its errno), or (count, 0) when all went in."""
        return self._update(*self._buffers(keys, values), 0)

    def update_each(self, keys: bytes, values: bytes) -> list[tuple[int, int]]:
        """Write every entry the kernel accepts, going on past those it refuses:
        [(index, errno)] of the refused ones."""
        bufs = self._buffers(keys, values)
        refused = []
        i = 0
        while i < bufs[2]:
            i, err = self._update(*bufs, i)
            if err:
                refused.append((i, err))
                i += 1
        return refused

    def _buffers(self, keys: bytes, values: bytes) -> tuple[ctypes.Array, ctypes.Array, int]:
        n = len(keys) // self.key_size
        if len(keys) != n * self.key_size or len(values) != n * self.value_size:
            raise ValueError(f"{len(keys)} bytes of keys, {len(values)} of values: not "
                             f"{self.key_size} and {self.value_size} per entry")
        return _buffer(keys), _buffer(values), n

    def _update(self, kbuf: ctypes.Array, vbuf: ctypes.Array, n: int,
                i: int) -> tuple[int, int]:
        kaddr, vaddr = ctypes.addressof(kbuf), ctypes.addressof(vbuf)
        while i < n:
            if self._update_batch:
                want = min(CHUNK, n - i)
                attr = bpf.BatchAttr(keys=kaddr + i * self.key_size,
                                     values=vaddr + i * self.value_size, count=want,
                                     map_fd=self.fd)
                err = bpf.try_bpf(bpf.MAP_UPDATE_BATCH, attr)
                if err:
                    return i + min(attr.count, want), err
                i += want
            else:
                err = bpf.try_bpf(bpf.MAP_UPDATE_ELEM, bpf.ElemAttr(
                    map_fd=self.fd, key=kaddr + i * self.key_size,
                    value=vaddr + i * self.value_size))
                if err:
                    return i, err
                i += 1
        return n, 0

    def delete_each(self, keys: bytes) -> int:
        """Delete every key; keys already gone (or refused) are skipped, as `del table[k]`
        catching KeyError did. Returns how many were deleted."""
        n = len(keys) // self.key_size
        kbuf = _buffer(keys)
        kaddr = ctypes.addressof(kbuf)
        deleted = i = 0
        while i < n:
            if self._delete_batch:
                want = min(CHUNK, n - i)
                attr = bpf.BatchAttr(keys=kaddr + i * self.key_size, count=want, map_fd=self.fd)
                err = bpf.try_bpf(bpf.MAP_DELETE_BATCH, attr)
                done = min(attr.count, want) if err else want
                deleted += done
                i += done + bool(err)  # skip the key the kernel stopped at
            else:
                deleted += not bpf.try_bpf(bpf.MAP_DELETE_ELEM, bpf.ElemAttr(
                    map_fd=self.fd, key=kaddr + i * self.key_size))
                i += 1
        return deleted


def _buffer(data: bytes) -> ctypes.Array:
    return (ctypes.c_char * max(1, len(data))).from_buffer_copy(data or b"\0")


def _probe(cmd: int, fd: int) -> bool:
    """Does this kernel have the batch op for this map? A count-0 call succeeds where it does
    and fails where it does not: ENOTSUPP (no such op for the map type), EINVAL (command
    unknown before 5.6). Any failure means the per-element path, which always works."""
    return bpf.try_bpf(cmd, bpf.BatchAttr(map_fd=fd, count=0)) == 0


strerror = bpf.strerror
