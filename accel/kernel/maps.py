"""A pinned BPF map as a Python mapping, over bpf(2) alone: `Map.open(path)`.

`Key` and `Leaf` are ctypes classes built from the map's BTF (accel/kernel/btf.py), so the
writers use one definition of every layout, the C header's. Per-CPU maps read as a list of
values, one per possible CPU, and a single value written to one is written to every CPU.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

from accel.kernel import bpf
from accel.kernel.btf import BTF, BTFError


@cache
def _btf(btf_id: int) -> BTF:
    return BTF(bpf.btf_data(btf_id))


_CTYPES = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)


def _plain(size: int) -> type:
    return {4: ctypes.c_uint32, 8: ctypes.c_uint64}.get(size) or ctypes.c_uint8 * size


def _as(cls: type, obj: Any) -> Any:
    """obj as a `cls`: itself, the same bytes when it is another ctypes object of the same
    size (a c_int for a u32 leaf), else cls(obj)."""
    if isinstance(obj, cls):
        return obj
    if isinstance(obj, _CTYPES) and ctypes.sizeof(obj) == ctypes.sizeof(cls):
        return cls.from_buffer_copy(obj)
    return cls(obj)


class Map:
    """One open map. Close it (or use `with`) when done; the pin keeps the map alive."""

    def __init__(self, fd: int, name: str = ""):
        self.fd = fd
        self.info = bpf.map_info(fd)
        self.name = name or self.info.name.decode()
        self.max_entries = self.info.max_entries
        self.percpu = self.info.type in bpf.PERCPU_MAPS
        self.Key, self.Leaf = self._layouts()
        self._ncpu = bpf.possible_cpus() if self.percpu else 1
        self._stride = (self.info.value_size + 7) & ~7 if self.percpu else self.info.value_size

    @classmethod
    def open(cls, path: str | os.PathLike) -> Map:
        return cls(bpf.obj_get(path), os.path.basename(os.fspath(path)))

    @property
    def map_fd(self) -> int:
        return self.fd

    @property
    def value_bytes(self) -> int:
        """Bytes of one entry's value as bpf(2) reads and writes it: per-CPU maps hold one
        value per possible CPU, each rounded up to 8 bytes."""
        return self._stride * self._ncpu

    def _layouts(self) -> tuple[type, type]:
        info = self.info
        if not info.btf_id or not info.btf_key_type_id:
            # Maps without BTF (bcc's hand-made sockhash and devmap sections): integers where
            # the size is one, else bytes of the right size.
            return _plain(info.key_size), _plain(info.value_size)
        try:
            btf = _btf(info.btf_id)
            key = btf.ctype(info.btf_key_type_id)
            leaf = (btf.ctype(info.btf_value_type_id) if info.btf_value_type_id
                    else ctypes.c_uint8 * info.value_size)
        except (BTFError, IndexError) as e:
            raise BTFError(f"map {self.name}: {e}") from None
        if ctypes.sizeof(key) != info.key_size or ctypes.sizeof(leaf) != info.value_size:
            raise BTFError(f"map {self.name}: BTF sizes {ctypes.sizeof(key)}/"
                           f"{ctypes.sizeof(leaf)} differ from the map's "
                           f"{info.key_size}/{info.value_size}")
        return key, leaf

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- elements ----------------------------------------------------------------------------

    def _key(self, key: Any) -> Any:
        return _as(self.Key, key)

    def _value_buffer(self) -> ctypes.Array:
        return ctypes.create_string_buffer(self._stride * self._ncpu)

    def _decode(self, buf: ctypes.Array) -> Any:
        if not self.percpu:
            return self.Leaf.from_buffer_copy(buf)
        out = []
        for cpu in range(self._ncpu):
            v = self.Leaf.from_buffer_copy(buf, cpu * self._stride)
            out.append(v.value if isinstance(v, ctypes._SimpleCData) else v)
        return out

    def lookup(self, key: Any) -> Any | None:
        k = self._key(key)
        buf = self._value_buffer()
        err = bpf.try_bpf(bpf.MAP_LOOKUP_ELEM, bpf.ElemAttr(
            map_fd=self.fd, key=ctypes.addressof(k), value=ctypes.addressof(buf)))
        if err == errno.ENOENT:
            return None
        if err:
            raise bpf.BpfError(err, f"{self.name}: lookup: {bpf.strerror(err)}")
        return self._decode(buf)

    def __getitem__(self, key: Any) -> Any:
        v = self.lookup(key)
        if v is None:
            raise KeyError(key)
        return v

    def get(self, key: Any, default: Any = None) -> Any:
        v = self.lookup(key)
        return default if v is None else v

    def __contains__(self, key: Any) -> bool:
        return self.lookup(key) is not None

    def _encode(self, value: Any) -> ctypes.Array | ctypes.Structure:
        if not self.percpu:
            return _as(self.Leaf, value)
        values: Sequence[Any] = (value if isinstance(value, (list, tuple))
                                 else [value] * self._ncpu)
        buf = self._value_buffer()
        for cpu, v in enumerate(values[: self._ncpu]):
            leaf = _as(self.Leaf, v)
            ctypes.memmove(ctypes.addressof(buf) + cpu * self._stride, ctypes.addressof(leaf),
                           ctypes.sizeof(leaf))
        return buf

    def update(self, key: Any, value: Any, flags: int = 0) -> None:
        k, v = self._key(key), self._encode(value)
        bpf.bpf(bpf.MAP_UPDATE_ELEM, bpf.ElemAttr(map_fd=self.fd, key=ctypes.addressof(k),
                                                 value=ctypes.addressof(v), flags=flags),
                f"{self.name}: update")

    __setitem__ = update

    def delete(self, key: Any) -> bool:
        """False when the key was not there."""
        k = self._key(key)
        err = bpf.try_bpf(bpf.MAP_DELETE_ELEM, bpf.ElemAttr(map_fd=self.fd,
                                                            key=ctypes.addressof(k)))
        if err == errno.ENOENT:
            return False
        if err:
            raise bpf.BpfError(err, f"{self.name}: delete: {bpf.strerror(err)}")
        return True

    def pop(self, key: Any, default: Any = None) -> Any:
        """Delete a key; its value before (per-CPU maps: the list), or `default`."""
        v = self.lookup(key)
        return v if v is not None and self.delete(key) else default

    def __delitem__(self, key: Any) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def keys(self) -> Iterator[Any]:
        """Every key, walked with GET_NEXT_KEY (a key deleted meanwhile restarts the walk
        at the map's first key, as the kernel does for hashes)."""
        cur: Any = None
        while True:
            nxt = self.Key()
            attr = bpf.ElemAttr(map_fd=self.fd, key=ctypes.addressof(cur) if cur is not None
                                else 0, value=ctypes.addressof(nxt))
            err = bpf.try_bpf(bpf.MAP_GET_NEXT_KEY, attr)
            if err == errno.ENOENT:
                return
            if err:
                raise bpf.BpfError(err, f"{self.name}: next key: {bpf.strerror(err)}")
            yield nxt
            cur = nxt

    __iter__ = keys

    def items(self) -> Iterator[tuple[Any, Any]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def values(self) -> Iterator[Any]:
        for _, v in self.items():
            yield v

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def clear(self) -> None:
        for k in list(self.keys()):
            self.delete(k)

    # ---- batches -----------------------------------------------------------------------------

    def items_update_batch(self, keys: ctypes.Array, values: ctypes.Array) -> None:
        """Write len(keys) entries in one call (raises where the kernel has no batch op)."""
        bpf.bpf(bpf.MAP_UPDATE_BATCH, bpf.BatchAttr(
            keys=ctypes.addressof(keys), values=ctypes.addressof(values), count=len(keys),
            map_fd=self.fd), f"{self.name}: update batch")

    def items_lookup_batch(self, chunk: int = 4096) -> Iterator[tuple[Any, Any]]:
        """Every entry, read a chunk per call (falls back to the key walk where the kernel
        has no lookup batch for this map type)."""
        if self.percpu:
            yield from self.items()
            return
        keys = (self.Key * chunk)()
        values = (self.Leaf * chunk)()
        token = ctypes.create_string_buffer(max(ctypes.sizeof(self.Key), 8))
        first = True
        while True:
            attr = bpf.BatchAttr(in_batch=0 if first else ctypes.addressof(token),
                                 out_batch=ctypes.addressof(token),
                                 keys=ctypes.addressof(keys), values=ctypes.addressof(values),
                                 count=chunk, map_fd=self.fd)
            err = bpf.try_bpf(bpf.MAP_LOOKUP_BATCH, attr)
            if err and err != errno.ENOENT:
                if first and err in (errno.EINVAL, bpf.ENOTSUPP, errno.EOPNOTSUPP):
                    yield from self.items()
                    return
                raise bpf.BpfError(err, f"{self.name}: lookup batch: {bpf.strerror(err)}")
            ksz, vsz = ctypes.sizeof(self.Key), ctypes.sizeof(self.Leaf)
            for i in range(attr.count):
                yield (self.Key.from_buffer_copy(keys, i * ksz),
                       self.Leaf.from_buffer_copy(values, i * vsz))
            if err == errno.ENOENT:
                return
            first = False
