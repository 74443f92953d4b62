"""What a bench or demo run named <prefix> may leave behind: namespaces, cgroups, pins,
state files and processes. Tests assert it is empty after success, failure and signals."""

from __future__ import annotations

import os
from pathlib import Path

from accel.bench import runner
from accel.datapath import cgroup as cg


def leftovers(prefix: str) -> list[str]:
    found = []
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [p.name for p in netns.iterdir() if p.name.startswith(prefix)]
    found += [str(p) for p in cg.cgroup2_mount().glob(f"accel-*-{prefix}*")]
    found += [str(p) for p in Path("/sys/fs/bpf").glob(f"accel-*-{prefix}*")]
    found += [str(p) for p in runner.STATE_DIR.glob(f"{prefix}*.json")]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"-{prefix}" in cmd:
                found.append(f"process {pid}: {cmd}")
    return found
