"""What this host's docker needs for a compose mesh's agent, found instead of assumed: the
cgroup2 mount (ACCEL_CGROUP2) and whether docker can start a privileged container (if not,
compose/agent-caps.yml). Probed on every call; nothing is cached across runs."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

CAPS_FILE = "agent-caps.yml"


class ProbeError(RuntimeError):
    pass


def cgroup2() -> str:
    """The host's cgroup2 mount point (/sys/fs/cgroup, or .../unified on hybrid hosts)."""
    from accel.datapath.cgroup import CgroupError, cgroup2_mount

    try:
        return str(cgroup2_mount())
    except CgroupError as e:
        raise ProbeError(str(e)) from None


def check_cgroup2(path: str) -> None:
    """ProbeError unless `path` is a cgroup2 directory (the agent would refuse it)."""
    from accel.datapath.cgroup import CgroupError, resolve

    if not os.path.isabs(path):
        raise ProbeError(f"{path} is not an absolute path")
    try:
        resolve(path)
    except CgroupError as e:
        raise ProbeError(str(e)) from None


@dataclass
class Privileged:
    ok: bool
    why: str = ""  # docker's error when not


def _run(image: str, *flags: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["docker", "run", "--rm", "--pull", "never", "--network", "none",
                               *flags, image, "true"], capture_output=True, text=True,
                              timeout=120)
    except FileNotFoundError:
        raise ProbeError("docker is not installed (deploy/setup.sh --docker)") from None
    except subprocess.TimeoutExpired:
        raise ProbeError(f"`docker run {image} true` did not finish in 120 s") from None


def _error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "docker run --help" not in ln]
    if not lines:
        return f"exit status {r.returncode}"
    # runc's reason, without the layers of daemon and shim wording around it
    why = lines[0].strip().rpartition("unable to start container process: ")[2]
    return why.removesuffix(": unknown").removeprefix("docker: ")


def privileged(image: str) -> Privileged:
    """Can docker start `image` privileged here? Tried for real (`docker run --privileged
    IMAGE true`); when that fails, the same without --privileged tells a host that refuses
    privileged containers (daemon's capability bounding set) from a missing image or a
    stopped daemon, which raise ProbeError."""
    r = _run(image, "--privileged")
    if r.returncode == 0:
        return Privileged(True)
    plain = _run(image)
    if plain.returncode:
        raise ProbeError(f"docker cannot run {image}: {_error(plain)}"
                         + (" (build it: compose/build-images.sh)"
                            if "No such image" in plain.stderr else ""))
    return Privileged(False, _error(r))


def caps_file(compose_files: list[Path]) -> Path:
    """compose/agent-caps.yml: beside one of the given compose files, else in the source
    tree this package came from."""
    import accel

    candidates = [f.resolve().parent / CAPS_FILE for f in compose_files]
    candidates.append(Path(accel.__file__).resolve().parents[1] / "compose" / CAPS_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise ProbeError(f"docker cannot run privileged containers here and no {CAPS_FILE} was "
                     f"found (looked in {', '.join(str(c.parent) for c in candidates)})")
