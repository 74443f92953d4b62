"""BPF socket iterators (iter/tcp) whose programs call kfuncs, over bpf(2) alone.

bcc compiles such a program but cannot resolve a kfunc call (it has no BTF extern
relocation), and its loader does not know BPF_TRACE_ITER. So the C source calls a stub
through a helper number no kernel has (KFUNC_STUBS below: `static int (*f)(...) = (void
*)0x7ff0`), the loader child takes the compiled instructions (bcc's dump_func, map fds
already in place), rewrites each stub call into a kfunc call (src_reg
BPF_PSEUDO_KFUNC_CALL, imm = the kfunc's id in the running kernel's BTF) and loads the
program itself, attached to the iterator target `bpf_iter_<target>` by BTF id.

At run time: `IterLink(prog_fd)` makes the link once; `run()` opens one iteration and reads
it to the end, which runs the program once per socket of the network namespace the calling
thread is in (`run_in(netns_path)` enters another one in a short-lived thread: setns is per
thread for network namespaces).
"""

from __future__ import annotations

import ctypes
import os
import struct
from functools import cache
from pathlib import Path

from accel.kernel import bpf
from accel.kernel.btf import BTF, FUNC, STRUCT, UNION
from accel.kernel.netns import in_netns

VMLINUX = Path("/sys/kernel/btf/vmlinux")
PROG_LOAD, LINK_CREATE, ITER_CREATE = 5, 28, 33
PROG_TYPE_TRACING, TRACE_ITER = 26, 28
PSEUDO_KFUNC_CALL = 2
CALL = 0x85
# Stub helper number -> the kfunc its calls become (the C side declares the same numbers).
KFUNC_STUBS = {0x7FF0: "bpf_sock_destroy"}


class IterError(RuntimeError):
    pass


@cache
def vmlinux() -> BTF:
    return BTF(VMLINUX.read_bytes())


def func_id(name: str) -> int:
    """The BTF id of a kernel function (kfunc, or an iterator target bpf_iter_<x>)."""
    for i, t in enumerate(vmlinux().types):
        if t is not None and t.kind == FUNC and t.name == name:
            return i
    raise IterError(f"this kernel has no {name} (no BTF for it)")


def member_offset(struct_name: str, member: str) -> int:
    """Byte offset of a member of a kernel struct, looking through anonymous structs and
    unions (struct sock_common keeps its addresses two anonymous levels down)."""
    btf = vmlinux()

    def find(tid: int, base: int) -> int | None:
        t = btf.types[tid]
        while t is not None and t.kind not in (STRUCT, UNION) and t.kind in (7, 8, 9, 10, 11, 18):
            t = btf.types[t.size_or_type]
        if t is None or t.kind not in (STRUCT, UNION):
            return None
        for name, mtype, bitoff, _bits in t.extra:
            if name == member:
                return base + bitoff // 8
            if not name:
                got = find(mtype, base + bitoff // 8)
                if got is not None:
                    return got
        return None

    for i, t in enumerate(btf.types):
        if t is not None and t.kind == STRUCT and t.name == struct_name:
            off = find(i, 0)
            if off is None:
                break
            return off
    raise IterError(f"this kernel has no {struct_name}.{member}")


def patch_kfunc_calls(insns: bytes) -> bytes:
    """Turn every call of a stub helper number into a call of its kfunc."""
    out = bytearray(insns)
    ids = {num: func_id(name) for num, name in KFUNC_STUBS.items()}
    for at in range(0, len(out), 8):
        op, regs, off, imm = struct.unpack_from("<BBhi", out, at)
        if op == CALL and regs == 0 and imm in ids:
            struct.pack_into("<BBhi", out, at, op, PSEUDO_KFUNC_CALL << 4, 0, ids[imm])
    return bytes(out)


class ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32 * 8)]


class LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("iter_info", ctypes.c_uint64), ("iter_info_len", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32 * 7)]


class IterCreateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


def load_iter(insns: bytes, target: str, name: str) -> int:
    """Load an iterator program for `bpf_iter_<target>` from bcc-compiled instructions;
    returns its fd. A verifier refusal raises IterError with the verifier's log tail."""
    code = patch_kfunc_calls(insns)
    buf = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 20)
    attr = ProgLoadAttr(prog_type=PROG_TYPE_TRACING, insn_cnt=len(code) // 8,
                        insns=ctypes.addressof(buf), license=ctypes.addressof(lic),
                        log_level=1, log_size=len(log), log_buf=ctypes.addressof(log),
                        prog_name=name.encode()[:15], expected_attach_type=TRACE_ITER,
                        attach_btf_id=func_id(f"bpf_iter_{target}"))
    try:
        return bpf.bpf(PROG_LOAD, attr, f"loading iterator {name}")
    except bpf.BpfError as e:
        tail = log.value.decode(errors="replace").strip().splitlines()[-6:]
        raise IterError(f"{e}: {' | '.join(tail)}") from None


class IterLink:
    """An iterator program's link; each run() walks the sockets of the caller's netns."""

    def __init__(self, prog_fd: int):
        self.fd = bpf.bpf(LINK_CREATE, LinkCreateAttr(prog_fd=prog_fd,
                                                      attach_type=TRACE_ITER),
                          "creating the iterator link")

    def run(self) -> None:
        fd = bpf.bpf(ITER_CREATE, IterCreateAttr(link_fd=self.fd), "opening an iteration")
        try:
            while os.read(fd, 65536):
                pass
        finally:
            os.close(fd)

    def run_in(self, netns_path: str | None) -> None:
        """run() inside the network namespace at netns_path (None: this one)."""
        if netns_path is None:
            self.run()
            return
        in_netns(netns_path, self.run)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# struct sock_common members the socket walk reads -> the -D name it is compiled with.
SOCK_COMMON_FIELDS = {
    "skc_family": "ACCEL_OFF_SKC_FAMILY",
    "skc_state": "ACCEL_OFF_SKC_STATE",
    "skc_num": "ACCEL_OFF_SKC_NUM",
    "skc_dport": "ACCEL_OFF_SKC_DPORT",
    "skc_daddr": "ACCEL_OFF_SKC_DADDR",
    "skc_rcv_saddr": "ACCEL_OFF_SKC_RCV_SADDR",
    "skc_v6_daddr": "ACCEL_OFF_SKC_V6_DADDR",
    "skc_v6_rcv_saddr": "ACCEL_OFF_SKC_V6_RCV_SADDR",
}


def sock_common_defines() -> dict[str, int]:
    """-D switches with the running kernel's struct sock_common offsets (a CO-RE
    relocation done by hand: bcc compiles against whatever headers this host has)."""
    return {define: member_offset("sock_common", m) for m, define in SOCK_COMMON_FIELDS.items()}
