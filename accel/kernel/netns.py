"""Network namespaces from user space: run a function inside one, and read its cookie.

A namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+) is the number BPF programs get from
bpf_get_netns_cookie(): the agent learns a pod namespace's cookie by making a socket
inside it (a socket belongs to the namespace it was made in) and asking.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def in_netns(path: str, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) called in a short-lived thread that entered the network namespace at
    `path` (setns moves only the calling thread; this one never moves). Its result, or
    its exception re-raised here."""
    out: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=body, name="accel-netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]


def own_cookie() -> int:
    """The cookie of the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def cookie(path: str | None) -> int:
    """The cookie of the network namespace at `path` (None: our own)."""
    return own_cookie() if path is None else in_netns(path, own_cookie)
