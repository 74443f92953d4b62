"""`accel`: the command line. Each subcommand lives in accel/commands/<name>.py."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommands in help order; a module missing here is a command not yet built.
COMMANDS = (
    "agent",
    "controller",
    "doctor",
    "status",
    "services",
    "policies",
    "stats",
    "flows",
    "lab",
    "bench",
    "compose",
    "demo",
    "uninstall",
)

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel",
        description="meshaccel: service-mesh L4 in the kernel (eBPF), no sidecars.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"accel.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"accel.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
