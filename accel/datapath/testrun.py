"""BPF_PROG_TEST_RUN: run a loaded program on a packet in the kernel, no interface needed.

The kernel runs the program `repeat` times on one buffer and reports the mean
time per run. It runs on the buffer in place: a program that rewrites the
packet sees its own output on the next repeat (benchmarks must pick packets
whose rewrite is again a packet of the same case).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
_NR_BPF = {"x86_64": 321, "aarch64": 280}

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
XDP_ACTIONS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
TC_ACT_OK, TC_ACT_SHOT = 0, 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _TestAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _PathAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
        ("_pad", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info: all this package needs to check a pinned map."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """The bpf(2) syscall; raises OSError with the kernel's errno."""
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(f"bpf syscall number unknown on {os.uname().machine}")
    rc = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return rc


@dataclass(frozen=True)
class RunResult:
    retval: int  # XDP action or TC verdict
    data: bytes  # the packet as the program left it
    ns_per_run: int  # the kernel's mean over the repeats

    @property
    def action(self) -> str:
        return XDP_ACTIONS.get(self.retval, str(self.retval))


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1, out_room: int = 256) -> RunResult:
    """Run a loaded XDP or TC program on `packet` (Ethernet frame)."""
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    size_out = len(packet) + out_room
    data_out = ctypes.create_string_buffer(size_out)
    attr = _TestAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=size_out,
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=max(1, repeat),
    )
    bpf(BPF_PROG_TEST_RUN, attr)
    return RunResult(attr.retval, data_out.raw[: attr.data_size_out], attr.duration)


def obj_get(path: str) -> int:
    """An fd for a pinned object; the caller closes it."""
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    return bpf(BPF_OBJ_GET, _PathAttr(pathname=ctypes.addressof(buf)))


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


def pinned_map_info(path: str) -> MapInfo:
    fd = obj_get(path)
    try:
        return map_info(fd)
    finally:
        os.close(fd)
