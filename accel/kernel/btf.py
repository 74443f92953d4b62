"""Key and value layouts of a loaded map, from the BTF the kernel keeps for it.

The C header is the one definition of every layout (bpf/lib/*.h). bcc compiles it and the
kernel records its BTF with each map; the agent, which never imports bcc, reads that BTF
back (BPF_OBJ_GET_INFO_BY_FD -> btf_id, key and value type ids) and builds the ctypes
classes from it. So Python never restates a struct, and a map left pinned by an older build
is read with the layout it was created with.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

BTF_MAGIC = 0xEB9F
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
DECL_TAG, TYPE_TAG, ENUM64 = 17, 18, 19
_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_VLEN = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_INTS = {(1, False): ctypes.c_uint8, (1, True): ctypes.c_int8,
         (2, False): ctypes.c_uint16, (2, True): ctypes.c_int16,
         (4, False): ctypes.c_uint32, (4, True): ctypes.c_int32,
         (8, False): ctypes.c_uint64, (8, True): ctypes.c_int64}


class BTFError(ValueError):
    pass


@dataclass(frozen=True)
class Type:
    kind: int
    name: str
    size_or_type: int  # size for int/struct/union/enum, referenced type id otherwise
    vlen: int
    kflag: bool
    # INT: (encoding, bits); ARRAY: (elem, index, n); STRUCT: ((name, type, bitoff, bits), ...)
    extra: tuple


class BTF:
    """A parsed BTF blob: `types[id]` (id 0 is void), `ctype(id)` a ctypes class for one."""

    def __init__(self, data: bytes):
        try:
            magic, _v, _f, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
                "<HBBIIIII", data, 0)
        except struct.error as e:
            raise BTFError(f"truncated BTF header: {e}") from None
        if magic != BTF_MAGIC:
            raise BTFError("not BTF (bad magic)")
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[Type | None] = [None]
        self._ctypes: dict[int, type] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, sot = struct.unpack_from("<III", data, pos)
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
            pos += 12
            extra: tuple = ()
            if kind == INT:
                (word,) = struct.unpack_from("<I", data, pos)
                extra = ((word >> 24) & 0xF, word & 0xFF)
            elif kind == ARRAY:
                extra = struct.unpack_from("<III", data, pos)
            elif kind in (STRUCT, UNION):
                members = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                    bitoff, bitsize = (m_off & 0xFFFFFF, m_off >> 24) if kflag else (m_off, 0)
                    members.append((self._name(m_name), m_type, bitoff, bitsize))
                extra = tuple(members)
            self.types.append(Type(kind, self._name(name_off), sot, vlen, kflag, extra))
            pos += _FIXED.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def size(self, tid: int) -> int:
        t = self._resolve(tid)
        if t.kind == ARRAY:
            elem, _index, n = t.extra
            return self.size(elem) * n
        if t.kind == PTR:
            return ctypes.sizeof(ctypes.c_void_p)
        return t.size_or_type

    def _resolve(self, tid: int) -> Type:
        t = self.types[tid]
        while t is not None and t.kind in _QUALIFIERS:
            t = self.types[t.size_or_type]
        if t is None:
            raise BTFError(f"type {tid} is void")
        return t

    def ctype(self, tid: int) -> type:
        """A ctypes class with exactly the layout the BTF type has (offsets and size)."""
        if tid not in self._ctypes:
            self._ctypes[tid] = self._build(tid)
        return self._ctypes[tid]

    def _build(self, tid: int) -> type:
        t = self.types[tid]
        if t is None:
            raise BTFError("void has no layout")
        if t.kind in _QUALIFIERS:
            return self.ctype(t.size_or_type)
        if t.kind in (INT, ENUM, ENUM64):
            signed = bool(t.extra[0] & 1) if t.kind == INT else False
            cls = _INTS.get((t.size_or_type, signed))
            if cls is None:
                raise BTFError(f"no ctypes integer of {t.size_or_type} bytes ({t.name})")
            return cls
        if t.kind == PTR:
            return ctypes.c_uint64
        if t.kind == ARRAY:
            elem, _index, n = t.extra
            return self.ctype(elem) * n
        if t.kind in (STRUCT, UNION):
            return self._record(t)
        raise BTFError(f"BTF kind {t.kind} ({t.name or 'anonymous'}) has no data layout")

    def _record(self, t: Type) -> type:
        """Members at their BTF offsets, gaps and tail as explicit padding, packed: the
        class is byte-exact whatever alignment ctypes would have chosen."""
        base = ctypes.Union if t.kind == UNION else ctypes.Structure
        fields: list[tuple] = []
        anonymous = []
        at = 0
        for i, (name, mtype, bitoff, bitsize) in enumerate(t.extra):
            if bitsize or bitoff % 8:
                raise BTFError(f"{t.name}: bitfield member {name!r} is not supported")
            off = bitoff // 8
            if not name:
                name = f"_anon{i}"
                anonymous.append(name)
            if base is ctypes.Structure and off > at:
                fields.append((f"_gap{i}", ctypes.c_uint8 * (off - at)))
            mt = self.ctype(mtype)
            fields.append((name, mt))
            at = max(at, off + ctypes.sizeof(mt))
        if t.size_or_type > at and base is ctypes.Structure:
            fields.append(("_tail", ctypes.c_uint8 * (t.size_or_type - at)))
        ns = {"_pack_": 1, "_fields_": fields}
        if anonymous:
            ns["_anonymous_"] = anonymous
        cls = type(t.name or "anon", (base,), ns)
        if ctypes.sizeof(cls) != t.size_or_type:
            raise BTFError(f"{t.name}: built {ctypes.sizeof(cls)} bytes, BTF says "
                           f"{t.size_or_type}")
        return cls


def is_padding(name: str) -> bool:
    """Fields _record() adds to hold BTF offsets (never a C member's name)."""
    return name.startswith("_gap") or name == "_tail"
