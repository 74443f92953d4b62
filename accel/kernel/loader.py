"""Compile once, pin, and get out: the only place bcc (and with it LLVM) is used.

`ensure(unit, pin_dir)` makes sure a unit's programs (the socket programs, the edge, pod
routing) are loaded and pinned under pin_dir, and returns where. It compiles in a
short-lived child process (`python -m accel.kernel.loader`), so the long-running agent never
maps bcc or LLVM (about 60 MB of its resident set, and 6 s of compiling per start). The
child pins each program as prog_<function>; its maps pin themselves (ACCEL_MAP in
bpf/lib/common.h). A marker next to them (an empty directory build_<unit>_<hash>: bpffs holds
no regular files) records a hash of everything the build depends on (the C sources, the -D
switches, the kernel release): an agent restarted over pins with the same hash uses them as
they are, ready in well under a second.

The C sources are found relative to the package (accel/bpf, or ACCEL_BPF_DIR) and never
edited at run time: the few compile-time switches are -D cflags.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PIN_DIR = "/sys/fs/bpf/accel"

# bcc's BPF.<TYPE> program types, by the names manifests use.
PROG_TYPES = {"sched_cls": 3, "xdp": 6, "sock_ops": 13, "sk_msg": 16, "cgroup_sock_addr": 18}
# Socket iterators (accel/kernel/sockiter.py): bcc compiles them, the loader child loads them.
ITER_TYPES = {"iter_tcp": "tcp"}


class LoadError(RuntimeError):
    """A program failed to compile or load: the message says which and why."""


def bpf_dir() -> Path:
    env = os.environ.get("ACCEL_BPF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1] / "bpf"
    if (here / "lib" / "common.h").exists():
        return here
    raise FileNotFoundError(f"BPF sources not found in {here}; set ACCEL_BPF_DIR")


@dataclass(frozen=True)
class Program:
    source: str  # file under bpf_dir(), e.g. "connect.c"
    function: str  # its entry function, pinned as prog_<function>
    prog_type: str  # a key of PROG_TYPES
    attach_type: int | None = None  # expected attach type (cgroup sock_addr needs it)


@dataclass(frozen=True)
class Unit:
    """Programs built together with one set of -D switches."""

    name: str  # "sock" | "edge" | "pods": names the manifest
    programs: tuple[Program, ...]
    defines: dict[str, int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Loaded:
    unit: str
    programs: dict[str, str]  # function -> pin path
    compiled: bool  # False: the pins were reused as they were


def marker(pin_dir: str | os.PathLike, unit: str, digest: str) -> Path:
    return Path(pin_dir) / f"build_{unit}_{digest[:16]}"


def _drop_markers(pin_dir: str | os.PathLike, unit: str) -> None:
    for old in Path(pin_dir).glob(f"build_{unit}_*"):
        old.rmdir()


def build_hash(unit: Unit, pin_dir: str | os.PathLike) -> str:
    h = hashlib.sha256()
    src = bpf_dir()
    for path in sorted(src.rglob("*")):
        if path.suffix in (".c", ".h"):
            h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    h.update(json.dumps([asdict(unit), os.fspath(pin_dir), os.uname().release],
                        sort_keys=True).encode())
    return h.hexdigest()


def pin_path(pin_dir: str | os.PathLike, function: str) -> str:
    return os.path.join(os.fspath(pin_dir), f"prog_{function}")


def ensure(unit: Unit, pin_dir: str | os.PathLike, timeout: float = 300) -> Loaded:
    """The unit's programs pinned under pin_dir: reused when the manifest's hash matches
    and every pin is there, else compiled and loaded afresh in a child process."""
    digest = build_hash(unit, pin_dir)
    progs = {p.function: pin_path(pin_dir, p.function) for p in unit.programs}
    if marker(pin_dir, unit.name, digest).is_dir() and all(map(os.path.exists, progs.values())):
        return Loaded(unit.name, progs, compiled=False)
    request = json.dumps({"unit": asdict(unit), "pin_dir": os.fspath(pin_dir),
                          "bpf_dir": str(bpf_dir()), "hash": digest})
    try:
        proc = subprocess.run([sys.executable, "-m", "accel.kernel.loader"], input=request,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadError(f"{unit.name}: compiling took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise LoadError(lines[-1] if lines else f"loader exited {proc.returncode}")
    return Loaded(unit.name, progs, compiled=True)


def forget(pin_dir: str | os.PathLike, unit: str, functions: list[str]) -> None:
    """Remove a unit's program pins and build marker (its maps are the owner's to remove)."""
    for fn in functions:
        Path(pin_path(pin_dir, fn)).unlink(missing_ok=True)
    if os.path.isdir(pin_dir):
        _drop_markers(pin_dir, unit)


# ---- the child: bcc lives only here ------------------------------------------------------------

def _compile(req: dict) -> None:
    from bcc import BPF

    from accel.kernel import bpf

    unit = req["unit"]
    pin_dir, src_dir = req["pin_dir"], Path(req["bpf_dir"])
    cflags = [f"-I{src_dir}", f'-DACCEL_PIN_DIR="{pin_dir}"', "-Wno-unused-function"]
    cflags += [f"-D{k}={v}" for k, v in unit["defines"].items()]
    os.makedirs(pin_dir, exist_ok=True)
    modules: dict[str, BPF] = {}
    _drop_markers(pin_dir, unit["name"])
    for p in unit["programs"]:
        source = p["source"]
        iterator = ITER_TYPES.get(p["prog_type"])
        if source not in modules:
            extra = []
            if iterator:
                from accel.kernel import sockiter

                extra = [f"-D{k}={v}" for k, v in sockiter.sock_common_defines().items()]
            try:
                modules[source] = BPF(src_file=str(src_dir / source).encode(),
                                      cflags=cflags + extra)
            except Exception as e:
                raise LoadError(f"compiling {source}: {e}") from None
        kwargs = {} if p["attach_type"] is None else {"attach_type": p["attach_type"]}
        try:
            if iterator:
                from accel.kernel import sockiter

                fd = sockiter.load_iter(modules[source].dump_func(p["function"].encode()),
                                        iterator, p["function"])
            else:
                fd = modules[source].load_func(p["function"].encode(),
                                               PROG_TYPES[p["prog_type"]], **kwargs).fd
        except Exception as e:
            raise LoadError(f"loading {p['function']}: {e}") from None
        path = pin_path(pin_dir, p["function"])
        if os.path.exists(path):
            os.unlink(path)  # an earlier build's program: it stays loaded while attached
        bpf.obj_pin(fd, path)
    marker(pin_dir, unit["name"], req["hash"]).mkdir()


def main() -> int:
    try:
        _compile(json.loads(sys.stdin.read()))
    except (LoadError, OSError) as e:
        print(f"{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
