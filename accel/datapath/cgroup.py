"""Finding the cgroup2 hierarchy (never assumed to be /sys/fs/cgroup) and test cgroups."""

from __future__ import annotations

import os
from pathlib import Path


class CgroupError(RuntimeError):
    pass


def cgroup2_mount() -> Path:
    """The cgroup2 mount point: /sys/fs/cgroup on unified hosts, .../unified on hybrid ones."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise CgroupError("no cgroup2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")


def resolve(path: str | None) -> Path:
    """--cgroup: an absolute cgroup2 directory, a path relative to the mount, or the root."""
    root = cgroup2_mount()
    if not path:
        return root
    p = Path(path)
    if not p.is_absolute():
        p = root / p
    if not p.is_dir() or not (p / "cgroup.procs").exists():
        raise CgroupError(f"{p} is not a cgroup2 directory (under {root})")
    return p


def open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def process_cgroup(pid: int | str = "self") -> Path:
    """The cgroup2 directory a process is in."""
    root = cgroup2_mount()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hier, _, rel = line.split(":", 2)
        if hier == "0":
            return root / rel.lstrip("/")
    raise CgroupError(f"process {pid} has no cgroup2 membership")
