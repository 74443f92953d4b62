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
from collections.abc import Callable, Iterator
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


NETNS_DIRS = ("/run/netns", "/run/docker/netns")


class NsidPaths:
    """Which namespace file is the namespace a netlink socket calls `nsid` (nsids are per
    namespace: a veth's IFLA_LINK_NETNSID names its peer's). Found by asking the kernel
    for the nsid of each named namespace and each process's; remembered, re-checked."""

    def __init__(self, ipr):
        self._ipr = ipr  # an IPRoute in the namespace whose nsids these are
        self._paths: dict[int, str] = {}

    def path(self, nsid: int) -> str | None:
        cached = self._paths.get(nsid)
        if cached and self._nsid_of(cached) == nsid:
            return cached
        self._paths.pop(nsid, None)
        seen: set[tuple[int, int]] = set()
        for path in self._namespace_files():
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            got = self._nsid_of(path)
            if got is not None and got >= 0:
                self._paths[got] = path
                if got == nsid:
                    return path
        return None

    def _nsid_of(self, path: str) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            r = self._ipr.get_netnsid(fd=fd)
            return None if r is None or r.get("nsid") is None else int(r["nsid"])
        except Exception:
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _namespace_files() -> Iterator[str]:
        for d in NETNS_DIRS:
            try:
                yield from (os.path.join(d, n) for n in sorted(os.listdir(d)))
            except OSError:
                continue
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                yield f"/proc/{pid}/ns/net"
