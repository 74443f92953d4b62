"""The bpf(2) system call and its commands, through libc alone (no libbcc, no LLVM): the
long-running agent works on pinned maps and programs with these and nothing else.

Every failure raises BpfError, an OSError carrying the kernel's errno: callers classify by
errno (ENOENT: no such key, E2BIG/ENOSPC: map full, EEXIST, EPERM ...), never by message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import cache

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long

# enum bpf_cmd
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH, PROG_TEST_RUN = 6, 7, 8, 9, 10
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 13, 14, 15, 16
BTF_GET_FD_BY_ID = 19
MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH, MAP_DELETE_BATCH = 24, 26, 27

# enum bpf_map_type (those that need telling apart in user space)
MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH = 5, 6, 10
PERCPU_MAPS = frozenset({MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH})

# enum bpf_attach_type
ATTACH = {
    "cgroup_inet4_connect": 10, "cgroup_inet6_connect": 11, "cgroup_sock_ops": 3,
    "cgroup_udp4_sendmsg": 14, "cgroup_udp6_sendmsg": 15, "sk_msg_verdict": 7,
    "cgroup_udp4_recvmsg": 19, "cgroup_udp6_recvmsg": 20,
    "cgroup_inet4_getpeername": 29, "cgroup_inet6_getpeername": 30,
}
F_ALLOW_MULTI = 2
ENOTSUPP = 524  # the kernel's own "not supported for this object" (not EOPNOTSUPP)


class BpfError(OSError):
    """A bpf(2) command failed; .errno is the kernel's reason."""


def strerror(err: int) -> str:
    return os.strerror(err) if err != ENOTSUPP else "operation not supported"


def bpf(cmd: int, attr: ctypes.Structure, what: str = "") -> int:
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) number unknown on {os.uname().machine}")
    rc = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what or f'bpf cmd {cmd}'}: {strerror(err)}")
    return rc


def try_bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(2) returning 0 or the errno, for the hot loops that expect failures (ENOENT)."""
    rc = _libc.syscall(_NR_BPF[os.uname().machine], cmd, ctypes.byref(attr),
                       ctypes.sizeof(attr))
    return ctypes.get_errno() if rc < 0 else 0


# ---- attribute layouts (union bpf_attr, one member each) ------------------------------------

class ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class PathAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int32),
                ("_pad", ctypes.c_uint32)]


class AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32 * 7)]


class QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_uint64),
                ("link_ids", ctypes.c_uint64), ("link_attach_flags", ctypes.c_uint64),
                ("revision", ctypes.c_uint64)]


class IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    """struct bpf_map_info up to the BTF ids (what user space needs of a pinned map)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", ctypes.c_uint32),
                ("xlated_prog_len", ctypes.c_uint32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


class BtfInfo(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("id", ctypes.c_uint32), ("name", ctypes.c_uint64),
                ("name_len", ctypes.c_uint32), ("kernel_btf", ctypes.c_uint32)]


# ---- objects -----------------------------------------------------------------------------------

def _path(path: str | os.PathLike) -> ctypes.Array:
    raw = os.fsencode(path) + b"\0"
    return ctypes.create_string_buffer(raw, len(raw))


def obj_get(path: str | os.PathLike) -> int:
    """An fd for a pinned map or program; the caller closes it."""
    buf = _path(path)
    return bpf(OBJ_GET, PathAttr(pathname=ctypes.addressof(buf)), f"opening pin {path}")


def obj_pin(fd: int, path: str | os.PathLike) -> None:
    buf = _path(path)
    bpf(OBJ_PIN, PathAttr(pathname=ctypes.addressof(buf), bpf_fd=fd), f"pinning {path}")


def _info(fd: int, info: ctypes.Structure) -> None:
    bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                     info=ctypes.addressof(info)), "object info")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info)
    return info


def pinned_map_info(path: str | os.PathLike) -> MapInfo:
    fd = obj_get(path)
    try:
        return map_info(fd)
    finally:
        os.close(fd)


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _info(fd, info)
    return info


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(PROG_GET_FD_BY_ID, IdAttr(id=prog_id), f"program {prog_id}")


def btf_data(btf_id: int) -> bytes:
    """The raw BTF blob (types and strings) of a loaded BTF object."""
    fd = bpf(BTF_GET_FD_BY_ID, IdAttr(id=btf_id), f"BTF {btf_id}")
    try:
        info = BtfInfo()
        _info(fd, info)
        buf = ctypes.create_string_buffer(info.btf_size)
        info = BtfInfo(btf=ctypes.addressof(buf), btf_size=len(buf))
        _info(fd, info)
        return buf.raw
    finally:
        os.close(fd)


# ---- attachments ---------------------------------------------------------------------------

def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    bpf(PROG_ATTACH, AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd,
                                attach_type=attach_type, attach_flags=flags), "attaching")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    bpf(PROG_DETACH, AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd,
                                attach_type=attach_type), "detaching")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup (or map) for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = QueryAttr(target_fd=target_fd, attach_type=attach_type,
                     prog_ids=ctypes.addressof(ids), prog_cnt=64)
    bpf(PROG_QUERY, attr, "querying attached programs")
    return list(ids[: attr.prog_cnt])


@cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not online: hotplug may add them)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


# ---- run-time statistics ---------------------------------------------------------------------

ENABLE_STATS = 32
_PROG_INFO_SIZE = 232  # struct bpf_prog_info up to verified_insns and the attach BTF ids
_RUN_TIME_NS_OFF, _RUN_CNT_OFF = 192, 200


class StatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def enable_stats() -> int:
    """Count every program's runs and run time while the returned fd is open (BPF_ENABLE_STATS,
    BPF_STATS_RUN_TIME: no global sysctl is changed; the caller closes the fd)."""
    return bpf(ENABLE_STATS, StatsAttr(type=0), "enabling run-time statistics")


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program, counted while statistics are enabled."""
    buf = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=_PROG_INFO_SIZE,
                                     info=ctypes.addressof(buf)), "program info")
    raw = buf.raw
    return (int.from_bytes(raw[_RUN_TIME_NS_OFF:_RUN_TIME_NS_OFF + 8], "little"),
            int.from_bytes(raw[_RUN_CNT_OFF:_RUN_CNT_OFF + 8], "little"))
