"""The package as a user installs it, for the tests that need an unprivileged user or a
checkout-free install: a wheel built from the tracked files into a fresh venv (Debian's bcc
visible through the system site-packages), all under a world-readable directory (the
checkout may sit where an unprivileged user cannot read, /tmp being 0700 on some hosts)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


def tracked_files() -> list[str]:
    r = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout: the wheel is built from tracked files")
    return [f for f in r.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def clean_env() -> dict[str, str]:
    """The caller's environment without anything pointing at this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "ACCEL_BPF_DIR", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def build_installed(top: Path) -> tuple[Path, Path]:
    """(source copy, venv) under a world-readable directory outside the checkout."""
    src = top / "src"
    for f in tracked_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    venv = top / "venv"
    run = {"check": True, "capture_output": True, "text": True, "env": clean_env()}
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   **run)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "setuptools>=68", "wheel"], **run, timeout=600)
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(top / "dist"), str(src)], **run, timeout=600)
    (wheel,) = (top / "dist").glob("meshaccel-*.whl")
    subprocess.run([*pip, "install", f"{wheel}[dev]"], **run, timeout=900)
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    top.chmod(0o755)
    return src, venv


