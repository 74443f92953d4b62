"""Pinned per-CPU counters -> numbers, readable with or without a running agent.

Counter names come from `enum accel_counter` in accel/bpf/lib/counters.h (C_FOO -> "foo"),
so the C header stays the one definition.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

from accel.kernel.loader import bpf_dir
from accel.kernel.maps import Map

COUNTERS_MAP = "accel_counters"


@cache
def counter_names() -> tuple[str, ...]:
    text = (bpf_dir() / "lib" / "counters.h").read_text()
    body = re.search(r"enum accel_counter\s*\{(.*?)\};", text, re.S)
    if not body:
        raise RuntimeError("enum accel_counter not found in accel/bpf/lib/counters.h")
    names = re.findall(r"^\s*C_([A-Z0-9_]+)\s*(?:=\s*0\s*)?,", body.group(1), re.M)
    return tuple(n.lower() for n in names if n != "MAX")


def read(pin_dir: str) -> dict[str, int]:
    """Sum every counter over the CPUs. Raises FileNotFoundError if nothing is pinned."""
    path = os.path.join(pin_dir, COUNTERS_MAP)
    if not Path(path).exists():
        raise FileNotFoundError(f"no counters pinned at {path}: is an agent installed there?")
    with Map.open(path) as m:
        return {name: sum(m.get(i) or ()) for i, name in enumerate(counter_names())}
