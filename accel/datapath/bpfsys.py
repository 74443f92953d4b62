"""The few raw bpf(2) operations bcc's Python layer does not offer: pinned objects by path,
per-CPU lookups on any map fd, program queries on a cgroup."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from bcc.libbcc import lib

BPF_PROG_QUERY = 16
BPF_F_ALLOW_MULTI = 2


def obj_get(path: str) -> int:
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        err = ctypes.get_errno() or -fd
        raise OSError(err, f"cannot open pinned object {path}: {os.strerror(err)}")
    return fd


def obj_pin(fd: int, path: str) -> None:
    if lib.bpf_obj_pin(fd, path.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot pin {path}: {os.strerror(err)}")


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def lookup(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value) -> bool:
    return lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0


def percpu_u64_sum(fd: int, index: int, ncpu: int) -> int:
    key = ctypes.c_uint32(index)
    values = (ctypes.c_uint64 * ncpu)()
    if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(values)) != 0:
        return 0
    return int(sum(values))


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_uint64),
        ("link_ids", ctypes.c_uint64),
        ("link_attach_flags", ctypes.c_uint64),
        ("revision", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
SYS_bpf = 321  # x86_64


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup (or map) for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type,
                      prog_ids=ctypes.addressof(ids), prog_cnt=64)
    if _libc.syscall(SYS_bpf, BPF_PROG_QUERY, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_QUERY: {os.strerror(err)}")
    return list(ids[: attr.prog_cnt])


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def prog_fd_by_id(prog_id: int) -> int:
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        err = ctypes.get_errno() or -fd
        raise OSError(err, f"program {prog_id}: {os.strerror(err)}")
    return fd


def prog_info(fd: int) -> _ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib.bpf_obj_get_info(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf_obj_get_info: {os.strerror(err)}")
    return info
