"""Options and output shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from accel.kernel.loader import DEFAULT_PIN_DIR


def add_datapath_args(p: argparse.ArgumentParser, cgroup: bool = True) -> None:
    p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR,
                   help=f"bpffs directory of this instance's maps (default {DEFAULT_PIN_DIR})")
    if cgroup:
        p.add_argument("--cgroup", default=None,
                       help="cgroup2 directory to attach to (default: the cgroup2 root)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def fail(message: str, code: int = 1) -> int:
    print(f"accel: {message}", file=sys.stderr)
    return code


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def printable(text: str) -> str:
    """`text` with every character a terminal would act on or hide (controls such as ESC,
    bidi overrides, zero-width and line separators) escaped as \\xNN / \\uNNNN: what the
    agent holds is shown, never interpreted. Printable text is returned as is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [[printable(str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
