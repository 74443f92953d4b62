"""Offsets of the few kernel structure fields the socket fast path reads, from the running
kernel's own BTF (/sys/kernel/btf/vmlinux).

bcc compiles against whatever headers this host has (Debian's 6.1 headers stand in for a
6.18 kernel here), so struct sock and struct sk_psock cannot be taken from headers: their
layouts change between releases. The redirect program reads a few fields of the two sockets
and the peer's psock with bpf_probe_read_kernel at the offsets found here, passed in as -D
switches (a CO-RE relocation done by hand, for eight fields). A kernel without BTF, or
without a field (sk_psock.msg_tot_len exists since 6.12-ish), has no offsets: the redirect
mode is then not offered and every mesh connection stays on TCP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
KIND_STRUCT = 4
# Extra bytes after the common 12-byte header, per kind: fixed, or per vlen entry.
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}

# (struct, member) the fast path needs -> the -D name it is compiled with.
FIELDS = {
    ("sock", "sk_user_data"): "ACCEL_OFF_SK_USER_DATA",
    ("sock", "sk_rcvbuf"): "ACCEL_OFF_SK_RCVBUF",
    ("sock", "sk_userlocks"): "ACCEL_OFF_SK_USERLOCKS",
    ("sk_psock", "msg_tot_len"): "ACCEL_OFF_PSOCK_MSG_TOT_LEN",
    # Whether every byte sent over TCP has been read: a paused redirect may resume.
    ("tcp_sock", "write_seq"): "ACCEL_OFF_TP_WRITE_SEQ",
    ("tcp_sock", "snd_una"): "ACCEL_OFF_TP_SND_UNA",
    ("tcp_sock", "copied_seq"): "ACCEL_OFF_TP_COPIED_SEQ",
    ("tcp_sock", "rcv_nxt"): "ACCEL_OFF_TP_RCV_NXT",
}


class BTFError(RuntimeError):
    pass


def struct_members(data: bytes, wanted: set[str]) -> dict[str, dict[str, int]]:
    """{struct name: {member: byte offset}} for the named structs (first of each name)."""
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", data, 0)
    if magic != BTF_MAGIC:
        raise BTFError("not BTF (bad magic)")
    types, strings = hdr_len + type_off, hdr_len + str_off

    def name(off: int) -> str:
        end = data.index(b"\0", strings + off)
        return data[strings + off:end].decode()

    out: dict[str, dict[str, int]] = {}
    pos, end = types, types + type_len
    while pos < end and len(out) < len(wanted):
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind == KIND_STRUCT and name_off:
            sname = name(name_off)
            if sname in wanted and sname not in out:
                members = {}
                for i in range(vlen):
                    m_name, _m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                    bits = m_off & 0xFFFFFF if kflag else m_off
                    if m_name and bits % 8 == 0:
                        members[name(m_name)] = bits // 8
                out[sname] = members
        pos += _FIXED.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen
    return out


@dataclass(frozen=True)
class FastpathOffsets:
    defines: dict[str, int]  # -D name -> byte offset; empty when unavailable
    missing: str  # why the redirect mode is unavailable ("" when it is available)

    @property
    def available(self) -> bool:
        return not self.missing


@cache
def fastpath_offsets(path: Path = VMLINUX) -> FastpathOffsets:
    try:
        data = path.read_bytes()
    except OSError as e:
        return FastpathOffsets({}, f"no kernel BTF ({path}: {e.strerror})")
    try:
        found = struct_members(data, {s for s, _ in FIELDS})
    except (BTFError, struct.error, ValueError) as e:
        return FastpathOffsets({}, f"unreadable kernel BTF: {e}")
    defines = {}
    for (sname, member), define in FIELDS.items():
        off = found.get(sname, {}).get(member)
        if off is None:
            return FastpathOffsets({}, f"this kernel has no {sname}.{member} (needed to bound "
                                   "a redirected connection's receive queue)")
        defines[define] = off
    return FastpathOffsets(defines, "")
