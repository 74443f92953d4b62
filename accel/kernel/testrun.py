"""BPF_PROG_TEST_RUN: run a loaded program on a packet in the kernel, no interface needed.

The kernel runs the program `repeat` times on one buffer and reports the mean
time per run. It runs on the buffer in place: a program that rewrites the
packet sees its own output on the next repeat (benchmarks must pick packets
whose rewrite is again a packet of the same case).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from accel.kernel import bpf

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
XDP_ACTIONS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
TC_ACT_OK, TC_ACT_SHOT = 0, 2


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
    bpf.bpf(bpf.PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return RunResult(attr.retval, data_out.raw[: attr.data_size_out], attr.duration)
