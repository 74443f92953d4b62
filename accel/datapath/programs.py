"""Compile, load and attach the BPF programs, and undo every attachment in reverse.

The C sources are found relative to the package (the repository's bpf/, or ACCEL_BPF_DIR)
and never edited at run time: the few compile-time switches are -D cflags.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bcc import BPF

log = logging.getLogger(__name__)

DEFAULT_PIN_DIR = "/sys/fs/bpf/accel"


def bpf_dir() -> Path:
    env = os.environ.get("ACCEL_BPF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "bpf", here.parents[1] / "bpf"):
        if (candidate / "lib" / "common.h").exists():
            return candidate
    raise FileNotFoundError("bpf/ sources not found; set ACCEL_BPF_DIR")


class LoadError(RuntimeError):
    """A program failed to compile, load or attach: the message says which and why."""


def compile_program(source: str, pin_dir: str, defines: dict[str, int | str] | None = None) -> BPF:
    src = bpf_dir() / source
    cflags = [f"-I{bpf_dir()}", f'-DACCEL_PIN_DIR="{pin_dir}"', "-Wno-unused-function"]
    for k, v in (defines or {}).items():
        cflags.append(f"-D{k}={v}")
    try:
        return BPF(src_file=str(src).encode(), cflags=cflags)
    except Exception as e:
        raise LoadError(f"compiling {source}: {e}") from e


def load_func(b: BPF, name: str, prog_type: int):
    try:
        return b.load_func(name.encode(), prog_type)
    except Exception as e:
        raise LoadError(f"loading {name}: {e}") from e


@dataclass
class Attachments:
    """Every attachment made, undone in reverse order by undo_all()."""

    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def undo_all(self) -> list[str]:
        errors = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # keep undoing the rest
                errors.append(f"{what}: {e}")
                log.warning("undo %s failed: %s", what, e)
        return errors

    def forget(self) -> None:
        """--keep: leave everything in place for the next agent to adopt."""
        self._undo.clear()

    def __len__(self) -> int:
        return len(self._undo)
